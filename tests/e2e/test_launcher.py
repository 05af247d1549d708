"""multilora_serve.launcher starts the tritonserver of the nvidia-pytriton wheel (no engine needed):
a tiny decoupled echo model in tmp_path stands in for multilora, except in the test that kills
the launcher, which runs the project's model repository (a stub that starts an engine process)."""
from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
import tritonclient.grpc as grpcclient

from multilora_serve import launcher
from multilora_serve.launcher import TritonServer, TritonServerError

from e2e_helpers import MODEL_REPOSITORY, ROOT, START_TIMEOUT_S, descendants, proc_stat, start_server

pytestmark = pytest.mark.e2e

ECHO_CONFIG = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text" data_type: TYPE_STRING dims: [ 1 ] } ]
output [
  { name: "echo" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "engine_args" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [ { kind: KIND_MODEL count: 1 } ]
"""

# Answers each request with its text, the MULTILORA_ENGINE_ARGS it sees, then a FINAL flag.
ECHO_MODEL = """
import os
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        if os.environ.get("ECHO_FAIL"):
            raise RuntimeError("echo model refuses to start: " + os.environ["ECHO_FAIL"])

    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
            args = os.environ.get("MULTILORA_ENGINE_ARGS", "").encode()
            sender = request.get_response_sender()
            sender.send(pb_utils.InferenceResponse([
                pb_utils.Tensor("echo", text),
                pb_utils.Tensor("engine_args", np.array([args], dtype=np.object_))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""


@pytest.fixture
def echo_repository(tmp_path: Path) -> Path:
    model_dir = tmp_path / "repo" / "echo"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(ECHO_CONFIG)
    (model_dir / "1" / "model.py").write_text(ECHO_MODEL)
    return tmp_path / "repo"


def grpc_echo(grpc_url: str, text: str) -> tuple[str, str]:
    """One request over a gRPC stream; returns (echo, engine_args)."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        tensor = grpcclient.InferInput("text", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
        client.async_stream_infer("echo", [tensor], request_id="1")
        result, error = results.get(timeout=30)
        assert error is None, error
        client.stop_stream()
    finally:
        client.close()
    return (result.as_numpy("echo")[0].decode(), result.as_numpy("engine_args")[0].decode())


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def test_backend_directory_layout(tmp_path: Path):
    backends = launcher.make_backend_dir(tmp_path)
    python_dir = backends / "python"
    stub = python_dir / "triton_python_backend_stub"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert stub.is_symlink()  # a copy would not find its CUDA runtime
    assert Path(os.readlink(stub)).parent.name == version
    assert os.access(stub, os.X_OK)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        assert (python_dir / name).is_file() and not (python_dir / name).is_symlink()


def test_missing_stub_version_is_a_clear_error(tmp_path: Path):
    with pytest.raises(TritonServerError, match="no Python backend stub for Python 2.7"):
        launcher.make_backend_dir(tmp_path, python_version="2.7")


def test_parse_engine_args(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    args = launcher.parse_engine_args(
        ["max_num_seqs=8", "dtype=float16", 'lora_roots=["a","b"]', "ignore=true",
         "model=weights", "empty="])
    assert args == {"max_num_seqs": 8, "dtype": "float16", "lora_roots": ["a", "b"],
                    "ignore": True, "model": str(tmp_path / "weights"), "empty": ""}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        launcher.parse_engine_args(["no_equals_sign"])


def test_default_model_repository_is_the_projects():
    assert launcher.DEFAULT_MODEL_REPOSITORY == ROOT / "model_repository"
    assert TritonServer().model_repository == ROOT / "model_repository"


def test_admin_apis_are_restricted_by_default(monkeypatch):
    monkeypatch.delenv("MULTILORA_ADMIN_KEY", raising=False)
    server = TritonServer(ROOT / "model_repository")
    assert server.host == "127.0.0.1"  # this machine only, unless asked
    setting = f"model-repository,logging,shared-memory:multilora-admin-key={server.admin_key}"
    command = server.command(Path("B"))
    assert f"--http-restricted-api={setting}" in command and f"--grpc-restricted-protocol={setting}" in command
    assert len(server.admin_key) >= 24 and server.admin_key != TritonServer().admin_key  # random each time
    assert server.admin_headers == {"multilora-admin-key": server.admin_key}
    assert server.grpc_admin_headers == {"triton-grpc-protocol-multilora-admin-key": server.admin_key}
    monkeypatch.setenv("MULTILORA_ADMIN_KEY", "from-the-environment")
    assert TritonServer().admin_key == "from-the-environment"
    assert TritonServer(admin_key="given").admin_key == "given"
    open_server = TritonServer(restrict_admin=False)
    assert open_server.admin_headers == {} and not any("restricted" in a for a in open_server.command(Path("B")))
    args = launcher.build_parser().parse_args([])
    assert args.host == "127.0.0.1" and not args.no_restricted_api


def test_model_control_arguments():
    explicit = TritonServer(ROOT / "model_repository", restrict_admin=False).command(Path("B"))
    assert explicit[-2:] == ["--model-control-mode=explicit", "--load-model=*"]
    # the authorization header (tenant and admin tokens) reaches the models as a request parameter
    assert {"--http-header-forward-pattern=^[Aa]uthorization$", "--grpc-header-forward-pattern=^authorization$"} \
        <= set(explicit)
    none = TritonServer(ROOT / "model_repository", model_control_mode="none").command(Path("B"))
    assert not any(arg.startswith(("--model-control-mode", "--load-model")) for arg in none)
    poll = TritonServer(ROOT / "model_repository", model_control_mode="poll",
                        restrict_admin=False).command(Path("B"))
    assert poll[-1] == "--model-control-mode=poll"
    with pytest.raises(ValueError, match="model_control_mode must be one of explicit, none, poll"):
        TritonServer(model_control_mode="manual")
    parser = launcher.build_parser()
    assert parser.parse_args([]).model_control_mode == "explicit"
    assert parser.parse_args(["--model-control-mode", "none"]).model_control_mode == "none"


def test_server_starts_serves_and_stops(echo_repository: Path):
    server = start_server(echo_repository, engine_args={"model": "/m", "max_num_seqs": 4})
    try:
        assert server.is_ready()
        assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3
        assert server.grpc_url == f"127.0.0.1:{server.grpc_port}"
        assert server.http_url == f"http://127.0.0.1:{server.http_port}"
        echo, engine_args = grpc_echo(server.grpc_url, "hello world")
        assert echo == "hello world"
        assert json.loads(engine_args) == {"model": "/m", "max_num_seqs": 4}
        assert http_status(f"{server.http_url}/v2/models/echo/ready") == 200
        with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
            assert 'nv_inference_request_success{model="echo",version="1"}' in reply.read().decode()
        backend_dir = server._tmp_dir
        process = server.process
    finally:
        code = server.stop()
    assert code == 0
    assert process.poll() is not None
    assert not backend_dir.exists()
    assert http_status(f"{server.http_url}/v2/health/live") is None


def _post(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=b"{}", method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def test_explicit_model_control_loads_every_model_and_lets_clients_reload(echo_repository: Path):
    second = echo_repository / "echo2"
    (second / "1").mkdir(parents=True)
    (second / "config.pbtxt").write_text(ECHO_CONFIG)
    (second / "1" / "model.py").write_text(ECHO_MODEL)
    server = start_server(echo_repository)
    code = None
    try:
        for name in ("echo", "echo2"):  # --load-model=* loaded every model of the repository
            assert http_status(f"{server.http_url}/v2/models/{name}/ready") == 200
        # the repository API asks for the admin key: without it, nothing is unloaded
        assert _post(f"{server.http_url}/v2/repository/models/echo/unload") != 200
        assert _post(f"{server.http_url}/v2/logging") != 200
        assert http_status(f"{server.http_url}/v2/models/echo/ready") == 200
        assert _post(f"{server.http_url}/v2/repository/models/echo/unload", server.admin_headers) == 200
        deadline = time.monotonic() + 30
        while http_status(f"{server.http_url}/v2/models/echo/ready") == 200:
            assert time.monotonic() < deadline, "echo still ready 30 s after its unload"
            time.sleep(0.25)
        assert _post(f"{server.http_url}/v2/repository/models/echo/load", server.admin_headers) == 200
        assert http_status(f"{server.http_url}/v2/models/echo/ready") == 200
        assert grpc_echo(server.grpc_url, "again")[0] == "again"
        # over gRPC too
        grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException):
            grpc_client.unload_model("echo")
        assert grpc_client.is_model_ready("echo")
        grpc_client.unload_model("echo", headers=server.grpc_admin_headers)
    finally:
        code = server.stop()
    assert code == 0


def test_context_manager_stops_the_server(echo_repository: Path):
    with TritonServer(echo_repository, host="127.0.0.1", http_port=None, grpc_port=None,
                      metrics_port=None, ready_timeout=START_TIMEOUT_S, exit_timeout_s=5) as server:
        process = server.process
        assert server.is_ready()
    assert process.poll() is not None
    assert not server.is_running()


def test_model_that_fails_to_load_raises_with_the_log_tail(echo_repository: Path):
    with pytest.raises(TritonServerError) as caught:
        start_server(echo_repository, env={"ECHO_FAIL": "boom-4711"})
    assert "boom-4711" in str(caught.value)


def _run_cli(args: list[str], tmp_path: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "multilora_serve", *args], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=open(tmp_path / "cli.stderr", "w"), text=True,
        env={**os.environ, **(env or {})})


def _read_ready_line(process: subprocess.Popen, timeout: float) -> str:
    lines: queue.Queue = queue.Queue()

    def reader():
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            break
        if line.startswith("multilora ready:"):
            return line
    raise AssertionError("no 'multilora ready:' line")


def test_cli_prints_ready_line_and_exits_cleanly_on_sigint(echo_repository: Path, tmp_path: Path):
    process = _run_cli(["--model-repository", str(echo_repository), "--host", "127.0.0.1",
                        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
                        "--engine-arg", "max_num_seqs=3", "--ready-timeout", "60",
                        "--tritonserver-arg=--exit-timeout-secs=5"], tmp_path)
    try:
        line = _read_ready_line(process, START_TIMEOUT_S)
        fields = dict(part.split("=", 1) for part in line.split()[2:])
        assert http_status(f"{fields['http']}/v2/health/ready") == 200
        assert http_status(fields["metrics"]) == 200
        assert grpc_echo(fields["grpc"], "x") == ("x", '{"max_num_seqs": 3}')
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert http_status(f"{fields['http']}/v2/health/live") is None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_exits_nonzero_with_the_log_tail_when_the_model_fails(echo_repository: Path,
                                                                   tmp_path: Path):
    process = _run_cli(["--model-repository", str(echo_repository), "--host", "127.0.0.1",
                        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"],
                       tmp_path, env={"ECHO_FAIL": "boom-0815"})
    try:
        assert process.wait(timeout=120) == 1
    finally:
        if process.poll() is None:
            process.kill()
    stderr = (tmp_path / "cli.stderr").read_text()
    assert "multilora-serve: tritonserver exited with code" in stderr
    assert "boom-0815" in stderr


def test_cli_rejects_a_malformed_engine_arg(tmp_path: Path):
    process = _run_cli(["--engine-arg", "oops"], tmp_path)
    assert process.wait(timeout=60) == 2
    assert "KEY=VALUE" in (tmp_path / "cli.stderr").read_text()


# -- the server's life is tied to the launcher's -----------------------------------------------
_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not ours: PID 1 (or another subreaper) reaps it
        pass


def _set_child_subreaper(enabled: bool) -> None:
    # Orphans then become this process's children and the test reaps them itself, instead of
    # depending on whether PID 1 of the machine reaps orphans.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled)) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc")
def test_sigkill_of_the_launcher_takes_tritonserver_and_its_stubs_with_it(tmp_path: Path):
    """A launcher killed with SIGKILL cannot clean up: tritonserver, the stub and whatever the
    stub started must still die (a survivor would keep its GPU memory)."""
    _set_child_subreaper(True)
    below: dict[int, str] = {}
    process = None
    try:
        process = _run_cli(["--model-repository", str(MODEL_REPOSITORY), "--host", "127.0.0.1",
                            "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
                            "--ready-timeout", "180"], tmp_path)
        _read_ready_line(process, 180.0)
        below = descendants(process.pid)
        names = set(below.values())
        assert "tritonserver" in names and "triton_python_b" in names, below
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        alive = dict(below)
        while alive and time.monotonic() < deadline:
            for pid in list(alive):
                _reap(pid)
                if proc_stat(pid) is None:  # a zombie still has its /proc entry
                    del alive[pid]
            time.sleep(0.1)
        assert not alive, f"alive 10 s after the launcher's SIGKILL: {alive} of {below}"
    finally:
        for pid, comm in below.items():
            stat = proc_stat(pid)
            if stat is not None and stat[2] == comm:
                os.kill(pid, signal.SIGKILL)
                _reap(pid)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        _set_child_subreaper(False)
