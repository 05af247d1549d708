"""Per-step LoRA metadata: which tokens use which adapter, where each adapter's pages are, and
applying the LoRA terms of a fused projection through the page tables."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.adapters import PackedAdapter
from engine.ops import Ops, to_device
from kernels import tiles

if TYPE_CHECKING:
    from engine.step_inputs import StepInputs

# fused projections of the model and the LoRA modules whose outputs they hold, in order
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}


@dataclass
class GroupMeta:
    """One fused projection's LoRA tables. NS adapter slots, NPROJ modules in the group."""

    ranks: torch.Tensor  # [NS, NPROJ] int32, 0 = module absent
    a_offsets: torch.Tensor  # [NS, NPROJ] int64, virtual offset of A in the slot's pages
    b_offsets: torch.Tensor  # [NS, NPROJ] int64, virtual offset of B^T
    scales: torch.Tensor  # [NS, NPROJ] float32
    out_offsets: list[int]  # where each module's output sits in the fused output
    out_sizes: list[int]
    max_rank: int  # R_MAX of the z buffer


def host_tables(token_adapters: list[str | None], adapters: dict[str, PackedAdapter],
                adapter_pages: dict[str, list[int]],
                ) -> tuple[list[int], list[list[int]], dict[str, tuple[list, list, list, list]]]:
    """The step's LoRA tables as Python lists: token slots [T], page tables [NS][pages] and, per
    group, (ranks, a_offsets, b_offsets, scales) rows [NS][NPROJ]. Slots follow sorted names."""
    names = sorted(adapters)
    slot_of = {name: i for i, name in enumerate(names)}
    token_slots = [slot_of[n] if n else -1 for n in token_adapters]
    page_tables = [adapter_pages[n] for n in names]
    groups = {}
    for group, modules in GROUPS.items():
        packed = [adapters[n] for n in names]
        groups[group] = ([[p.ranks[m] for m in modules] for p in packed],
                         [[p.a_offsets.get(m, 0) for m in modules] for p in packed],
                         [[p.b_offsets.get(m, 0) for m in modules] for p in packed],
                         [[p.scales.get(m, 0.0) for m in modules] for p in packed])
    return token_slots, page_tables, groups


def group_layout(group: str, out_sizes: dict[str, int]) -> tuple[list[int], list[int]]:
    sizes = [out_sizes[m] for m in GROUPS[group]]
    return [sum(sizes[:j]) for j in range(len(sizes))], sizes


