"""Benchmark of the Triton kernels on the GPU: one table of time, bytes, bandwidth and speed-up.

Usage (repo root, CUDA machine):  PYTHONPATH=. python bench/kernels.py [--json PATH] [--sweep]
Times are medians of CUDA-graph replays; each graph runs the op over several input sets in turn
(adapters and KV larger than L2 together), so repeated replays do not measure the cache.
"bytes" = the fewest bytes the op must move (inputs read once, outputs written once; y is read
and written; z written and read by the split LoRA pair, not by the fused kernel); frac = bytes /
time / the device-to-device copy bandwidth measured in the same run (bench/bandwidth.py).
Each LoRA case is timed as the split pair (lora_shrink + lora_expand, the z buffer in memory, as the
engine runs them: two z buffers in turn, no memset, the expand launched while the shrink ends
(programmatic dependent launch, where the device has it); "memset_pair_us" in the JSON is the pair with
the shrink's memset and "no_pdl_pair_us" the pair with the expand launched after the shrink's end) and
as lora_fused (one launch, z on chip); the fused row's "x split" is the pair's time over its own.
The torch reference is a fair vectorized implementation: decode LoRA gathers each token's
adapter and uses bmm, prefill LoRA runs one matmul pair per segment, decode attention gathers
the pages and calls scaled_dot_product_attention; prefill attention is also compared with
kernels.reference.paged_attention, the engine's CPU path. --sweep first times tile candidates.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

# run as a script, this file's folder comes first on sys.path and its name would shadow the
# kernels package: put the repository root there instead
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

from bench.bandwidth import copy_bandwidth
from kernels import reference, tiles
from kernels.lora_expand import lora_expand
from kernels.lora_fused import lora_fused
from kernels.lora_meta import LoRAStepMeta
from kernels.lora_shrink import lora_shrink
from kernels.paged_attention import paged_decode_attention
from kernels.prefill_attention import prefill_attention

L2_SPREAD_BYTES = 200e6  # rotate input sets until one graph replay touches this much
DEVICE = "cuda"
DTYPE = torch.float16
BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128
PAGE = 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM  # a Llama-3-8B KV page: the pool's page size
NUM_LAYERS, LAYER = 2, 1  # pool views with a page stride of 2 pages, as in the engine


def time_graph(fns: list, replays: int = 40) -> float:
    """Median seconds per call of fns (called in turn), from CUDA-graph replays."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times) / len(fns)


