"""One step's inputs on the host, built once per step from the scheduler's plan."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.lora_batch import host_tables

if TYPE_CHECKING:
    from engine.adapters import PackedAdapter
    from engine.page_manager import PageManager
    from engine.scheduler import StepPlan
    from engine.sequence import Sequence


@dataclass
class StepInputs:
    """What the model reads in one step, as host lists; the eager path sends them to the device,
    the decode graphs write them into their input arena.

    S sequences, T new tokens (prefill chunks and decode tokens, sequence after sequence), N
    sequences that sample, NS adapters of the step (slots in name order), NPROJ modules of a
    projection group. ``block_tables`` and ``adapter_pages`` are the page manager's own lists:
    read during the step, never kept.
    """

    input_ids: list[int]  # [T]; 0 where the token is pending (see feeds)
    # (token index, row of the runner's token_buf) of each token sampled by the previous step and
    # not on the host yet: its id is read on the device
    feeds: list[tuple[int, int]]
    positions: list[int]  # [T]
    slot_mapping: list[int]  # [T] KV cache slot of each new token
    query_start_loc: list[int]  # [S+1] first token index of each sequence, then T
    seq_lens: list[int]  # [S] context length after this step
    block_tables: list[list[int]]  # [S][blocks of the sequence] KV pages, not padded
    max_query_len: int  # the longest chunk of new tokens
    logits_indices: list[int]  # [N] token index of each sampling sequence's last token
    sampling_seqs: list[Sequence]  # [N] in row order
    token_slots: list[int]  # [T] adapter slot of each token, -1 = base model
    adapter_pages: list[list[int]]  # [NS][pages of the adapter] in the pool, not padded
    # per projection group: (ranks, a_offsets, b_offsets, scales), each [NS][NPROJ]
    lora_groups: dict[str, tuple[list, list, list, list]]

    @property
    def is_decode(self) -> bool:
        """One new token per sequence."""
        return len(self.input_ids) == len(self.seq_lens)


def prepare(plan: StepPlan, pages: PageManager, adapters: dict[str, PackedAdapter]) -> StepInputs:
    """The inputs of ``plan``'s step. A sequence's last token is pending when the host does not
    know it yet (async scheduling): it is fed from ``seq.pending_row`` of the device's tokens."""
    input_ids: list[int] = []
    feeds: list[tuple[int, int]] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    token_adapters: list[str | None] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    block_tables: list[list[int]] = []
    logits_indices: list[int] = []
    sampling_seqs: list[Sequence] = []
    bs = pages.block_size
    for item in plan.batch:
        seq, n = item.seq, item.num_new_tokens
        start = seq.num_computed_tokens
        table = pages.table(seq.request_id)
        known = seq.all_token_ids[start:start + n]
        if len(known) < n:  # the last one is pending
            feeds.append((len(input_ids) + len(known), seq.pending_row))
            known.append(0)
        input_ids.extend(known)
        positions.extend(range(start, start + n))
        slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
        token_adapters.extend([seq.lora.key if seq.lora is not None else None] * n)
        query_start_loc.append(query_start_loc[-1] + n)
        seq_lens.append(start + n)
        block_tables.append(table)
        if item.samples:
            logits_indices.append(query_start_loc[-1] - 1)
            sampling_seqs.append(seq)
    in_step = {name: adapters[name] for name in set(token_adapters) if name is not None}
    token_slots, adapter_pages, lora_groups = host_tables(token_adapters, in_step,
                                                          {n: pages.adapter_pages(n) for n in in_step})
    return StepInputs(input_ids=input_ids, feeds=feeds, positions=positions, slot_mapping=slot_mapping,
                      query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables,
                      max_query_len=max(item.num_new_tokens for item in plan.batch), logits_indices=logits_indices,
                      sampling_seqs=sampling_seqs, token_slots=token_slots, adapter_pages=adapter_pages,
                      lora_groups=lora_groups)
