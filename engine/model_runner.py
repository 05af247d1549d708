"""Owns the weights and the unified page pool on the device, and runs one scheduled step."""
from __future__ import annotations

import contextlib
import logging

import torch

from engine.adapters import PackedAdapter
from engine.decode_graphs import DecodeGraphs
from engine.checkpoint import load_weights, random_weights
from engine.config import EngineConfig, ModelConfig
from engine.lora_batch import GROUPS, LoRABatch, group_layout
from engine.model import AttentionMetadata, Transformer
from engine.ops import Ops, to_device
from engine.page_manager import PageManager
from engine.sampler import StepLogprobs, TokenLogprobs, mark_non_finite, sample
from engine.scheduler import StepPlan
from engine.step_inputs import StepInputs, prepare

logger = logging.getLogger("multilora")


class SampledTokens:
    """The tokens of one launched step, on their way to the host, with their log probabilities
    for the requests that asked.

    On CUDA they are copied into pinned buffers behind one event, so launching the step does not
    wait for it; ``get`` does. ``seqs``: the sequences that sampled, in row order.
    """

    def __init__(self, seqs: list, tokens: torch.Tensor, host: torch.Tensor | None,
                 logprobs: StepLogprobs | None = None) -> None:
        self.seqs = seqs
        self._event = None
        self._logprobs = logprobs
        if host is None:
            self._host = tokens
        else:
            self._host = host[:tokens.shape[0]]
            self._host.copy_(tokens, non_blocking=True)
            if logprobs is not None:
                self._logprobs = StepLogprobs(logprobs.rows, _to_pinned(logprobs.values), _to_pinned(logprobs.ids))
            self._event = torch.cuda.Event()
            self._event.record()

    def get(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()

    def get_logprobs(self) -> list[TokenLogprobs | None]:
        """One per row, after ``get``: None where the request did not ask for logprobs."""
        out: list[TokenLogprobs | None] = [None] * len(self.seqs)
        lp = self._logprobs
        if lp is None:
            return out
        for row, values, ids in zip(lp.rows, lp.values.tolist(), lp.ids.tolist()):
            k = self.seqs[row].params.logprobs
            out[row] = TokenLogprobs(values[0], ids[0], ids[1:k + 1], values[1:k + 1])
        return out


def _to_pinned(device_tensor: torch.Tensor) -> torch.Tensor:
    # PyTorch's pinned-memory allocator reuses a buffer only once the copies into it are done
    host = torch.empty(device_tensor.shape, dtype=device_tensor.dtype, pin_memory=True)
    return host.copy_(device_tensor, non_blocking=True)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_DEFAULT_POOL_BYTES = 256 << 20


def pick_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(config.device if config.device != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.dtype != "auto":
        return device, _DTYPES[config.dtype]
    return device, (torch.float16 if device.type == "cuda" else torch.float32)


class ModelRunner:
    # this rank's tensor-parallel group (engine/tp_runner.py's ShardRunner); None: the whole model
    tp = None

    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int) -> None:
        self.config = config
        self.model_config = model_config
        self.device, self.dtype = pick_device_dtype(config)
        weights = self._load_weights()
        self.ops = Ops(use_kernels=config.kernels == "triton" or (config.kernels == "auto" and self.device.type == "cuda"))
        self.model = Transformer(model_config, weights, max_model_len, self.ops, self.tp)
        c = model_config
        self.block_size = config.block_size
        # one page = one KV block (K and V, block_size tokens) per layer
        self.page_size = 2 * self.block_size * c.num_kv_heads * c.head_dim
        self.out_sizes = {m: n_out for m, (_, n_out) in c.projection_shapes().items()}
        self.num_pages = self._num_pages()
        # one page more than the page manager hands out: the scratch page, which the decode graphs'
        # padding rows read and write and block tables are padded with; no request reads it
        self.pool = torch.zeros(self.num_pages + 1, c.num_layers, self.page_size, dtype=self.dtype,
                                device=self.device)
        self.kv_caches = self._kv_views(self.pool)
        self.copy_stream = None  # side stream for adapter prefetch, made on first use
        # the latest step's sampled tokens on the device: the next step reads its pending tokens
        # (async scheduling) from here, by row; pinned host buffers for two steps in flight
        max_rows = max(config.max_num_seqs, 512)
        self.token_buf = torch.zeros(max_rows, dtype=torch.int64, device=self.device)
        self._host_tokens = ([torch.zeros(max_rows, dtype=torch.int64, pin_memory=True) for _ in range(2)]
                             if self.device.type == "cuda" else None)
        self._num_launched = 0
        self.graphs = self._decode_graphs(max_model_len)
        if self.graphs is not None:
            self.graphs.capture_all()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        logger.info("%s on %s/%s: pool of %d pages x %.2f MiB (%d tokens of KV each)",
                    c.architecture, self.device, self.dtype, self.num_pages, self.page_bytes / 2**20,
                    self.block_size)

    def _load_weights(self) -> dict[str, torch.Tensor]:
        if self.config.load_format == "dummy":
            return random_weights(self.model_config, self.dtype, self.device, self.config.seed)
        return load_weights(self.config.model, self.model_config, self.dtype, self.device)

    def shard_adapter(self, packed: PackedAdapter) -> PackedAdapter:
        """The adapter as this runner's pool holds it (every rank's shard under tensor parallelism)."""
        return packed

    def close(self) -> None:
        """Stop what the runner started (tensor-parallel workers); the runner is unusable after."""

    def _decode_graphs(self, max_model_len: int) -> DecodeGraphs | None:
        mode = self.config.decode_graphs
        capture = mode == "auto" and self.device.type == "cuda" and self.ops.use_kernels
        if not capture and mode != "static":
            return None
        shapes = self.model_config.projection_shapes()
        largest = self.config.max_lora_rank * sum(n_in + n_out for n_in, n_out in shapes.values())
        return DecodeGraphs(self, self.config.max_num_seqs, max_model_len, -(-largest // self.page_size),
                            self.config.max_lora_rank, capture)

    @property
    def page_bytes(self) -> int:
        return self.model_config.num_layers * self.page_size * self.dtype.itemsize

    def _kv_views(self, pool: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.model_config
        views = []
        for layer in range(c.num_layers):
            kv = pool[:, layer].view(pool.shape[0], 2, self.block_size, c.num_kv_heads, c.head_dim)
            views.append((kv[:, 0], kv[:, 1]))  # each [P, BS, KVH, D], page stride L * PAGE
        return views

    def _num_pages(self) -> int:
        cfg = self.config
        if cfg.num_pages is not None:
            return cfg.num_pages
        if cfg.pool_memory_bytes is not None:
            return max(1, cfg.pool_memory_bytes // self.page_bytes)
        if self.device.type != "cuda":
            return max(1, CPU_DEFAULT_POOL_BYTES // self.page_bytes)
        peak = self._profile_peak_bytes()
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = int(total * cfg.gpu_memory_utilization) - peak
        if budget < self.page_bytes:
            raise RuntimeError(f"no GPU memory left for the page pool: weights and activations take "
                               f"{peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB; raise gpu_memory_utilization")
        return budget // self.page_bytes

    def _profile_peak_bytes(self) -> int:
        """Peak memory of a forward pass over max_num_batched_tokens tokens, on a scratch pool."""
        c, cfg = self.model_config, self.config
        num_tokens = cfg.max_num_batched_tokens
        blocks = -(-num_tokens // self.block_size)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        scratch = torch.zeros(blocks, c.num_layers, self.page_size, dtype=self.dtype, device=self.device)
        attn = AttentionMetadata(
            positions=torch.arange(num_tokens, device=self.device) % c.max_position_embeddings,
            slot_mapping=torch.arange(num_tokens, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=self.device)[None],
            max_query_len=num_tokens, max_seq_len=num_tokens)
        lora = LoRABatch(self.ops, None, None, {})
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        self.model.forward(ids, attn, lora, scratch, self._kv_views(scratch),
                           torch.arange(min(num_tokens, cfg.max_num_seqs), device=self.device))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - scratch.numel() * scratch.element_size()
        if self.ops.lora_into_gemm:  # a prefill step's LoRA addend beside its largest projection (LoRABatch.linear)
            peak += num_tokens * max(sum(group_layout(g, self.out_sizes)[1]) for g in GROUPS) * self.dtype.itemsize
        del scratch
        torch.cuda.empty_cache()
        return peak

    def load_adapter(self, packed: PackedAdapter, pages: list[int], prefetch: bool = False):
        """Copy an adapter from host memory into its pool pages.

        With ``prefetch`` on CUDA the copy runs on a side stream and this returns an event to poll
        (the caller keeps the returned handle alive until the event completes); otherwise the copy
        is ordered on the current stream and None is returned.
        """
        stream = None
        if prefetch and self.device.type == "cuda":
            if self.copy_stream is None:
                self.copy_stream = torch.cuda.Stream(self.device)
            stream = self.copy_stream
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the pages' last readers go first
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            staging = self._write_pages(packed.data, pages)
            if stream is None:
                return None
            event = torch.cuda.Event()
            event.record(stream)
        return event, staging

    def _write_pages(self, data: torch.Tensor, pages: list[int]) -> torch.Tensor:
        """data: [L, n * PAGE] on the host -> pool pages ``pages`` (n of them); returns the staging copy."""
        # one contiguous DMA from (pinned) host memory, then the scatter into pages on the device
        staging = data.to(self.device, non_blocking=True)  # [L, n * PAGE]
        index = to_device(pages, torch.int64, self.device)
        pages_first = staging.view(data.shape[0], len(pages), self.page_size).transpose(0, 1)  # [n, L, PAGE]
        self.pool.index_copy_(0, index, pages_first)
        return staging

    def run(self, plan: StepPlan, pages: PageManager, adapters: dict[str, PackedAdapter],
            eos_token_ids: tuple[int, ...]) -> SampledTokens:
        """Launch one step; returns the tokens of the sequences that sample (none in a step of
        prefill chunks only).

        A token that is still pending (sampled by the previous step, not on the host yet) is read
        from ``token_buf`` on the device, at the row the sequence's ``pending_row`` names."""
        step = prepare(plan, pages, adapters)
        sampling_seqs = step.sampling_seqs
        if self.graphs is not None and step.is_decode and self.graphs.bucket(len(step.input_ids)):
            logits = self.graphs.run(step)  # [S, V]; in a decode step token i is sequence i's
            if len(sampling_seqs) != len(step.seq_lens):
                rows = step.logits_indices
                logits = logits[to_device(rows, torch.int64, self.device)] if rows else logits[:0]
        else:
            logits = self._forward_eager(step)
        return self._sample(logits, sampling_seqs, eos_token_ids)

    def _sample(self, logits: torch.Tensor, sampling_seqs: list, eos_token_ids: tuple[int, ...]) -> SampledTokens:
        if not sampling_seqs:
            return SampledTokens([], torch.zeros(0, dtype=torch.int64), None)
        tokens, logprobs = sample(logits, sampling_seqs, eos_token_ids, self.generator)
        self.token_buf[:tokens.shape[0]].copy_(tokens)  # ids in the vocabulary: the next step may feed them
        self._tokens_sampled(tokens.shape[0])
        tokens = mark_non_finite(logits, tokens)  # the host sees NON_FINITE where a row's logits are not finite
        host = None if self._host_tokens is None else self._host_tokens[self._num_launched % 2]
        self._num_launched += 1
        return SampledTokens(sampling_seqs, tokens, host, logprobs)

    def _tokens_sampled(self, num_tokens: int) -> None:
        """token_buf[:num_tokens] holds the step's sampled tokens (other ranks take them here)."""

    def _lora_batch(self, step: StepInputs) -> LoRABatch:
        return LoRABatch.build(self.ops, step, self.out_sizes, self.device)

    def _forward_eager(self, step: StepInputs) -> torch.Tensor:
        """Logits [N, V] of the sampling sequences, the step's inputs sent to the device as they are."""
        dev = self.device
        max_blocks = max(len(t) for t in step.block_tables)
        attn = AttentionMetadata(
            positions=to_device(step.positions, torch.int64, dev),
            slot_mapping=to_device(step.slot_mapping, torch.int64, dev),
            query_start_loc=to_device(step.query_start_loc, torch.int32, dev),
            seq_lens=to_device(step.seq_lens, torch.int32, dev),
            # padded with the scratch page (no request's), not page 0 (some request's)
            block_tables=to_device([t + [self.num_pages] * (max_blocks - len(t)) for t in step.block_tables],
                                   torch.int32, dev),
            max_query_len=step.max_query_len,
            max_seq_len=max(step.seq_lens),
        )
        lora = self._lora_batch(step)
        ids = to_device(step.input_ids, torch.int64, dev)
        if step.feeds:
            dst, src = zip(*step.feeds)
            ids[to_device(list(dst), torch.int64, dev)] = self.token_buf[to_device(list(src), torch.int64, dev)]
        return self.model.forward(ids, attn, lora, self.pool, self.kv_caches,
                                  to_device(step.logits_indices, torch.int64, dev))