def time_eager(fn, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------- LoRA
@dataclasses.dataclass(frozen=True)
class LoraCase:
    name: str
    num_tokens: int
    num_adapters: int
    rank: int
    k: int
    out_sizes: tuple[int, ...]
    segment: int = 0  # > 0: prefill, tokens in runs of this length (SGMV); 0: decode order (BGMV)
    r_max: int = 0  # > 0: z's R_MAX (the kernels' rank bound) above the adapters' rank, as in the decode graphs

    @property
    def rank_bound(self) -> int:
        return self.r_max or self.rank


class LoraSetup:
    """Rotating input sets for one case: adapters on scattered pages of one pool, x, y, z, metadata."""

    def __init__(self, case: LoraCase, block_m: int | None = None):
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        self.case = case
        num_proj, n_total = len(case.out_sizes), sum(case.out_sizes)
        per_slot = case.rank * (case.k * num_proj + n_total)  # elements: A_p [r, K] and B_p^T [r, N_p] per projection
        self.adapter_bytes = case.num_adapters * per_slot * DTYPE.itemsize
        self.rotations = max(1, min(4, math.ceil(L2_SPREAD_BYTES / self.adapter_bytes)))
        num_slots = case.num_adapters * self.rotations
        pages_per_slot = tiles.cdiv(per_slot, PAGE)
        num_pages = num_slots * pages_per_slot
        self.pool = (torch.randn(num_pages, NUM_LAYERS, PAGE, device=DEVICE, generator=gen, dtype=DTYPE) * 0.02)
        perm = torch.randperm(num_pages, device=DEVICE, generator=gen)
        self.page_tables = perm.view(num_slots, pages_per_slot).to(torch.int32).contiguous()
        self.ranks = torch.full((num_slots, num_proj), case.rank, dtype=torch.int32, device=DEVICE)
        a_off, b_off, offset = [], [], 0
        for n in case.out_sizes:
            a_off.append(offset)
            offset += case.rank * case.k
            b_off.append(offset)
            offset += case.rank * n
        self.a_offsets = torch.tensor([a_off] * num_slots, dtype=torch.int64, device=DEVICE)
        self.b_offsets = torch.tensor([b_off] * num_slots, dtype=torch.int64, device=DEVICE)
        self.scales = torch.full((num_slots, num_proj), 0.5, device=DEVICE)
        self.out_offsets = [sum(case.out_sizes[:j]) for j in range(num_proj)]
        self.sets = []
        for rot in range(self.rotations):
            # each set is one step: its own NS = num_adapters slots, as the engine numbers a step's adapters
            rows = slice(rot * case.num_adapters, (rot + 1) * case.num_adapters)
            if case.segment:
                slots = [(i // case.segment) % case.num_adapters for i in range(case.num_tokens)]
            else:
                order = torch.randperm(case.num_tokens, generator=torch.Generator().manual_seed(rot)).tolist()
                slots = [order[i] % case.num_adapters for i in range(case.num_tokens)]
            token_slots = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
            self.sets.append(dict(
                slots=token_slots, page_tables=self.page_tables[rows], ranks=self.ranks[rows],
                a_offsets=self.a_offsets[rows], b_offsets=self.b_offsets[rows], scales=self.scales[rows],
                x=torch.randn(case.num_tokens, case.k, device=DEVICE, dtype=DTYPE, generator=gen),
                y=torch.randn(case.num_tokens, n_total, device=DEVICE, dtype=DTYPE, generator=gen),
                z=torch.empty(case.num_tokens, num_proj, case.rank_bound, device=DEVICE),
                z_pair=[torch.zeros(case.num_tokens, num_proj, case.rank_bound, device=DEVICE) for _ in range(2)],
                meta=LoRAStepMeta.build(token_slots, case.num_adapters, block_m),
                global_slots=token_slots.long() + rot * case.num_adapters,
                host_slots=[slot + rot * case.num_adapters for slot in slots],
            ))
        # the torch reference reads contiguous per-slot stacks (gathered once, outside the timing)
        self.a_stack, self.b_stack = [], []
        for p, n in enumerate(case.out_sizes):
            self.a_stack.append(torch.stack([reference.read_paged(self.pool, LAYER, self.page_tables[s], a_off[p],
                                                                  case.rank * case.k).view(case.rank, case.k)
                                             for s in range(num_slots)]))  # [NS, r, K]
            self.b_stack.append(torch.stack([reference.read_paged(self.pool, LAYER, self.page_tables[s], b_off[p],
                                                                  case.rank * n).view(case.rank, n)
                                             for s in range(num_slots)]))  # [NS, r, N]

    def bytes_moved(self, fused: bool = False) -> int:
        c = self.case
        n_total = sum(c.out_sizes)
        xy = c.num_tokens * (c.k + 2 * n_total) * DTYPE.itemsize
        z = 0 if fused else 2 * c.num_tokens * len(c.out_sizes) * c.rank * 4
        return xy + self.adapter_bytes + z

    def shrink(self, s, config=None, z=None, **kwargs):
        lora_shrink(s["x"], self.pool, LAYER, s["slots"], s["page_tables"], s["ranks"], s["a_offsets"],
                    s["z"] if z is None else z, meta=s["meta"], config=config, **kwargs)

    def expand(self, s, config=None, z=None, **kwargs):
        lora_expand(s["z"] if z is None else z, self.pool, LAYER, s["slots"], s["page_tables"], s["ranks"],
                    s["b_offsets"], s["scales"], s["y"], self.out_offsets, list(self.case.out_sizes), meta=s["meta"],
                    config=config, **kwargs)

    def engine_pair(self, s, parity: int, expand: bool = True, pdl: bool = True):
        """The split pair as engine/lora_batch.py runs it: the shrink into one of two z buffers with no
        memset (z_zeroed), the expand zeroing the other (zero_after) and launched while the shrink runs
        (pdl); call with parity 0 then 1."""
        z, z_next = s["z_pair"][parity], s["z_pair"][1 - parity]
        self.shrink(s, z=z, z_zeroed=True)
        if expand:
            self.expand(s, z=z, zero_after=z_next, pdl=pdl)

    def fused(self, s, config=None):
        lora_fused(s["x"], self.pool, LAYER, s["slots"], s["page_tables"], s["ranks"], s["a_offsets"], s["b_offsets"],
                   s["scales"], s["y"], self.out_offsets, list(self.case.out_sizes), self.case.rank_bound, meta=s["meta"],
                   config=config)

    def torch_reference(self, s):
        x, y, slots = s["x"], s["y"], s["global_slots"]
        if self.case.segment:  # one matmul pair per run of one adapter
            bounds = list(range(0, self.case.num_tokens, self.case.segment))
            for p, (off, n) in enumerate(zip(self.out_offsets, self.case.out_sizes)):
                for start in bounds:
                    end = min(start + self.case.segment, self.case.num_tokens)
                    slot = s["host_slots"][start]
                    z = x[start:end] @ self.a_stack[p][slot].t()
                    y[start:end, off:off + n] += (z @ self.b_stack[p][slot]) * 0.5
            return
        for p, (off, n) in enumerate(zip(self.out_offsets, self.case.out_sizes)):
            z = torch.bmm(self.a_stack[p][slots], x.unsqueeze(2))  # [T, r, 1]
            y[:, off:off + n] += torch.bmm(z.transpose(1, 2), self.b_stack[p][slots]).squeeze(1) * 0.5

    def max_error(self, fused: bool = False) -> float:
        s = self.sets[0]
        y0 = s["y"].clone()
        if fused:
            self.fused(s)
        else:
            for z in s["z_pair"]:
                z.zero_()
            self.engine_pair(s, 0)
        mine = s["y"].float() - y0.float()
        s["y"].copy_(y0)
        self.torch_reference(s)
        ref = s["y"].float() - y0.float()
        s["y"].copy_(y0)
        return float((mine - ref).norm() / ref.norm())


LORA_CASES = [
    LoraCase("bgmv up 4096->11008 T=64 64 adapters r16", 64, 64, 16, 4096, (11008,)),
    LoraCase("bgmv up 4096->11008 T=128 64 adapters r16", 128, 64, 16, 4096, (11008,)),
    LoraCase("bgmv up 4096->11008 T=256 64 adapters r16", 256, 64, 16, 4096, (11008,)),
    LoraCase("bgmv down 11008->4096 T=128 64 adapters r16", 128, 64, 16, 11008, (4096,)),
    LoraCase("bgmv qkv 4096->3x4096 T=128 64 adapters r16", 128, 64, 16, 4096, (4096, 4096, 4096)),
    LoraCase("bgmv up T=128 64 adapters r64", 128, 64, 64, 4096, (11008,)),
    LoraCase("bgmv up T=128 1 adapter r16", 128, 1, 16, 4096, (11008,)),
    LoraCase("bgmv gate_up 4096->2x11008 T=64 64 adapters r16", 64, 64, 16, 4096, (11008, 11008)),
    LoraCase("bgmv gate_up 4096->2x11008 T=1 1 adapter r16", 1, 1, 16, 4096, (11008, 11008)),
    LoraCase("bgmv down 11008->4096 T=1 1 adapter r16", 1, 1, 16, 11008, (4096,)),
    LoraCase("sgmv up T=2048 seg128 16 adapters r16", 2048, 16, 16, 4096, (11008,), segment=128),
    LoraCase("sgmv up T=2048 seg128 16 adapters r64", 2048, 16, 64, 4096, (11008,), segment=128),
    # the decode graphs' kernels: R_MAX = max_lora_rank (64 by default) over rank-16 adapters, batch 64
    LoraCase("graph bgmv qkv T=64 64 adapters r16 R_MAX 64", 64, 64, 16, 4096, (4096, 4096, 4096), r_max=64),
    LoraCase("graph bgmv gate_up T=64 64 adapters r16 R_MAX 64", 64, 64, 16, 4096, (11008, 11008), r_max=64),
    LoraCase("graph bgmv down T=64 64 adapters r16 R_MAX 64", 64, 64, 16, 11008, (4096,), r_max=64),
    LoraCase("bgmv qkv T=64 64 adapters r16", 64, 64, 16, 4096, (4096, 4096, 4096)),
    LoraCase("bgmv down T=64 64 adapters r16", 64, 64, 16, 11008, (4096,)),
]
# vLLM 0.33 on the same H100 (TOOLCHAIN.md), us for shrink + expand of one projection
VLLM_US = {"bgmv up 4096->11008 T=64 64 adapters r16": 71.2, "bgmv up 4096->11008 T=128 64 adapters r16": 73.5,
           "bgmv up 4096->11008 T=256 64 adapters r16": 84.4, "bgmv down 11008->4096 T=128 64 adapters r16": 66.9,
           "bgmv up T=128 64 adapters r64": 101.2, "bgmv up T=128 1 adapter r16": 24.6,
           "sgmv up T=2048 seg128 16 adapters r16": 94.2, "sgmv up T=2048 seg128 16 adapters r64": 108.8}


def bench_lora(case: LoraCase) -> list[dict]:
    """Two rows: the split pair (shrink + expand) and the fused kernel, on the same inputs."""
    setup = LoraSetup(case)
    t_ref = time_graph([lambda s=s: setup.torch_reference(s) for s in setup.sets], replays=10)
    # each set twice, so that its two z buffers take turns as in the engine's layers
    t_split = time_graph([lambda s=s, p=p: setup.engine_pair(s, p) for p in (0, 1) for s in setup.sets])
    t_shrink = time_graph([lambda s=s, p=p: setup.engine_pair(s, p, expand=False) for p in (0, 1) for s in setup.sets])
    t_memset_pair = time_graph([lambda s=s: (setup.shrink(s), setup.expand(s)) for s in setup.sets])
    t_no_pdl = time_graph([lambda s=s, p=p: setup.engine_pair(s, p, pdl=False) for p in (0, 1) for s in setup.sets])
    t_fused = time_graph([lambda s=s: setup.fused(s) for s in setup.sets])
    rows = []
    for fused, t in ((False, t_split), (True, t_fused)):
        moved = setup.bytes_moved(fused)
        frac_all = moved / t / copy_bandwidth()
        if case.segment:
            target_bytes, target = moved, "frac(all)>=0.50 and >=1x ref"
            met = frac_all >= 0.5 and t_ref / t >= 1.0
        elif fused:  # one launch per projection group: judged on all its bytes
            target_bytes, target = setup.adapter_bytes, "frac(all)>=0.60 and >=3x ref"
            met = frac_all >= 0.6 and t_ref / t >= 3.0
        else:
            target_bytes, target = setup.adapter_bytes, "frac(adapters)>=0.60 and >=3x ref"
            met = setup.adapter_bytes / t / copy_bandwidth() >= 0.6 and t_ref / t >= 3.0
        rows.append(dict(case=("fused " if fused else "") + case.name, kernel="fused" if fused else "split", us=t * 1e6,
                         shrink_us=None if fused else t_shrink * 1e6,
                         memset_pair_us=None if fused else t_memset_pair * 1e6,
                         no_pdl_pair_us=None if fused else t_no_pdl * 1e6, mb=moved / 1e6, gbps=moved / t / 1e9,
                         frac_all=frac_all, frac_target=target_bytes / t / copy_bandwidth(), ref_us=t_ref * 1e6,
                         speedup=t_ref / t, vs_split=t_split / t if fused else None,
                         vllm_us=None if fused else VLLM_US.get(case.name), target=target, met=met,
                         rel_err=setup.max_error(fused), rotations=setup.rotations))
    return rows


def bench_meta() -> dict:
    slots = torch.randint(0, 64, (128,), dtype=torch.int32, device=DEVICE)
    t = time_graph([lambda: LoRAStepMeta.build(slots, 64)])
    return dict(case="LoRAStepMeta.build T=128 (once per step)", us=t * 1e6)


# ---------------------------------------------------------------- attention
class AttentionSetup:
    def __init__(self, num_seqs: int, context: int, q_len: int, num_heads: int = 32):
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        blocks = tiles.cdiv(context, BLOCK_SIZE)
        num_pages = num_seqs * blocks
        pool = torch.randn(num_pages, NUM_LAYERS, PAGE, device=DEVICE, dtype=DTYPE, generator=gen)
        kv = pool[:, LAYER].view(num_pages, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        self.k_cache, self.v_cache = kv[:, 0], kv[:, 1]  # [P, BS, KVH, D], page stride 2 pages
        perm = torch.randperm(num_pages, device=DEVICE, generator=gen)
        self.block_tables = perm.view(num_seqs, blocks).to(torch.int32).contiguous()
        self.seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device=DEVICE)
        self.query_start_loc = torch.arange(0, num_seqs * q_len + 1, q_len, dtype=torch.int32, device=DEVICE)
        self.q = torch.randn(num_seqs * q_len, num_heads, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
        self.out = torch.empty_like(self.q)
        self.num_seqs, self.context, self.q_len, self.num_heads = num_seqs, context, q_len, num_heads
        self.scale = HEAD_DIM ** -0.5

    def kv_bytes(self) -> int:
        return 2 * self.num_seqs * self.context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize

    def decode(self, config=None):
        paged_decode_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                               self.query_start_loc, self.scale, None, max_seq_len=self.context, config=config,
                               out=self.out)

    def prefill(self, config=None):
        prefill_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc,
                          self.scale, None, max_query_len=self.q_len, config=config, out=self.out)

    def sdpa(self):
        """Fair torch: gather each sequence's pages, then one SDPA call (all contexts equal here)."""
        k = self.k_cache[self.block_tables.long()].flatten(1, 2)[:, :self.context].transpose(1, 2)  # [S, KVH, ctx, D]
        v = self.v_cache[self.block_tables.long()].flatten(1, 2)[:, :self.context].transpose(1, 2)
        q = self.q.view(self.num_seqs, self.q_len, self.num_heads, HEAD_DIM).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale, is_causal=self.q_len > 1, enable_gqa=True)

    def reference(self):
        return reference.paged_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                                         self.query_start_loc, self.scale)

    def max_error(self, run) -> float:
        run()
        ref = self.reference().float()
        return float((self.out.float() - ref).norm() / ref.norm())


