"""A follower rank of tensor parallelism: a child process of the engine (rank 0).

Started by ``tp_runner.DriverRunner.start`` as
``python -m engine.tp_worker --rank R --store PATH --max-model-len N --config JSON``.
It loads its shard, then carries out rank 0's plans until told to stop. It dies with its parent
(PR_SET_PDEATHSIG, and a watch on the parent's pid), as the engine process does with the stub.
PR_SET_PDEATHSIG fires when the parent's *thread* that started it ends: make the engine in a
thread that lives as long as the engine (the engine process makes it in its main thread).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from typing import Sequence

from engine.core_server import EXIT_FATAL, _watch_parent, die_with_parent

logger = logging.getLogger("multilora")


def serve(rank: int, store: str, max_model_len: int, config_json: str, parent_pid: int) -> int:
    die_with_parent()
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="multilora-parent-watch", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format=f"[multilora tp rank {rank}] %(message)s", stream=sys.stderr)
    import torch

    from engine.config import EngineConfig, ModelConfig
    from engine.model_runner import pick_device_dtype
    from engine.parallel import ShardLayout, TensorParallel
    from engine.tp_runner import FollowerRunner

    config = EngineConfig(**json.loads(config_json))
    model_config = ModelConfig.from_dir(config.model)
    layout = ShardLayout.of(model_config, rank, config.tensor_parallel_size, config.fully_sharded_loras)
    device = pick_device_dtype(config)[0]
    if device.type == "cuda":
        torch.cuda.set_device(rank)  # rank r on the r-th visible device
    tp = TensorParallel(layout, device, store)
    runner = FollowerRunner(config, model_config, max_model_len, tp)
    while runner.follow():
        pass
    tp.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--store", required=True, help="the file store of the rendezvous")
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--config", required=True, help="the engine config as a JSON object")
    parser.add_argument("--parent-pid", type=int, default=os.getppid())
    args = parser.parse_args(argv)
    try:
        return serve(args.rank, args.store, args.max_model_len, args.config, args.parent_pid)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", args.rank)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
