"""A step's inputs built from a plan: token order, KV slots, pending tokens, sampling rows, LoRA tables."""
import torch

from engine.adapters import PackedAdapter
from engine.page_manager import PageManager
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq, StepPlan
from engine.sequence import Sequence
from engine.step_inputs import prepare

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def packed(name: str, rank: int) -> PackedAdapter:
    ranks = {m: rank if m in ("q_proj", "v_proj") else 0 for m in MODULES}
    return PackedAdapter(name, torch.zeros(1, 8), 1, ranks, {"q_proj": 0, "v_proj": 100}, {"q_proj": 50, "v_proj": 150},
                         {"q_proj": 2.0, "v_proj": 2.0})


def test_a_mixed_step_of_prefill_chunks_and_decodes():
    pages = PageManager(num_pages=32, block_size=4)
    adapters = {"b": packed("b", 8), "a": packed("a", 4)}
    pages.add_adapter("a", 2)
    pages.add_adapter("b", 3)
    params = SamplingParams(max_tokens=8)
    # a prefill chunk of 5 of 7 prompt tokens (no sampling); a prompt finished with its last 3
    # tokens; a decode whose last token is still on the device (row 4 of the previous step)
    chunk = Sequence("chunk", [1, 2, 3, 4, 5, 6, 7], params, lora=adapters["b"])
    tail = Sequence("tail", [1, 9, 9, 9, 9], params, num_computed_tokens=2)
    decode = Sequence("decode", [1, 8, 8], params, lora=adapters["a"], output_token_ids=[30, 31],
                      num_computed_tokens=5, num_pending=1, pending_row=4)
    for seq, total in ((chunk, 5), (tail, 5), (decode, 6)):
        pages.grow(seq.request_id, total)
    plan = StepPlan([ScheduledSeq(chunk, 5), ScheduledSeq(tail, 3), ScheduledSeq(decode, 1)])
    step = prepare(plan, pages, adapters)

    assert step.input_ids == [1, 2, 3, 4, 5, 9, 9, 9, 0]
    assert step.feeds == [(8, 4)]
    assert step.positions == [0, 1, 2, 3, 4, 2, 3, 4, 5]
    assert step.query_start_loc == [0, 5, 8, 9] and step.seq_lens == [5, 5, 6] and step.max_query_len == 5
    tables = [pages.table(s.request_id) for s in (chunk, tail, decode)]
    assert step.block_tables == tables
    expected_slots = [tables[0][p // 4] * 4 + p % 4 for p in range(5)] + \
                     [tables[1][p // 4] * 4 + p % 4 for p in range(2, 5)] + [tables[2][1] * 4 + 1]
    assert step.slot_mapping == expected_slots
    assert step.logits_indices == [7, 8] and step.sampling_seqs == [tail, decode]
    assert not step.is_decode
    # slots in name order: a = 0, b = 1
    assert step.token_slots == [1] * 5 + [-1] * 3 + [0]
    assert step.adapter_pages == [pages.adapter_pages("a"), pages.adapter_pages("b")]
    ranks, a_offsets, b_offsets, scales = step.lora_groups["qkv"]
    assert ranks == [[4, 0, 4], [8, 0, 8]] and a_offsets == [[0, 0, 100]] * 2 and b_offsets == [[50, 0, 150]] * 2
    assert scales == [[2.0, 0.0, 2.0]] * 2
    assert step.lora_groups["down"][0] == [[0], [0]]


def test_a_decode_step_without_adapters():
    pages = PageManager(num_pages=8, block_size=4)
    seqs = [Sequence(f"s{i}", [1, 2, 3], SamplingParams(), output_token_ids=[5], num_computed_tokens=3)
            for i in range(2)]
    for seq in seqs:
        pages.grow(seq.request_id, 4)
    step = prepare(StepPlan([ScheduledSeq(s, 1) for s in seqs]), pages, {})
    assert step.is_decode and step.input_ids == [5, 5] and step.feeds == []
    assert step.token_slots == [-1, -1] and step.adapter_pages == []
    assert step.logits_indices == [0, 1] and step.max_query_len == 1