def bench_decode(context: int, num_seqs: int = 64) -> dict:
    setup = AttentionSetup(num_seqs, context, 1)
    err = setup.max_error(setup.decode)
    t = time_graph([setup.decode])
    t_ref = time_graph([setup.sdpa], replays=10)
    moved = setup.kv_bytes() + 2 * setup.q.numel() * DTYPE.itemsize
    frac = setup.kv_bytes() / t / copy_bandwidth()
    return dict(case=f"decode attention B={num_seqs} ctx={context} H32/KV8 D128", us=t * 1e6, mb=moved / 1e6,
                gbps=moved / t / 1e9, frac_all=moved / t / copy_bandwidth(), frac_target=frac, ref_us=t_ref * 1e6,
                speedup=t_ref / t, target="frac(KV)>=0.70", met=frac >= 0.7, rel_err=err, ref="gather+SDPA")


def bench_prefill(num_tokens: int = 2048) -> dict:
    setup = AttentionSetup(1, num_tokens, num_tokens)
    err = setup.max_error(setup.prefill)
    t = time_graph([setup.prefill])
    t_ref = time_eager(setup.reference)
    t_sdpa = time_graph([setup.sdpa], replays=10)
    flops = 4 * setup.num_heads * HEAD_DIM * num_tokens * (num_tokens + 1) / 2
    moved = setup.kv_bytes() + 2 * setup.q.numel() * DTYPE.itemsize
    return dict(case=f"prefill attention T={num_tokens} H32/KV8 D128 causal", us=t * 1e6, mb=moved / 1e6,
                gbps=moved / t / 1e9, frac_all=moved / t / copy_bandwidth(), frac_target=None, tflops=flops / t / 1e12,
                ref_us=t_ref * 1e6, speedup=t_ref / t, sdpa_us=t_sdpa * 1e6, target=">=3x reference",
                met=t_ref / t >= 3.0, rel_err=err, ref="reference.paged_attention")


