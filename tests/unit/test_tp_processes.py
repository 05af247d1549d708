"""The follower ranks of tensor parallelism are children of the engine's process and die with it:
after SIGKILL of the engine's process (no chance to clean up) its ranks are gone within seconds.
A rank that dies while the engine starts fails the start at once, with an error naming it."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from engine.config import EngineConfig, ModelConfig
from engine.tp_runner import make_runner
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


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("tp-processes") / "base"), "llama_gqa", num_hidden_layers=1)


def test_ranks_die_with_the_engine_process(base):
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


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().split(")")[-1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found


def test_a_rank_that_dies_at_start_fails_the_start_naming_it(base):
    config = EngineConfig(model=base, num_pages=16, block_size=4, tensor_parallel_size=2)
    outcome: dict = {}

    def start() -> None:
        try:
            outcome["runner"] = make_runner(config, ModelConfig.from_dir(base), 64)
        except RuntimeError as error:
            outcome["error"] = error

    thread = threading.Thread(target=start)
    thread.start()
    deadline = time.monotonic() + 30
    follower = None
    while follower is None and time.monotonic() < deadline:
        for pid in children(os.getpid()):
            with open(f"/proc/{pid}/cmdline") as f:
                if "engine.tp_worker" in f.read():
                    follower = pid
        time.sleep(0.01)
    assert follower is not None
    os.kill(follower, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(60)
    assert not thread.is_alive() and "runner" not in outcome
    message = str(outcome["error"])
    assert message.startswith(f"tensor-parallel rank 1 (pid {follower}) was killed by signal 9 (SIGKILL)"), message
    assert time.monotonic() - killed < 5
