"""Tensor parallelism: the shape of one rank's shard, and the collectives of the sharded model.

N ranks run the same model, Megatron-style: q, k, v, gate and up are column-parallel (each rank
holds a slice of their output rows), o and down row-parallel (a slice of their input columns,
one all-reduce each), the embedding and lm_head vocabulary-parallel. Rank 0 also schedules and
samples; the others follow its plans (engine/tp_runner.py).

Two process groups: the device group (NCCL on CUDA, gloo on CPU) carries the model's
collectives; a gloo group carries the per-step plan from rank 0, on the host, so sending it
never waits for the device.
"""
from __future__ import annotations

import dataclasses
import datetime
import pickle
import time
from typing import Callable

import torch
import torch.distributed as dist

from engine.config import ModelConfig

# Followers wait for rank 0's next plan on the host group for as long as the server is idle; a
# collective of the model's waits at most COLLECTIVE_TIMEOUT (ranks load their weights at once).
PLAN_TIMEOUT = datetime.timedelta(days=365)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=600)
# torch 2.13 renames all_gather_into_tensor (2.11 has only the old name)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Which part of the full model rank ``rank`` of ``size`` holds.

    KV heads are split when there are at least ``size`` of them; with fewer, each rank holds one
    KV head, the one its query heads read (replicated size / num_kv_heads times, as vLLM does).
    """

    rank: int
    size: int
    num_heads: int  # per rank
    num_kv_heads: int  # per rank
    kv_head_start: int  # first KV head of this rank in the full model
    intermediate_size: int  # per rank
    vocab_size: int  # per rank, of the padded vocabulary
    vocab_start: int
    full_vocab_size: int
    hidden_size: int  # the full hidden size (row layers' outputs, replicated)
    fully_sharded_loras: bool

    @classmethod
    def of(cls, config: ModelConfig, rank: int, size: int, fully_sharded_loras: bool = False) -> "ShardLayout":
        """Raises ValueError saying which dimension does not divide by ``size``."""
        check_divisible(config, size, fully_sharded_loras)
        kv = config.num_kv_heads
        if kv >= size:
            kv_local, kv_start = kv // size, rank * (kv // size)
        else:
            kv_local, kv_start = 1, rank // (size // kv)
        vocab_local = -(-config.vocab_size // size)
        return cls(rank=rank, size=size, num_heads=config.num_heads // size, num_kv_heads=kv_local,
                   kv_head_start=kv_start, intermediate_size=config.intermediate_size // size,
                   vocab_size=vocab_local, vocab_start=rank * vocab_local, full_vocab_size=config.vocab_size,
                   hidden_size=config.hidden_size, fully_sharded_loras=fully_sharded_loras)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The model as this rank sees it: its heads, KV heads, MLP columns and vocabulary rows."""
        return dataclasses.replace(config, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                   intermediate_size=self.intermediate_size, vocab_size=self.vocab_size)


def check_divisible(config: ModelConfig, size: int, fully_sharded_loras: bool) -> None:
    what = f"tensor_parallel_size {size}"
    if size < 1:
        raise ValueError(f"engine config: tensor_parallel_size must be >= 1, got {size}")
    if config.num_heads % size:
        raise ValueError(f"engine config: {what} does not divide the model's {config.num_heads} attention heads")
    kv = config.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        raise ValueError(f"engine config: {what} and the model's {kv} KV heads: one must divide the other")
    if config.intermediate_size % size:
        raise ValueError(f"engine config: {what} does not divide the model's intermediate_size "
                         f"{config.intermediate_size}")
    if fully_sharded_loras and config.hidden_size % size:
        raise ValueError(f"engine config: fully_sharded_loras needs hidden_size {config.hidden_size} to divide "
                         f"by {what}")