# ---------------------------------------------------------------- tile sweep
def sweep(deadline: float) -> list[dict]:
    rows = []

    def record(kind, case, config, fn):
        if time.time() > deadline:
            return
        try:
            rows.append(dict(kind=kind, case=case, config=dataclasses.asdict(config), us=fn() * 1e6))
        except Exception as e:  # a candidate that does not compile or run is reported, not fatal
            rows.append(dict(kind=kind, case=case, config=dataclasses.asdict(config), error=repr(e)[:200]))
        print(f"sweep {kind:8s} {case:45s} {config} -> {rows[-1].get('us', rows[-1].get('error'))}", flush=True)

    def shrink_tiles(block_k, split_k, num_warps, num_stages, block_r=16):
        return tiles.ShrinkTiles(block_k, block_r, split_k, num_warps, num_stages)

    def lora_candidates(case, shrinks, expands, block_m=None, label=""):
        setup = LoraSetup(case, block_m=block_m)
        for c in shrinks:
            record("shrink", case.name + label, c,
                   lambda c=c: time_graph([lambda s=s: setup.shrink(s, c) for s in setup.sets]))
        for c in expands:
            record("expand", case.name + label, c,
                   lambda c=c: time_graph([lambda s=s: setup.expand(s, c) for s in setup.sets]))

    def fused_candidates(case, candidates, block_m=None, label=""):
        """candidates: (block_k, block_n, programs per SM, max_split or None for the default, warps, stages)"""
        setup = LoraSetup(case, block_m=block_m)
        meta = setup.sets[0]["meta"]
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        default = tiles.fused_tiles(meta.max_tiles, case.k, max(case.out_sizes), len(case.out_sizes), case.rank, PAGE,
                                    meta.block_m, sms)
        configs = [default] + [tiles.FusedTiles(bk, bn, pps * sms, default.max_split if split is None else split, w, st)
                               for bk, bn, pps, split, w, st in candidates]
        for c in configs:
            record("fused", case.name + label, c,
                   lambda c=c: time_graph([lambda s=s: setup.fused(s, c) for s in setup.sets]))

    # rank 16 (the default is 256 x 256, 2 programs per SM, 4 warps, 4 stages); 512-long pieces need 8 warps
    # (255 registers, no spill at sm_90), so one program per SM
    fused_decode = [(256, 128, 2, None, 4, 4), (128, 256, 2, None, 4, 4), (256, 256, 4, None, 4, 4),
                    (256, 256, 1, None, 4, 4), (256, 256, 2, 1, 4, 4), (256, 256, 2, 2, 4, 4), (256, 256, 4, 64, 4, 4),
                    (256, 256, 2, None, 8, 4),
                    (256, 256, 2, None, 4, 3), (256, 256, 2, None, 4, 5), (512, 256, 1, None, 8, 4),
                    (512, 512, 1, None, 8, 3), (512, 256, 2, None, 8, 4)]
    for case in (LORA_CASES[1], LORA_CASES[3], LORA_CASES[4], LORA_CASES[6], LORA_CASES[7], LORA_CASES[8],
                 LORA_CASES[9]):
        fused_candidates(case, fused_decode)
    fused_decode_r64 = [(128, 128, 2, None, 4, 3), (256, 128, 2, None, 4, 3), (128, 256, 2, None, 8, 3),
                        (64, 128, 2, None, 4, 3), (128, 128, 4, None, 4, 3)]
    fused_candidates(LORA_CASES[5], fused_decode_r64)
    fused_prefill = [(64, 128, 2, None, 4, 3), (64, 128, 2, 1, 4, 3), (64, 128, 2, 2, 4, 3), (128, 128, 2, None, 4, 3),
                     (64, 256, 2, None, 8, 3), (64, 128, 4, None, 4, 3), (32, 128, 2, None, 4, 4),
                     (64, 128, 1, None, 4, 3)]
    for case in (LORA_CASES[10], LORA_CASES[11]):
        for block_m in (64, 128):
            fused_candidates(case, fused_prefill, block_m=block_m, label=f" BLOCK_M={block_m}")

    # decode LoRA: (block_k, split_k, warps, stages) and (block_n, chunks per program, warps, stages)
    shrink_decode = [(256, 4, 4, 3), (256, 2, 4, 3), (256, 8, 4, 3), (128, 8, 4, 3), (256, 4, 4, 4), (512, 2, 4, 3),
                     (128, 4, 4, 4), (256, 16, 4, 3)]
    expand_decode = [tiles.ExpandTiles(*c) for c in [(128, 4, 4, 3), (128, 8, 4, 3), (128, 2, 4, 3), (256, 4, 4, 3),
                                                    (256, 2, 8, 3), (64, 8, 4, 3), (128, 4, 4, 2), (128, 4, 8, 3),
                                                    (128, 1, 4, 3)]]
    for case, block_r in ((LORA_CASES[1], 16), (LORA_CASES[3], 16), (LORA_CASES[4], 16), (LORA_CASES[5], 32),
                          (LORA_CASES[5], 64), (LORA_CASES[6], 16)):
        lora_candidates(case, [shrink_tiles(*c, block_r=block_r) for c in shrink_decode],
                        expand_decode if block_r != 64 else [], label=f" R{block_r}")
    # prefill LoRA: BLOCK_M and tiles
    for case in (LORA_CASES[10], LORA_CASES[11]):
        br = min(64, case.rank)
        for block_m in (64, 128):
            lora_candidates(case, [shrink_tiles(*c, block_r=br) for c in [(64, 4, 4, 3), (64, 8, 4, 3), (128, 4, 4, 3),
                                                                          (128, 8, 8, 3), (64, 16, 4, 3)]],
                            [tiles.ExpandTiles(*c) for c in [(128, 2, 4, 3), (128, 4, 4, 3), (128, 8, 4, 3),
                                                             (64, 4, 4, 3), (256, 4, 8, 3)]],
                            block_m=block_m, label=f" BLOCK_M={block_m}")
    return rows