class LoRABatch:
    """The device-side LoRA state of one step.

    token_slots: [T] int32 (-1: base model); page_tables: [NS, MP] int32; groups: GroupMeta of
    the groups that any adapter of the step has. The kernels' per-step metadata is built here,
    once, from token_slots (on the device, so this also runs inside a CUDA graph capture).
    ``linear`` is called per layer and projection group.
    """

    def __init__(self, ops: Ops, token_slots: torch.Tensor | None, page_tables: torch.Tensor | None,
                 groups: dict[str, GroupMeta]) -> None:
        self.token_slots = token_slots
        self.page_tables = page_tables
        self.groups = groups
        self.num_slots = 0 if page_tables is None else page_tables.shape[0]
        self.kernel_meta = ops.lora_meta(token_slots, self.num_slots) if self.num_slots else None
        # per group, two z buffers that the layers take in turn: each layer's expand zeroes what the next
        # layer's shrink accumulates into, so no shrink launches a memset first (zeroed once, at creation)
        self._z: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._delta: dict[str, torch.Tensor] = {}  # per group, reused by every layer
        # Decode-sized steps defer their LoRA terms, and when captured in a CUDA graph run them on
        # the LoRA stream (eager ones do not: there the stream's switches, recorded once in a graph,
        # would be host work on every step, and eager steps launch one kernel at a time; that choice
        # is not measured). Prefill-sized steps run theirs on the main stream (on the H200 the LoRA
        # stream beside their compute-bound GEMMs took 2,048 tokens over 16 rank-16 adapters from 0.83
        # to 0.60 of the LoRA-off tokens/s, docs/BENCHMARKS.md), before the base GEMM, which adds
        # the term (into_gemm), or after it, adding into its output in place.
        num_tokens = 0 if token_slots is None else token_slots.numel()
        decode_sized = num_tokens < tiles.PREFILL_SIZED_TOKENS
        self.defer = ops.defer_lora and decode_sized
        self.into_gemm = ops.lora_into_gemm and not decode_sized
        self.stream = None
        if self.defer and groups and token_slots.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self.stream = ops.lora_stream(token_slots.device)

    @classmethod
    def build(cls, ops: Ops, step: StepInputs, out_sizes: dict[str, int], device: torch.device) -> "LoRABatch":
        """The eager path: tables of exactly the step's adapters; groups no adapter has are skipped."""
        if not step.adapter_pages:
            return cls(ops, None, None, {})
        page_tables = step.adapter_pages
        max_pages = max(len(t) for t in page_tables)
        metas = {}
        for group, (ranks, a_off, b_off, scales) in step.lora_groups.items():
            max_rank = max(max(row) for row in ranks)
            if max_rank == 0:
                continue
            offsets, sizes = group_layout(group, out_sizes)
            metas[group] = GroupMeta(to_device(ranks, torch.int32, device), to_device(a_off, torch.int64, device),
                                     to_device(b_off, torch.int64, device), to_device(scales, torch.float32, device),
                                     offsets, sizes, max_rank)
        return cls(ops, to_device(step.token_slots, torch.int32, device),
                   to_device([t + [0] * (max_pages - len(t)) for t in page_tables], torch.int32, device), metas)

    def linear(self, ops: Ops, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pool: torch.Tensor,
               layer: int, group: str, defer: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused projection ``group`` with its LoRA terms: returns (y, delta), y = x W^T + b.

        x: [T, K]; weight: [N_total, K]. Deferred (``defer``, and a decode-sized step), the LoRA terms
        go to delta [T, N_total] (zero rows for tokens without an adapter), which the op after the
        projection adds (the ``delta`` of Ops.add_rms_norm, rotary_and_write_kv, silu_and_mul);
        otherwise they are added into y and delta is None (a row-parallel projection under tensor
        parallelism passes defer=False: its all-reduce must sum the LoRA terms too). A prefill-sized
        step on the kernels (``ops.lora_into_gemm``) computes them first and has the base GEMM add
        them (Ops.linear_plus); with a bias, or on the references, they are added into y after it.

        With a LoRA stream (Ops.lora_stream; decode graphs) the LoRA runs on it beside the base GEMM,
        which reads the same x: deferred, the whole of it (shrink, then expand into delta), so none
        of it sits between the GEMM and the next op; a group not deferred (row-parallel under tensor
        parallelism) runs its shrink there and its expand after the GEMM.
        """
        meta = self.groups.get(group)
        if meta is None:
            return ops.linear(x, weight, bias), None
        if ops.fuses_lora(self.kernel_meta):  # one launch, no z buffer
            y = ops.linear(x, weight, bias)
            ops.lora_fused(x, pool, layer, self, meta, y)
            return y, None
        buffers = self._z.get(group)
        if buffers is None:  # two [T, NPROJ, R_MAX] float32, allocated apart (a view's odd offset would
            # change the kernels' pointer alignment, one of their compile keys)
            buffers = self._z[group] = tuple(torch.zeros(x.shape[0], len(meta.out_sizes), meta.max_rank,
                                                         dtype=torch.float32, device=x.device) for _ in range(2))
        z, z_next = buffers[layer % 2], buffers[(layer + 1) % 2]
        if self.into_gemm and bias is None:
            # prefill-sized: the expand stores the term (every row: zeros without an adapter) and the
            # base GEMM adds it in its epilogue, so y is written once and never re-read; the buffer is
            # not kept across layers (the largest, gate_up's, is what ModelRunner's memory profile adds)
            addend = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
            ops.lora_shrink(x, pool, layer, self, meta, z, z_zeroed=True)
            ops.lora_expand(z, pool, layer, self, meta, addend, accumulate=False, zero_after=z_next,
                            after_shrink=True)
            return ops.linear_plus(x, weight, addend), None
        delta = None
        if defer and self.defer:
            delta = self._delta.get(group)
            if delta is None:  # kept for every layer: the expand writes all its rows (zeros without an adapter)
                delta = self._delta[group] = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        if self.stream is None:
            y = ops.linear(x, weight, bias)
            ops.lora_shrink(x, pool, layer, self, meta, z, z_zeroed=True)
            if delta is not None:
                ops.lora_expand(z, pool, layer, self, meta, delta, accumulate=False, zero_after=z_next,
                                after_shrink=True)
        else:
            main = torch.cuda.current_stream(x.device)
            self.stream.wait_stream(main)  # x is ready; z and delta are free (the ops that read them are queued)
            with torch.cuda.stream(self.stream):
                ops.lora_shrink(x, pool, layer, self, meta, z, z_zeroed=True)
                if delta is not None:
                    ops.lora_expand(z, pool, layer, self, meta, delta, accumulate=False, zero_after=z_next,
                                    after_shrink=True)
            with ops.gemm_beside_lora(x.device, x.shape[0]):
                y = ops.linear(x, weight, bias)
            main.wait_stream(self.stream)
        if delta is None:
            ops.lora_expand(z, pool, layer, self, meta, y, zero_after=z_next)
        return y, delta