class TensorParallel:
    """This process's rank in the group, and the collectives the sharded model calls."""

    def __init__(self, layout: ShardLayout, device: torch.device, store_path: str,
                 waiting: Callable[[], None] | None = None) -> None:
        """Meet the other ranks through a file store at ``store_path`` (in a private directory).
        Rank 0 first waits until every rank has said it is there, calling ``waiting()`` meanwhile
        (which raises to give up: a rank that died would be waited for until the timeout)."""
        self.layout = layout
        self.rank, self.size = layout.rank, layout.size
        self.device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = dist.FileStore(store_path, self.size)
        if self.rank:
            store.set(f"multilora/present/{self.rank}", b"1")
        else:
            keys = [f"multilora/present/{r}" for r in range(1, self.size)]
            while not store.check(keys):
                if waiting is not None:
                    waiting()
                time.sleep(0.02)
        # NCCL: bound to this rank's device, its communicator made now (not at the first collective)
        bound = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.size,
                                timeout=COLLECTIVE_TIMEOUT, **bound)
        self.group = dist.group.WORLD
        self.host_group = dist.new_group(backend="gloo", timeout=PLAN_TIMEOUT)
        self._vocab_end = layout.vocab_start + layout.vocab_size

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # --- the model's collectives -------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> None:
        """Sum of every rank's x, in place (the row-parallel layers' partial outputs)."""
        dist.all_reduce(x, group=self.group)

    def embed(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel lookup. table: [V/N, H] this rank's rows; ids: [T] -> [T, H]."""
        local = ids - self.layout.vocab_start
        outside = (ids < self.layout.vocab_start) | (ids >= self._vocab_end)
        hidden = table.index_select(0, local.masked_fill(outside, 0))
        hidden.masked_fill_(outside[:, None], 0)
        self.all_reduce(hidden)  # each id's row comes from the one rank that holds it
        return hidden

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor | None:
        """logits: [N, V/N] of this rank's vocabulary rows -> [N, V] on rank 0, None elsewhere."""
        if self.rank != 0:
            dist.gather(logits, None, dst=0, group=self.group)
            return None
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.gather(logits, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=1)[:, :self.layout.full_vocab_size]

    def all_gather_ranks(self, z: torch.Tensor) -> torch.Tensor:
        """z: [T, NPROJ, R] this rank's rows of the LoRA rank (rank j holds rows j, j+N, ...) ->
        [T, NPROJ, R * N] in the adapter's own row order."""
        t, num_proj, r = z.shape
        parts = torch.empty(self.size * t, num_proj, r, dtype=z.dtype, device=z.device)  # [N * T, NPROJ, R]
        _all_gather_single(parts, z.contiguous(), group=self.group)
        return parts.view(self.size, t, num_proj, r).permute(1, 2, 3, 0).reshape(t, num_proj, r * self.size)

    def broadcast(self, x: torch.Tensor) -> None:
        """Rank 0's x to every rank, in place (the sampled tokens, on the device)."""
        dist.broadcast(x, src=0, group=self.group)

    # --- rank 0's plans, on the host group -----------------------------------------------------
    def send_plan(self, message) -> None:
        """Rank 0: one message to every other rank (pickled once, two host broadcasts)."""
        data = torch.frombuffer(bytearray(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)),
                                dtype=torch.uint8)
        dist.broadcast(torch.tensor([data.numel()], dtype=torch.int64), src=0, group=self.host_group)
        dist.broadcast(data, src=0, group=self.host_group)

    def recv_plan(self):
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.host_group)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=self.host_group)
        return pickle.loads(data.numpy().tobytes())

    def scatter_host(self, shards: list[torch.Tensor] | None, out: torch.Tensor) -> None:
        """Rank 0's ``shards[j]`` into rank j's ``out`` (host tensors of one shape)."""
        dist.scatter(out, shards if self.rank == 0 else None, src=0, group=self.host_group)

    def gather_host(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.host_group)
        return parts

    def min_host(self, value: int) -> int:
        """The smallest of every rank's ``value`` (the pool's page count, which all ranks share)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.host_group)
        return int(t.item())