# the decode graphs' LoRA launches (engine/lora_batch.py): batch 64 over 64 rank-16 adapters and batch 1 over
# one, z at the rank bound 16, the expand storing the deferred delta; and the target row of the kernel table
DECODE_SWEEP_CASES = [
    (LoraCase("qkv T=64 64 adapters r16", 64, 64, 16, 4096, (4096, 4096, 4096)), False),
    (LoraCase("o T=64 64 adapters r16", 64, 64, 16, 4096, (4096,)), False),
    (LoraCase("gate_up T=64 64 adapters r16", 64, 64, 16, 4096, (11008, 11008)), False),
    (LoraCase("down T=64 64 adapters r16", 64, 64, 16, 11008, (4096,)), False),
    (LoraCase("qkv T=64 64 adapters r8 (R_MAX 16)", 64, 64, 8, 4096, (4096, 4096, 4096), r_max=16), False),
    (LORA_CASES[1], True),
    (LoraCase("qkv T=1 1 adapter r16", 1, 1, 16, 4096, (4096, 4096, 4096)), False),
    (LoraCase("gate_up T=1 1 adapter r16", 1, 1, 16, 4096, (11008, 11008)), False),
    (LoraCase("down T=1 1 adapter r16", 1, 1, 16, 11008, (4096,)), False),
    # prefill: 2,048 tokens over 16 rank-16 adapters, the expand storing the base GEMM's addend
    (LoraCase("qkv T=2048 seg128 16 adapters r16", 2048, 16, 16, 4096, (4096, 4096, 4096), segment=128), False),
    (LoraCase("gate_up T=2048 seg128 16 adapters r16", 2048, 16, 16, 4096, (11008, 11008), segment=128), False),
    (LoraCase("down T=2048 seg128 16 adapters r16", 2048, 16, 16, 11008, (4096,), segment=128), False),
]


