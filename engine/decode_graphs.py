"""Decode steps on static buffers, replayed as CUDA graphs (one per batch-size bucket).

A decode step of B sequences is padded to the next bucket (a step larger than every bucket runs
eagerly instead): padding rows read and write only the pool's scratch page and use no adapter.
Every per-step input (token ids, positions, KV slots, block tables, LoRA slots, page tables,
ranks, offsets, scales) is written into an InputArena, whose device buffers never move, so one
captured graph serves any mix of sequences and adapters.
A bucket has a graph per set of projection groups that the step's adapters touch and per rank
bound (tiles.lora_rank_bound: the BLOCK_R class of the step's largest rank), so a step launches no
LoRA kernel for a group that none of its adapters has, and rank-16 adapters run the kernels of
rank 16, not of max_lora_rank. None, attention only and all groups are captured at start for every
rank bound, other sets when first needed (or by the warm-up). With ``capture=False`` the same buffers
run eagerly: the CPU twin that tests the padding and tables.
"""
from __future__ import annotations

import logging
import math

import torch

from engine.lora_batch import GROUPS, GroupMeta, LoRABatch, group_layout
from engine.model import AttentionMetadata
from engine.step_inputs import StepInputs
from kernels import tiles

logger = logging.getLogger("multilora")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class InputArena:
    """The graphs' per-step inputs as views of one device buffer, written through numpy views of
    one pinned host buffer of the same layout and sent with a single copy per step.

    One copy instead of one per input matters twice: each torch call of the engine thread lets
    go of the GIL, and getting it back from a busy response thread (the Triton model) can take a
    switch interval. ``staged`` (default: on CUDA) keeps a separate host buffer; without it, on
    CPU, the host views are the device memory and nothing is copied.
    """

    ALIGN = 64  # bytes; every input starts aligned

    def __init__(self, specs: list[tuple[str, tuple[int, ...], torch.dtype]], device: torch.device,
                 staged: bool | None = None) -> None:
        layout, total = {}, 0
        for name, shape, dtype in specs:
            total = -(-total // self.ALIGN) * self.ALIGN
            nbytes = math.prod(shape) * dtype.itemsize
            layout[name] = (total, nbytes, shape, dtype)
            total += nbytes
        self.layout = layout
        self.device_bytes = torch.zeros(total, dtype=torch.uint8, device=device)
        self.staged = device.type == "cuda" if staged is None else staged
        self.host_bytes = (torch.zeros(total, dtype=torch.uint8, pin_memory=device.type == "cuda") if self.staged
                           else self.device_bytes)
        self.device = {n: self._view(self.device_bytes, n) for n in layout}
        self.host = {n: self._view(self.host_bytes, n).numpy() for n in layout}
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._in_flight = False

    def _view(self, buffer: torch.Tensor, name: str) -> torch.Tensor:
        offset, nbytes, shape, dtype = self.layout[name]
        return buffer[offset:offset + nbytes].view(dtype).view(shape)

    def end_of(self, name: str, rows: int) -> int:
        """Byte offset just past the first ``rows`` rows of an input."""
        offset, nbytes, shape, _ = self.layout[name]
        return offset + nbytes // shape[0] * rows

    def wait(self) -> None:
        """Before writing the host buffer: the previous step's copy has left it."""
        if self._in_flight:
            self._copied.synchronize()
            self._in_flight = False

    def upload(self, num_bytes: int) -> None:
        """Send the first ``num_bytes`` of the host buffer, ordered before the step's replay."""
        if self.staged:
            self.device_bytes[:num_bytes].copy_(self.host_bytes[:num_bytes], non_blocking=True)
            if self._copied is not None:
                self._copied.record()
                self._in_flight = True


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int, max_model_len: int, max_adapter_pages: int, max_lora_rank: int,
                 capture: bool) -> None:
        self.runner = runner
        self.capture = capture
        # Buckets up to the first one that holds max_num_seqs, and never past BUCKETS[-1]: a larger
        # decode step runs eagerly (``bucket`` is None). At that size a step is bound by the GPU's
        # arithmetic, so the launch overhead a graph saves is small, while a bucket of max_num_seqs
        # would add three captures at start and pad, say, 513 sequences to max_num_seqs rows.
        self.buckets = [b for b in BUCKETS if b < max_num_seqs] + [b for b in BUCKETS if b >= max_num_seqs][:1]
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        size = self.buckets[-1]
        dev, bs = runner.device, runner.block_size
        self.scratch_page = runner.num_pages  # the pool's last page belongs to no one
        max_blocks = -(-max_model_len // bs)
        i32, i64, f32 = torch.int32, torch.int64, torch.float32
        specs = [("input_ids", (size,), i64), ("feed_rows", (size,), i64), ("positions", (size,), i64),
                 ("slot_mapping", (size,), i64), ("seq_lens", (size,), i32), ("token_slots", (size,), i32),
                 ("page_tables", (size, max(1, max_adapter_pages)), i32)]
        for group, modules in GROUPS.items():
            n = len(modules)
            specs += [(f"{group}.ranks", (size, n), i32), (f"{group}.a_offsets", (size, n), i64),
                      (f"{group}.b_offsets", (size, n), i64), (f"{group}.scales", (size, n), f32)]
        specs.append(("block_tables", (size, max_blocks), i32))  # last: a step sends only its rows
        self.arena = InputArena(specs, dev)
        host = self.arena.host
        host["slot_mapping"][:] = self.scratch_page * bs
        host["feed_rows"][:] = -1
        host["seq_lens"][:] = 1
        host["token_slots"][:] = -1
        host["block_tables"][:] = self.scratch_page
        self.arena.upload(self.arena.device_bytes.numel())
        self.query_start_loc = torch.arange(size + 1, dtype=i32, device=dev)
        self.logits_indices = torch.arange(size, dtype=i64, device=dev)
        # (bucket, projection groups with LoRA, rank bound; 0 without LoRA) -> (graph, its logits buffer)
        self.graphs: dict[tuple[int, frozenset[str], int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.rank_bounds = sorted({tiles.lora_rank_bound(r, max_lora_rank) for r in range(1, max_lora_rank + 1)})
        self.mempool = None
        self._retired: list[tuple[torch.cuda.CUDAGraph, torch.Tensor]] = []

    def bucket(self, num_seqs: int) -> int | None:
        """The bucket a decode step of ``num_seqs`` sequences is padded to; None above the largest."""
        return next((b for b in self.buckets if b >= num_seqs), None)

    def run(self, step: StepInputs) -> torch.Tensor:
        """Logits [n, V] of a decode step of n <= buckets[-1] sequences (one new token each, so
        token i is sequence i's); its pending tokens are fed from the runner's token_buf."""
        n = len(step.input_ids)
        b = self.bucket(n)
        self.arena.wait()
        host = self.arena.host
        host["input_ids"][:n] = step.input_ids
        host["input_ids"][n:b] = 0
        feed_rows = host["feed_rows"]
        feed_rows[:b] = -1
        for row, src in step.feeds:
            feed_rows[row] = src
        host["positions"][:n] = step.positions
        host["positions"][n:b] = 0
        host["slot_mapping"][:n] = step.slot_mapping
        host["slot_mapping"][n:b] = self.scratch_page * self.runner.block_size
        host["seq_lens"][:n] = step.seq_lens
        host["seq_lens"][n:b] = 1
        # Only the blocks below a row's seq_len are read: the step's tables, and the first block of
        # the padding rows. Columns past a table may name stale pages of other requests (attention
        # masks their values); a padding row's whole table is the scratch page, so even a gather
        # of the padded width (the reference op) touches no page that a request owns.
        block_tables = host["block_tables"]
        for row, table in enumerate(step.block_tables):
            block_tables[row, :len(table)] = table
        block_tables[n:b] = self.scratch_page
        lora, bound = self._fill_lora(b, step) if step.adapter_pages else (frozenset(), 0)
        self.arena.upload(self.arena.end_of("block_tables", b))
        if not self.capture:
            return self._forward(b, lora, bound)[:n]
        if (b, lora, bound) not in self.graphs:
            self._capture(b, lora, bound)
        graph, logits = self.graphs[b, lora, bound]
        graph.replay()
        return logits[:n]

    def _fill_lora(self, b: int, step: StepInputs) -> tuple[frozenset[str], int]:
        """Write the LoRA tables; returns the groups that some adapter of the step has, and the
        step's rank bound (0 when none has any)."""
        host = self.arena.host
        n = len(step.token_slots)
        host["token_slots"][:n] = step.token_slots
        host["token_slots"][n:b] = -1
        for row, pages in enumerate(step.adapter_pages):
            host["page_tables"][row, :len(pages)] = pages
        present, max_rank = [], 0
        for group, (ranks, a_off, b_off, scales) in step.lora_groups.items():
            rows = len(ranks)
            host[f"{group}.ranks"][:rows] = ranks
            host[f"{group}.ranks"][rows:b] = 0  # slots past the step's adapters: rank 0, nothing read
            host[f"{group}.a_offsets"][:rows] = a_off
            host[f"{group}.b_offsets"][:rows] = b_off
            host[f"{group}.scales"][:rows] = scales
            group_max = max((max(row) for row in ranks), default=0)
            if group_max:
                present.append(group)
                max_rank = max(max_rank, group_max)
        return frozenset(present), tiles.lora_rank_bound(max_rank, self.max_lora_rank) if present else 0

    def _forward(self, b: int, lora: frozenset[str], bound: int) -> torch.Tensor:
        runner, dev = self.runner, self.arena.device
        attn = AttentionMetadata(positions=dev["positions"][:b], slot_mapping=dev["slot_mapping"][:b],
                                 query_start_loc=self.query_start_loc[:b + 1], seq_lens=dev["seq_lens"][:b],
                                 block_tables=dev["block_tables"][:b], max_query_len=1,
                                 max_seq_len=self.max_model_len)
        if lora:
            groups = {}
            for group in lora:
                offsets, sizes = group_layout(group, runner.out_sizes)
                groups[group] = GroupMeta(dev[f"{group}.ranks"][:b], dev[f"{group}.a_offsets"][:b],
                                          dev[f"{group}.b_offsets"][:b], dev[f"{group}.scales"][:b], offsets, sizes,
                                          bound)
            batch = LoRABatch(runner.ops, dev["token_slots"][:b], dev["page_tables"][:b], groups)
        else:
            batch = LoRABatch(runner.ops, None, None, {})
        feed = dev["feed_rows"][:b]
        ids = torch.where(feed >= 0, runner.token_buf[feed.clamp(min=0)], dev["input_ids"][:b])
        return runner.model.forward(ids, attn, batch, runner.pool, runner.kv_caches, self.logits_indices[:b])

    def recapture_lazily(self) -> None:
        """Forget the captured graphs: the next step of each bucket captures its own, e.g. after
        Ops' LoRA schedule changed (bench/engine.py --lora-schedule). They stay referenced, never
        replayed: freeing them would free the memory pool the graphs to come are captured into."""
        self._retired += self.graphs.values()
        self.graphs.clear()

    def capture_all(self) -> None:
        """Capture every bucket now, on the all-padding buffers (scratch page, no adapter).

        Done once when the engine starts, before any request or adapter-loader thread exists, for
        the group sets most steps use; a step pays for a capture only for a set first seen."""
        if not self.capture:
            return
        for b in self.buckets:
            self._capture(b, frozenset(), 0)
            for lora in (frozenset(("qkv", "o")), frozenset(GROUPS)):
                for bound in self.rank_bounds:
                    self._capture(b, lora, bound)
        torch.cuda.synchronize(self.runner.device)

    def _capture(self, b: int, lora: frozenset[str], bound: int) -> None:
        """Warm up (compiles the Triton kernels) on a side stream, then capture.

        ``thread_local``: CUDA calls of other threads (the Python backend's own, a pinned-memory
        allocation of an adapter loader) neither break the capture nor are broken by it."""
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            self._forward(b, lora, bound)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool, capture_error_mode="thread_local"):
            logits = self._forward(b, lora, bound)
        self.mempool = graph.pool()
        self.graphs[b, lora, bound] = (graph, logits)
        logger.info("captured the decode graph of batch bucket %d (LoRA on: %s%s)", b,
                    ", ".join(sorted(lora)) or "none", f"; ranks up to {bound}" if lora else "")
