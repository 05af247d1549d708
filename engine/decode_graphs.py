"""Decode steps on static buffers, replayed as CUDA graphs (one per batch-size bucket).

A decode step of B sequences is padded to the next bucket: padding rows read and write only the
pool's scratch page and use no adapter. Every per-step input (token ids, positions, KV slots,
block tables, LoRA slots, page tables, ranks, offsets, scales) is copied into buffers whose
addresses never change, so one captured graph serves any mix of sequences and adapters. A
bucket has a graph per set of projection groups that the step's adapters touch (none, attention
only, all: captured at start; others when first needed), so a step runs no LoRA kernel of a
group that no adapter of it has. With
``capture=False`` the same buffers run eagerly: the CPU twin that tests the padding and tables.
"""
from __future__ import annotations

import logging

import torch

from engine.lora_batch import GROUPS, GroupMeta, LoRABatch, group_layout, host_tables
from engine.model import AttentionMetadata

logger = logging.getLogger("multilora")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class DecodeGraphs:
    def __init__(self, runner, max_num_seqs: int, max_model_len: int, max_adapter_pages: int, max_lora_rank: int,
                 capture: bool) -> None:
        self.runner = runner
        self.capture = capture
        self.buckets = [b for b in BUCKETS if b < max_num_seqs] + [min(b for b in BUCKETS if b >= max_num_seqs)]
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        size = self.buckets[-1]
        dev, bs = runner.device, runner.block_size
        self.scratch_page = runner.num_pages  # the pool's last page belongs to no one
        max_blocks = -(-max_model_len // bs)
        i32, i64 = dict(dtype=torch.int32, device=dev), dict(dtype=torch.int64, device=dev)
        self.input_ids = torch.zeros(size, **i64)
        self.positions = torch.zeros(size, **i64)
        self.slot_mapping = torch.full((size,), self.scratch_page * bs, **i64)
        self.query_start_loc = torch.arange(size + 1, **i32)
        self.seq_lens = torch.ones(size, **i32)
        self.block_tables = torch.full((size, max_blocks), self.scratch_page, **i32)
        self.logits_indices = torch.arange(size, **i64)
        self.token_slots = torch.full((size,), -1, **i32)
        self.page_tables = torch.zeros(size, max(1, max_adapter_pages), **i32)
        self.groups = {}
        for group, modules in GROUPS.items():
            n = len(modules)
            self.groups[group] = (torch.zeros(size, n, **i32), torch.zeros(size, n, **i64), torch.zeros(size, n, **i64),
                                  torch.zeros(size, n, dtype=torch.float32, device=dev))
        # (bucket, projection groups with LoRA) -> (graph, its logits buffer)
        self.graphs: dict[tuple[int, frozenset[str]], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mempool = None

    def bucket(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]], token_adapters: list[str | None], adapters, adapter_pages) -> torch.Tensor:
        """Logits [n, V] of a decode step of n sequences (one new token each)."""
        n = len(input_ids)
        b = self.bucket(n)
        pad = b - n
        bs = self.runner.block_size
        self._fill(self.input_ids, input_ids + [0] * pad)
        self._fill(self.positions, positions + [0] * pad)
        self._fill(self.slot_mapping, slots + [self.scratch_page * bs] * pad)
        self._fill(self.seq_lens, seq_lens + [1] * pad)
        # Only the blocks below a row's seq_len are read: the step's widest table, and the first
        # block of the padding rows (the scratch page); older columns may hold stale pages.
        width = max(len(t) for t in tables)
        host = torch.tensor([t + [self.scratch_page] * (width - len(t)) for t in tables]
                            + [[self.scratch_page] * width] * pad, dtype=torch.int32)
        self.block_tables[:b, :width].copy_(host)
        lora = self._fill_lora(b, pad, token_adapters, adapters, adapter_pages) if adapters else frozenset()
        if not self.capture:
            return self._forward(b, lora)[:n]
        if (b, lora) not in self.graphs:
            self._capture(b, lora)
        graph, logits = self.graphs[b, lora]
        graph.replay()
        return logits[:n]

    def _fill_lora(self, b: int, pad: int, token_adapters: list[str | None], adapters,
                   adapter_pages) -> frozenset[str]:
        """Fill the LoRA buffers; returns the groups that some adapter of the step has."""
        token_slots, page_tables, groups = host_tables(token_adapters, adapters, adapter_pages, self.runner.out_sizes)
        self._fill(self.token_slots, token_slots + [-1] * pad)
        pages = self.page_tables.shape[1]
        self._fill(self.page_tables, [t + [0] * (pages - len(t)) for t in page_tables], rows=len(page_tables))
        for group, (ranks, a_off, b_off, scales) in groups.items():
            buffers = self.groups[group]
            rows = len(ranks)
            buffers[0][rows:b].zero_()  # slots past the step's adapters: rank 0, nothing read
            for buffer, values in zip(buffers, (ranks, a_off, b_off, scales)):
                self._fill(buffer, values, rows=rows)
        return frozenset(g for g, (ranks, *_rest) in groups.items() if any(any(row) for row in ranks))

    def _fill(self, buffer: torch.Tensor, values, rows: int | None = None) -> None:
        host = torch.tensor(values, dtype=buffer.dtype)
        buffer[:host.shape[0] if rows is None else rows].copy_(host, non_blocking=False)

    def _forward(self, b: int, lora: frozenset[str]) -> torch.Tensor:
        runner = self.runner
        attn = AttentionMetadata(positions=self.positions[:b], slot_mapping=self.slot_mapping[:b],
                                 query_start_loc=self.query_start_loc[:b + 1], seq_lens=self.seq_lens[:b],
                                 block_tables=self.block_tables[:b], max_query_len=1, max_seq_len=self.max_model_len)
        if lora:
            groups = {}
            for group in lora:
                ranks, a_off, b_off, scales = self.groups[group]
                offsets, sizes = group_layout(group, runner.out_sizes)
                groups[group] = GroupMeta(ranks[:b], a_off[:b], b_off[:b], scales[:b], offsets, sizes,
                                          self.max_lora_rank)
            batch = LoRABatch(runner.ops, self.token_slots[:b], self.page_tables[:b], groups)
        else:
            batch = LoRABatch(runner.ops, None, None, {})
        return runner.model.forward(self.input_ids[:b], attn, batch, runner.pool, runner.kv_caches,
                                    self.logits_indices[:b])

    def capture_all(self) -> None:
        """Capture every bucket now, on the all-padding buffers (scratch page, no adapter).

        Done once when the engine starts, before any request or adapter-loader thread exists: a
        capture then never meets another thread's CUDA work, and no step pays for one."""
        if not self.capture:
            return
        for b in self.buckets:
            for lora in (frozenset(), frozenset(("qkv", "o")), frozenset(GROUPS)):
                self._capture(b, lora)
        torch.cuda.synchronize(self.runner.device)

    def _capture(self, b: int, lora: frozenset[str]) -> None:
        """Warm up (compiles the Triton kernels) on a side stream, then capture.

        ``thread_local``: CUDA calls of other threads (the Python backend's own, a pinned-memory
        allocation of an adapter loader) neither break the capture nor are broken by it."""
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            self._forward(b, lora)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool, capture_error_mode="thread_local"):
            logits = self._forward(b, lora)
        self.mempool = graph.pool()
        self.graphs[b, lora] = (graph, logits)
        logger.info("[multilora] captured the decode graph of batch bucket %d (LoRA on: %s)", b,
                    ", ".join(sorted(lora)) or "none")