def sweep_decode(deadline: float) -> list[dict]:
    """Decode LoRA tiles over a grid: lora_shrink (BLOCK_K, warps) x split_k and lora_expand (BLOCK_N, warps) x
    column blocks per program, per case of DECODE_SWEEP_CASES, and the z memset that split_k > 1 costs; prints
    each case's default and best five."""
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for case, accumulate in DECODE_SWEEP_CASES:
        if time.time() > deadline:
            break
        if case.segment:  # prefill tiles of 64 tokens
            shrink_shapes, splits = [(32, 4), (64, 4), (64, 8), (128, 8)], (1, 2, 4)
            expand_shapes, chunks_choices = [(64, 4), (128, 4), (128, 8), (256, 8)], (1, 2, 4, 8)
        else:
            shrink_shapes, splits = [(64, 2), (64, 4), (128, 2), (128, 4), (128, 8), (256, 4), (256, 8)], \
                (1, 2, 3, 4, 6, 8, 12, 16)
            expand_shapes = [(64, 2), (64, 4), (128, 4), (128, 8), (256, 4), (256, 8)]
            chunks_choices = (1, 2, 3, 4, 6, 8, 12)
        setup = LoraSetup(case)
        meta = setup.sets[0]["meta"]
        num_proj = len(case.out_sizes)
        default_s = tiles.shrink_tiles(meta.max_tiles, case.k, case.rank_bound, num_proj, PAGE, meta.block_m, sms)
        default_e = tiles.expand_tiles(meta.max_tiles, max(case.out_sizes), num_proj, PAGE, meta.block_m, sms,
                                       accumulate=accumulate)

        def expand(s, c):
            setup.expand(s, c, accumulate=accumulate)

        def timed(kind, config, fn):
            try:
                us = time_graph([lambda s=s: fn(s, config) for s in setup.sets], replays=20) * 1e6
            except Exception as e:  # a candidate that does not compile or run is reported, not fatal
                us = None
                print(f"sweep-decode {case.name} {kind} {config}: {repr(e)[:160]}", flush=True)
            rows.append(dict(case=case.name, kind=kind, config=dataclasses.asdict(config), us=us,
                             default=config in (default_s, default_e)))

        memset = time_graph([lambda s=s: s["z"].zero_() for s in setup.sets], replays=20) * 1e6
        rows.append(dict(case=case.name, kind="z memset", config=None, us=memset, default=False))
        candidates = [default_s] + [tiles.ShrinkTiles(bk, default_s.block_r, split, w, 3) for bk, w in shrink_shapes
                                    for split in splits if split <= tiles.cdiv(case.k, bk)]
        for c in dict.fromkeys(candidates):
            if time.time() < deadline:
                timed("shrink", c, setup.shrink)
        candidates = [default_e] + [tiles.ExpandTiles(bn, chunks, w, 3) for bn, w in expand_shapes
                                    for chunks in chunks_choices]
        for c in dict.fromkeys(candidates):
            if time.time() < deadline:
                timed("expand", c, expand)
        for kind in ("shrink", "expand"):
            mine = sorted((r for r in rows if r["case"] == case.name and r["kind"] == kind and r["us"] is not None),
                          key=lambda r: r["us"])
            base = next((r["us"] for r in mine if r["default"]), None)
            print(f"sweep-decode {case.name} | {kind} | default {fmt(base, '.1f')} us | z memset {memset:.1f} us | "
                  "best: " + "; ".join(f"{r['us']:.1f} {tuple(r['config'].values())}" for r in mine[:5]), flush=True)
        del setup
        torch.cuda.empty_cache()
    return rows


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_kernels.json"))
    parser.add_argument("--sweep", action="store_true", help="time LoRA tile candidates first")
    parser.add_argument("--sweep-seconds", type=float, default=240.0)
    parser.add_argument("--sweep-only", action="store_true", help="with --sweep: no table after it")
    parser.add_argument("--sweep-decode", action="store_true",
                        help="time a grid of decode LoRA tiles (the decode graphs' launches) first, then stop")
    parser.add_argument("--lora-only", action="store_true", help="the LoRA rows only (no attention rows)")
    parser.add_argument("--match", default="", help="only the LoRA cases whose name contains this (implies --lora-only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA device")
    import triton
    device = torch.cuda.get_device_name()
    command = "PYTHONPATH=. python " + " ".join(sys.argv)
    header = (f"device: {device}; copy bandwidth measured in this run {copy_bandwidth() / 1e12:.2f} TB/s; "
              f"torch {torch.__version__}; triton {triton.__version__}; command: {command}")
    print(header, flush=True)
    result = dict(device=device, copy_bandwidth_bytes_per_s=copy_bandwidth(), command=command,
                  torch=torch.__version__, triton=triton.__version__, rows=[])
    if args.sweep:
        result["sweep"] = sweep(time.time() + args.sweep_seconds)
    if args.sweep_decode:
        result["sweep_decode"] = sweep_decode(time.time() + args.sweep_seconds)
        args.sweep = args.sweep_only = True
    jobs = [lambda c=c: bench_lora(c) for c in LORA_CASES] + [bench_meta] + \
           [lambda n=n: bench_decode(n) for n in (512, 1024, 4096)] + [bench_prefill]
    if args.lora_only or args.match:
        jobs = [lambda c=c: bench_lora(c) for c in LORA_CASES if args.match in c.name]
    if args.sweep and args.sweep_only:
        jobs = []
    for job in jobs:
        try:
            rows = job()
        except Exception:
            traceback.print_exc()
            continue
        for row in rows if isinstance(rows, list) else [rows]:
            result["rows"].append(row)
            print(row, flush=True)
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print()
    print(header)
    print("| case | us | no PDL us | MB moved | GB/s | frac all | frac target | torch ref us | speed-up | x split "
          "| vLLM us | target | met | rel err |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |")
    for r in result["rows"]:
        print(f"| {r['case']} | {r['us']:.1f} | {fmt(r.get('no_pdl_pair_us'), '.1f')} | "
              f"{fmt(r.get('mb'), '.1f')} | {fmt(r.get('gbps'), '.0f')} | "
              f"{fmt(r.get('frac_all'), '.2f')} | {fmt(r.get('frac_target'), '.2f')} | {fmt(r.get('ref_us'), '.1f')} | "
              f"{fmt(r.get('speedup'), '.1f')} | {fmt(r.get('vs_split'), '.2f')} | {fmt(r.get('vllm_us'), '.1f')} | "
              f"{r.get('target', '-')} | {r.get('met', '-')} | {fmt(r.get('rel_err'), '.1e')} |")


if __name__ == "__main__":
    main()
