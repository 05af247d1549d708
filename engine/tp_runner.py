"""Tensor-parallel model runners: rank 0 (in the engine's process) and its follower ranks.

Rank 0 is the engine's own runner: the scheduler, page manager and adapter host tier exist
there only and decide for every rank (the same page ids everywhere). Per step it sends one plan
(the step's inputs, as host lists) to the other ranks over the host group, runs its shard of
the forward pass with them, samples from the gathered logits and broadcasts the sampled tokens
(the next step reads pending tokens from the device, as with one GPU). An adapter load sends
each rank its shard. The followers run ``engine/tp_worker.py``: child processes of rank 0 that
die with it.

If a follower dies, ``on_worker_death``'s callback is called with what happened (the engine
process reports it as an engine failure and exits, and the model goes not-ready).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

import torch

from engine.adapters import PackedAdapter
from engine.config import EngineConfig, ModelConfig
from engine.lora_batch import LoRABatch
from engine.model_runner import ModelRunner, pick_device_dtype
from engine.parallel import ShardLayout, TensorParallel
from engine.sharding import load_shard, shard_adapter
from engine.step_inputs import StepInputs
from engine.tp_lora import FullyShardedLoRABatch

logger = logging.getLogger("multilora")


def make_runner(config: EngineConfig, model_config: ModelConfig, max_model_len: int) -> ModelRunner:
    """The engine's runner: the whole model here, or rank 0 of ``tensor_parallel_size`` ranks."""
    if config.tensor_parallel_size == 1:
        return ModelRunner(config, model_config, max_model_len)
    return DriverRunner.start(config, model_config, max_model_len)


def on_worker_death(runner: ModelRunner, callback: Callable[[str], None]) -> None:
    """Have ``callback(message)`` called (from a watch thread) if a follower rank dies."""
    if isinstance(runner, DriverRunner):
        runner.death_callback = callback


