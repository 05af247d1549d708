"""Loads the model and KV cache, and runs one scheduled step: tensors in, sampled tokens out."""
from __future__ import annotations

import logging

import torch

from engine.block_manager import BlockManager
from engine.checkpoint import load_weights
from engine.config import EngineConfig, ModelConfig
from engine.lora_batch import LoRABatch
from engine.lora_manager import LoRAManager
from engine.model import AttentionMetadata, Transformer
from engine.sampler import sample
from engine.scheduler import ScheduledSeq

logger = logging.getLogger("multilora")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device_dtype(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(config.device if config.device != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.dtype != "auto":
        return device, _DTYPES[config.dtype]
    return device, (torch.float16 if device.type == "cuda" else torch.float32)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int) -> None:
        self.config = config
        self.model_config = model_config
        self.device, self.dtype = pick_device_dtype(config)
        weights = load_weights(config.model, model_config, self.dtype, self.device)
        self.model = Transformer(model_config, weights, max_model_len)
        self.block_size = config.block_size
        self.num_blocks = self._num_kv_blocks()
        c = model_config
        # [L, 2 (K, V), NB, BS, KVH, D]
        self.kv_cache = torch.zeros(c.num_layers, 2, self.num_blocks, self.block_size, c.num_kv_heads,
                                    c.head_dim, dtype=self.dtype, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        logger.info("[multilora] model %s on %s/%s, %d KV blocks of %d tokens",
                    model_config.architecture, self.device, self.dtype, self.num_blocks, self.block_size)

    def kv_block_bytes(self) -> int:
        c = self.model_config
        return c.num_layers * 2 * self.block_size * c.num_kv_heads * c.head_dim * self.dtype.itemsize

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_memory_bytes is not None:
            budget = self.config.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            # leave room for activations: a rough bound until the memory issue measures the peak
            budget = int(total * self.config.gpu_memory_utilization) - used - (1 << 30)
        else:
            budget = 256 << 20  # CPU: 256 MiB of KV unless told otherwise
        return max(1, budget // self.kv_block_bytes())

    def run(self, batch: list[ScheduledSeq], blocks: BlockManager, lora: LoRAManager,
            eos_token_ids: tuple[int, ...]) -> list[int]:
        """Run one step; returns the sampled token of each sequence that samples, in batch order."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        token_lora: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_indices: list[int] = []
        sampling_seqs = []
        bs = self.block_size
        for item in batch:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            table = blocks.table(seq.request_id)
            tokens = seq.all_token_ids[start:start + n]
            input_ids.extend(tokens)
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            token_lora.extend([seq.lora_slot] * n)
            query_start.append(query_start[-1] + n)
            seq_lens.append(start + n)
            tables.append(table)
            if item.samples:
                logits_indices.append(query_start[-1] - 1)
                sampling_seqs.append(seq)
        max_blocks = max(len(t) for t in tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        dev = self.device
        attn = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            max_query_len=max(item.num_new_tokens for item in batch),
        )
        adapters = {slot: lora.get(slot) for slot in set(token_lora) if slot >= 0}
        lora_batch = LoRABatch(token_lora, adapters, dev)
        logits = self.model.forward(torch.tensor(input_ids, dtype=torch.int64, device=dev), attn, lora_batch,
                                    self.kv_cache, torch.tensor(logits_indices, dtype=torch.int64, device=dev))
        if not sampling_seqs:
            return []
        return sample(logits, sampling_seqs, eos_token_ids, self.generator)
