"""The follower ranks of tensor parallelism are children of the engine's process and die with it:
after SIGKILL of the engine's process (no chance to clean up) its ranks are gone within seconds."""
import os
import signal
import subprocess
import sys
import time

from helpers import write_checkpoint

SCRIPT = """
import sys, time
from engine.config import EngineConfig, ModelConfig
from engine.tp_runner import make_runner
config = EngineConfig(model=sys.argv[1], num_pages=16, block_size=4, tensor_parallel_size=2)
runner = make_runner(config, ModelConfig.from_dir(sys.argv[1]), 64)  # the engine's runner, rank 0
print(" ".join(str(w.pid) for w in runner.workers), flush=True)
time.sleep(120)
"""


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ranks_die_with_the_engine_process(tmp_path):
    base = write_checkpoint(str(tmp_path / "base"), "llama_gqa", num_hidden_layers=1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    parent = subprocess.Popen([sys.executable, "-c", SCRIPT, base], stdout=subprocess.PIPE, text=True, env=env)
    try:
        [follower] = [int(p) for p in parent.stdout.readline().split()]
        with open(f"/proc/{follower}/cmdline") as f:
            command = f.read().replace("\0", " ")
        assert "engine.tp_worker" in command and "--rank 1" in command
        assert int(open(f"/proc/{follower}/stat").read().split(")")[-1].split()[1]) == parent.pid  # its child
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while is_alive(follower) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_alive(follower), "the rank outlived the engine's process"
    finally:
        parent.kill()
        parent.wait()