class ShardRunner(ModelRunner):
    """One rank's runner: its shard of the weights, its pool (its KV heads, its adapter shards)."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int,
                 tp: TensorParallel) -> None:
        self.tp = tp
        self.full_config = model_config
        super().__init__(config, tp.layout.local_config(model_config), max_model_len)

    def _load_weights(self) -> dict[str, torch.Tensor]:
        return load_shard(self.config.model, self.full_config, self.tp.layout, self.dtype, self.device,
                          dummy=self.config.load_format == "dummy", seed=self.config.seed)

    def _num_pages(self) -> int:
        return self.tp.min_host(super()._num_pages())  # every rank's pool has the same page ids

    def _decode_graphs(self, max_model_len: int):
        return None  # decode steps run eagerly under tensor parallelism

    def _lora_batch(self, step: StepInputs) -> LoRABatch:
        if self.tp.layout.fully_sharded_loras:
            return FullyShardedLoRABatch.build(self.ops, step, self.out_sizes, self.device).split(self.tp)
        return super()._lora_batch(step)

    def shard_adapter(self, packed: PackedAdapter) -> PackedAdapter:
        return shard_adapter(packed, self.full_config, self.tp.size, self.tp.layout.fully_sharded_loras,
                             self.page_size, pin_memory=self.device.type == "cuda")

    def _receive_pages(self, shards: list[torch.Tensor] | None, num_pages: int, pages: list[int]) -> None:
        data = torch.empty(self.model_config.num_layers, num_pages * self.page_size, dtype=self.dtype)
        self.tp.scatter_host(shards, data)
        self._write_pages(data, pages)

    def _pool_pages(self, pages: list[int]) -> list[torch.Tensor] | None:
        index = torch.tensor(pages, dtype=torch.int64, device=self.device)
        return self.tp.gather_host(self.pool.index_select(0, index).cpu())


class DriverRunner(ShardRunner):
    """Rank 0: the engine's runner, which drives the follower ranks."""

    @classmethod
    def start(cls, config: EngineConfig, model_config: ModelConfig, max_model_len: int) -> "DriverRunner":
        """Start the N - 1 follower processes and meet them (torch.distributed, a file store in a
        private directory, so parallel servers cannot collide)."""
        size = config.tensor_parallel_size
        layout = ShardLayout.of(model_config, 0, size, config.fully_sharded_loras)  # refuses bad sizes first
        rendezvous = tempfile.mkdtemp(prefix="multilora-tp-")
        store = os.path.join(rendezvous, "store")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the stub ignores PYTHONPATH
        workers = []
        try:
            for rank in range(1, size):
                command = [_python(), "-m", "engine.tp_worker", "--rank", str(rank), "--store", store,
                           "--max-model-len", str(max_model_len), "--config", json.dumps(dataclasses.asdict(config)),
                           "--parent-pid", str(os.getpid())]
                workers.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))
            def waiting() -> None:
                exited = _exited(workers)
                if exited is not None:
                    raise _RankExited(f"{exited} before it joined the others (its log says why)")

            tp = TensorParallel(layout, pick_device_dtype(config)[0], store, waiting)
            runner = cls(config, model_config, max_model_len, tp)
        except BaseException as error:
            exited = _exited(workers)
            for w in workers:
                w.kill()
                w.wait()
            shutil.rmtree(rendezvous, ignore_errors=True)
            if exited and not isinstance(error, _RankExited):
                raise _RankExited(f"{exited} while the engine started (its log says why)") from error
            raise
        runner._rendezvous = rendezvous  # the group's store: kept while the group lives
        runner._start_watch(workers)
        logger.info("tensor parallel: %d ranks (%s), followers %s; LoRA %s", size, tp.device,
                    [w.pid for w in workers], "fully sharded" if config.fully_sharded_loras else "default mode")
        return runner

    def _start_watch(self, workers: list[subprocess.Popen]) -> None:
        self.workers = workers
        self.death_callback: Callable[[str], None] | None = None
        self.dead: str | None = None
        self._stopping = threading.Event()
        for rank, worker in enumerate(workers, start=1):
            threading.Thread(target=self._watch, args=(rank, worker), name=f"multilora-tp-watch-{rank}",
                             daemon=True).start()

    def _watch(self, rank: int, worker: subprocess.Popen) -> None:
        code = worker.wait()
        if self._stopping.is_set():
            return
        from engine.core_client import describe_exit
        self.dead = f"tensor-parallel rank {rank} (pid {worker.pid}) {describe_exit(code)}"
        logger.error("%s", self.dead)
        if self.death_callback is not None:
            self.death_callback(self.dead)

    def _rank_failure(self, error: Exception) -> Exception:
        """A collective failed (gloo sees a dead peer's closed socket): say which rank died."""
        deadline = time.monotonic() + 1.0  # for the watch thread to see the exit
        while self.dead is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return RuntimeError(self.dead) if self.dead is not None else error

    # --- the step: one plan out, the forward pass together, tokens back out ------------------
    def run(self, *args, **kwargs):
        try:
            return super().run(*args, **kwargs)
        except RuntimeError as error:
            raise self._rank_failure(error) from error

    def _forward_eager(self, step: StepInputs) -> torch.Tensor:
        self.tp.send_plan(("step", dataclasses.replace(step, sampling_seqs=[])))
        return super()._forward_eager(step)

    def _tokens_sampled(self, num_tokens: int) -> None:
        self.tp.broadcast(self.token_buf[:num_tokens])

    def load_adapter(self, packed: PackedAdapter, pages: list[int], prefetch: bool = False):
        """Each rank's shard (``packed.data[j]``) into the same pages of its pool; synchronous."""
        self.tp.send_plan(("load", packed.num_pages, pages))
        self._receive_pages(list(packed.data.unbind(0)), packed.num_pages, pages)
        return None

    def pool_pages(self, pages: list[int]) -> list[torch.Tensor]:
        """What every rank's pool holds at ``pages``: per rank [n, L, PAGE] on the host."""
        self.tp.send_plan(("pages", pages))
        return self._pool_pages(pages)

    def close(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.dead is None:
            try:
                self.tp.send_plan(("stop",))
            except RuntimeError:  # a follower is gone: nothing to tell it
                pass
        for worker in self.workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if self.dead is None:  # a group with a dead rank is left as it is (tearing it down blocks)
            self.tp.close()
        shutil.rmtree(self._rendezvous, ignore_errors=True)


class FollowerRunner(ShardRunner):
    """Ranks 1..N-1: run what rank 0's plans say, in its order."""

    def follow(self) -> bool:
        """Carry out one plan; False once told to stop."""
        message = self.tp.recv_plan()
        kind = message[0]
        if kind == "step":
            step: StepInputs = message[1]
            self._forward_eager(step)
            if step.logits_indices:
                self.tp.broadcast(self.token_buf[:len(step.logits_indices)])
        elif kind == "load":
            _, num_pages, pages = message
            self._receive_pages(None, num_pages, pages)
        elif kind == "pages":
            self._pool_pages(message[1])
        elif kind == "stop":
            return False
        else:
            raise RuntimeError(f"unknown plan {kind!r} from rank 0")
        return True


class _RankExited(RuntimeError):
    pass


def _exited(workers: list[subprocess.Popen]) -> str | None:
    from engine.core_client import describe_exit
    for rank, w in enumerate(workers, start=1):
        if w.poll() is not None:
            return f"tensor-parallel rank {rank} (pid {w.pid}) {describe_exit(w.returncode)}"
    return None


def _python() -> str:
    from engine.core_client import python_executable  # the stub's interpreter is not sys.executable
    return python_executable()
