"""Start Triton Inference Server (the binary of the ``nvidia-pytriton`` wheel) on a model repository.

Console script ``multilora-serve`` (also ``python -m multilora_serve``), and ``TritonServer``, a
context manager that tests and benchmarks use to start servers the same way.

What it does (see the Triton recipe in the project's toolchain notes):
1. makes a backend directory ``B/python/`` in a temporary directory, holding copies of
   ``libtriton_python.so`` and ``triton_python_backend_utils.py`` and a *symbolic link*
   ``triton_python_backend_stub`` to the stub of the running Python's X.Y (a copy would not find
   its CUDA runtime, which it locates relative to its real path);
2. starts ``tritonserver`` with the running virtual environment's ``bin`` first on PATH: the stub
   takes its packages from the venv of the first ``python3`` on PATH and ignores PYTHONPATH; in
   a process group of its own, with SIGKILL as its parent-death signal (Linux) and a watchdog
   process that kills the group when the launcher is gone, so that the server, its stubs and
   their children die with the launcher, even a launcher killed with SIGKILL;
3. polls ``/v2/health/ready`` until the server (and so every loaded model) is ready.

Models are under explicit model control by default (``--model-control-mode=explicit``, every
model of the repository loaded at start): a client can unload and load them again through
Triton's repository API.

Engine overrides (``--engine-arg KEY=VALUE``) reach the model through the environment variable
``MULTILORA_ENGINE_ARGS``: a JSON object that ``model.py`` lays over ``engine.json``. A VALUE is
parsed as JSON when it parses (``8``, ``true``, ``["a","b"]``), else kept as a string; a string
naming an existing file or directory relative to the current directory is made absolute.

This module never imports torch or the engine: starting a server must stay cheap.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import ctypes
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

ENGINE_ARGS_ENV = "MULTILORA_ENGINE_ARGS"
ADMIN_KEY_ENV = "MULTILORA_ADMIN_KEY"
ADMIN_KEY_HEADER = "multilora-admin-key"
RESTRICTED_APIS = ("model-repository", "logging", "shared-memory")
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # what Triton 2.51 looks for in gRPC metadata
# The authorization header (tenant and adapter-admin tokens, "Bearer ...") reaches the models as
# a request parameter. HTTP keeps the case a client sends; gRPC metadata is lower case.
HEADER_FORWARD_ARGS = ("--http-header-forward-pattern=^[Aa]uthorization$",
                       "--grpc-header-forward-pattern=^authorization$")
DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
_LOG_TAIL_LINES = 200
# The Python backend gives a stub 30 s by default to answer, initialize() included; a 7B model's
# start (weights, the pool, the decode graphs, and Triton kernels compiled on a machine without
# a kernel cache) takes longer, and the stub is then killed as "not healthy".
STUB_TIMEOUT_S = 600
MODEL_CONTROL_MODES = ("explicit", "none", "poll")  # tritonserver --model-control-mode
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Run by the watchdog beside tritonserver (``python -I -S -c CODE PGID``): its stdin is a pipe
# whose only writer is the launcher, so end of file means the launcher is gone.
_WATCHDOG_CODE = """
import os, signal, sys
sys.stdin.buffer.read()
try:
    os.killpg(int(sys.argv[1]), signal.SIGKILL)
except ProcessLookupError:
    pass
"""
_running_servers: "set[TritonServer]" = set()


class TritonServerError(RuntimeError):
    """tritonserver could not be started, died, or did not become ready. The message ends with
    the tail of its log."""


def find_pytriton_dir() -> Path:
    """Directory of the installed ``pytriton`` package (not imported: only its files are used)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "package 'nvidia-pytriton' is not installed in this Python "
            f"({sys.executable}); install it with: pip install 'nvidia-pytriton==0.7.0'")
    return Path(list(spec.submodule_search_locations)[0])


def tritonserver_binary() -> Path:
    binary = find_pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonServerError(f"tritonserver binary not found at {binary}")
    return binary


def make_backend_dir(parent: Path, python_version: str | None = None) -> Path:
    """Build ``parent/backends/python/`` for ``--backend-directory`` and return ``parent/backends``.

    ``python_version`` is "X.Y" (default: the running interpreter's); the stub links that
    version's system libpython.
    """
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    server_dir = find_pytriton_dir() / "tritonserver"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in (server_dir / "python_backend_stubs").iterdir())
        raise TritonServerError(
            f"no Python backend stub for Python {version} in {stub.parent.parent}; "
            f"stubs exist for {available}")
    backends = parent / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(server_dir / "backends" / "python" / name, python_dir / name)
    link = python_dir / "triton_python_backend_stub"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(stub.resolve())
    return backends


def pick_free_port(host: str = "127.0.0.1", exclude: Sequence[int] = ()) -> int:
    """A TCP port that is free on ``host`` now (the OS picks it; nothing holds it afterwards)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in exclude:
            return port
    raise TritonServerError(f"could not find a free port on {host}")


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive SIGKILL when its parent dies, or None where
    that cannot be asked for (not Linux).

    Without it, a tritonserver in a session of its own outlives a launcher killed with SIGKILL,
    and its Python backend stubs keep their GPU memory: the next server fails with CUDA out of
    memory. PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the
    process: start servers from a thread that lives as long as the server does.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    parent_pid = os.getpid()

    def set_death_signal() -> None:
        # Runs in the child between fork and exec.
        if prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
        if os.getppid() != parent_pid:  # the parent died before the death signal was set
            os._exit(1)

    return set_death_signal


def start_group_watchdog(pgid: int) -> tuple[subprocess.Popen, int] | None:
    """Start a process that SIGKILLs the process group ``pgid`` once this process is gone;
    returns it and the pipe's write end (keep it open: closing it fires the watchdog), or None
    where process groups do not exist.

    tritonserver's stubs exit when tritonserver dies, but not always: on 2.51 a stub whose model
    thread is in a call to the dead server (``Metric.set``) deadlocks in its own shutdown and
    keeps running, with its GPU memory and its children. The server, the stubs and what they
    start share tritonserver's process group, so the watchdog kills them together.
    """
    if os.name != "posix":
        return None
    read_fd, write_fd = os.pipe()  # neither end is inherited by tritonserver or later children
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG_CODE, str(pgid)], stdin=read_fd,
            stdout=subprocess.DEVNULL,
            start_new_session=True)  # outside the launcher's group: it must outlive the launcher
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return watchdog, write_fd


def parse_engine_args(items: Sequence[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` -> dict. Values are JSON when they parse, else strings; a string
    naming an existing path (relative to the current directory) is made absolute."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--engine-arg expects KEY=VALUE, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        if isinstance(value, str) and value and os.path.exists(value):
            value = os.path.abspath(value)
        result[key] = value
    return result


def restricted_api_args(admin_key: str) -> list[str]:
    """tritonserver arguments that make its model-repository, logging and shared-memory APIs,
    over HTTP and gRPC, answer only requests carrying ``admin_key`` in the header ADMIN_KEY_HEADER."""
    setting = f"{','.join(RESTRICTED_APIS)}:{ADMIN_KEY_HEADER}={admin_key}"
    return [f"--http-restricted-api={setting}", f"--grpc-restricted-protocol={setting}"]


class TritonServer:
    """One tritonserver process on a model repository.

    Use as a context manager (``with TritonServer(repo, http_port=None) as server:``) or call
    ``start()`` / ``stop()``. A port given as ``None`` or 0 is picked free on ``host``.
    ``engine_args`` reach the model as the JSON environment variable ``MULTILORA_ENGINE_ARGS``.
    The process runs in the temporary directory (the Python stub puts its working directory on
    sys.path), with the venv's ``bin`` first on PATH.
    The server's output is kept (the last lines are in ``log_tail()``), written to ``log_file``
    when given, and echoed to stderr when ``echo`` is true. ``model_control_mode`` is one of
    ``MODEL_CONTROL_MODES`` (see ``model_control_args``).
    The server dies with the thread that called ``start()`` (see ``die_with_parent``).
    """

    def __init__(
        self,
        model_repository: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = 8000,
        grpc_port: int | None = 8001,
        metrics_port: int | None = 8002,
        engine_args: Mapping[str, Any] | None = None,
        log_verbose: int = 0,
        ready_timeout: float = 120.0,
        exit_timeout_s: int = 30,
        log_file: str | os.PathLike | None = None,
        echo: bool = False,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        model_control_mode: str = "explicit",
        admin_key: str | None = None,
        restrict_admin: bool = True,
    ) -> None:
        if model_control_mode not in MODEL_CONTROL_MODES:
            raise ValueError(f"model_control_mode must be one of {', '.join(MODEL_CONTROL_MODES)}, "
                             f"got {model_control_mode!r}")
        self.model_repository = Path(model_repository or DEFAULT_MODEL_REPOSITORY).resolve()
        self.host = host
        self._requested_ports = (http_port, grpc_port, metrics_port)
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.engine_args = dict(engine_args or {})
        self.log_verbose = int(log_verbose)
        self.ready_timeout = float(ready_timeout)
        self.exit_timeout_s = int(exit_timeout_s)
        self.log_file = Path(log_file) if log_file else None
        self.echo = echo
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.model_control_mode = model_control_mode
        # Triton's administrative APIs (model repository, logging, shared memory) answer only
        # requests that carry this key in the header ADMIN_KEY_HEADER.
        self.restrict_admin = restrict_admin
        self.admin_key = (admin_key or os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(24)
                          if restrict_admin else None)
        self.process: subprocess.Popen | None = None
        self._tmp_dir: Path | None = None
        self._log_lines: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self._log_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._watchdog: tuple[subprocess.Popen, int] | None = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def connect_host(self) -> str:
        """Address a client on this machine uses (a wildcard bind is reached over loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host

    @property
    def http_address(self) -> str:
        """``host:port`` as tritonclient.http wants it."""
        return f"{self.connect_host}:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` as tritonclient.grpc wants it."""
        return f"{self.connect_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.connect_host}:{self.metrics_port}/metrics"

    # -- life cycle --------------------------------------------------------------------------
    def command(self, backend_dir: Path) -> list[str]:
        return [
            str(tritonserver_binary()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--backend-config=python,stub-timeout-seconds={STUB_TIMEOUT_S}",
            *HEADER_FORWARD_ARGS,
            *self.model_control_args(),
            *self.restricted_api_args(),
            *self.extra_args,
        ]

    def restricted_api_args(self) -> list[str]:
        """Any client may otherwise load and unload models, change the log settings and map
        shared memory: those APIs need the admin key (``admin_headers``) unless
        ``restrict_admin`` is false."""
        return restricted_api_args(self.admin_key) if self.restrict_admin else []

    @property
    def admin_headers(self) -> dict[str, str]:
        """The HTTP header a client sends to use the restricted APIs (empty when not restricted)."""
        return {ADMIN_KEY_HEADER: self.admin_key} if self.restrict_admin else {}

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """The same over gRPC, where Triton expects the key's name with a prefix."""
        return {GRPC_HEADER_PREFIX + ADMIN_KEY_HEADER: self.admin_key} if self.restrict_admin else {}

    def model_control_args(self) -> list[str]:
        """``explicit``: every model of the repository is loaded at start, and clients may unload
        and load models (``POST /v2/repository/models/NAME/load``), e.g. a model that unloaded
        itself when its engine died. ``none`` is Triton's default (no arguments)."""
        if self.model_control_mode == "explicit":
            return ["--model-control-mode=explicit", "--load-model=*"]
        if self.model_control_mode == "poll":
            return ["--model-control-mode=poll"]
        return []

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        # The stub's interpreter takes its packages from the venv of the first python3 on PATH.
        venv_bin = str(Path(sys.prefix) / "bin")
        env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
        env.pop("PYTHONHOME", None)
        if self.engine_args:
            env[ENGINE_ARGS_ENV] = json.dumps(self.engine_args)
        return env

    def start(self) -> "TritonServer":
        """Start tritonserver and wait until ``/v2/health/ready`` answers 200.

        Raises TritonServerError (with the log tail) if it exits or is not ready in time; the
        process is stopped then. Call it from a thread that lives as long as the server: the
        server gets SIGKILL when this thread exits.
        """
        if self.process is not None:
            raise TritonServerError("server already started")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a directory")
        self._assign_ports()
        self._tmp_dir = Path(tempfile.mkdtemp(prefix="multilora-triton-"))
        backend_dir = make_backend_dir(self._tmp_dir)
        log = open(self.log_file, "a", encoding="utf-8") if self.log_file else None
        try:
            self.process = subprocess.Popen(
                self.command(backend_dir), env=self.environment(), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                bufsize=1, cwd=self._tmp_dir,  # the stub puts its cwd on sys.path: keep it neutral
                start_new_session=True,  # signals reach it (and its stubs) only through us
                # tritonserver gets SIGKILL when the thread calling start() exits, and its
                # process group when this process exits (the watchdog): call start() from a
                # thread that lives as long as the server, as the CLI does from its main thread.
                preexec_fn=die_with_parent(),
            )
            self._watchdog = start_group_watchdog(self.process.pid)
        except BaseException:
            if log is not None:
                log.close()
            self.stop()
            raise
        _running_servers.add(self)
        self._reader = threading.Thread(
            target=self._read_output, args=(self.process.stdout, log), name="tritonserver-log",
            daemon=True)
        self._reader.start()
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.http_url}/v2/health/ready"
        while True:
            code = self.process.poll() if self.process else None
            if self.process is None or code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {code} before it was ready\n{self.log_tail()}")
            if _http_status(url) == 200:
                return
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver was not ready after {timeout:.0f} s ({url})\n{self.log_tail()}")
            time.sleep(0.25)

    def is_ready(self) -> bool:
        return self.is_running() and _http_status(f"{self.http_url}/v2/health/ready") == 200

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton waits up to ``exit_timeout_s`` for in-flight requests and open
        connections, then unloads the models, calling their ``finalize``); SIGKILL after
        ``timeout`` s (default: exit_timeout_s + 30). Removes the temporary backend directory.
        Returns the exit code."""
        if timeout is None:
            timeout = self.exit_timeout_s + 30.0
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    kill_process_group(process)
                    process.wait()
            code = process.returncode
            if self._reader is not None:
                self._reader.join(timeout=5)
        if self._watchdog is not None:
            watchdog, write_fd = self._watchdog
            self._watchdog = None
            watchdog.kill()  # not the end of file on its pipe, which would kill the group
            watchdog.wait()
            os.close(write_fd)
        _running_servers.discard(self)
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None
        return code

    def wait(self) -> int:
        """Wait for the process to exit on its own; returns its exit code."""
        if self.process is None:
            raise TritonServerError("server not started")
        return self.process.wait()

    def log_tail(self, num_lines: int = 60) -> str:
        with self._log_lock:
            lines = list(self._log_lines)[-num_lines:]
        return "".join(lines)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------
    def _assign_ports(self) -> None:
        bind_host = self.connect_host
        chosen: list[int] = []
        for port in self._requested_ports:
            chosen.append(int(port) if port else pick_free_port(bind_host, exclude=chosen))
        if len(set(chosen)) != 3:
            raise TritonServerError(f"http, grpc and metrics ports must differ, got {chosen}")
        self.http_port, self.grpc_port, self.metrics_port = chosen

    def _read_output(self, stream, log) -> None:
        try:
            for line in stream:
                with self._log_lock:
                    self._log_lines.append(line)
                if log is not None:
                    log.write(line)
                    log.flush()
                if self.echo:
                    sys.stderr.write(line)
                    sys.stderr.flush()
        finally:
            if log is not None:
                log.close()


def kill_process_group(process: subprocess.Popen) -> None:
    """SIGKILL tritonserver and its Python backend stubs (its own process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


@atexit.register
def _stop_all() -> None:
    for server in list(_running_servers):
        server.stop(timeout=10)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multilora-serve",
        description="Serve the multilora model with the tritonserver of the nvidia-pytriton wheel.")
    parser.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY),
                        help="Triton model repository (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the HTTP, gRPC and metrics endpoints bind (default: %(default)s, "
                             "this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override an engine.json value (repeatable); VALUE is JSON or a string")
    parser.add_argument("--model-control-mode", choices=MODEL_CONTROL_MODES, default="explicit",
                        help="tritonserver --model-control-mode; explicit (the default) loads "
                             "every model at start and lets clients load and unload them")
    parser.add_argument("--admin-key", default=None,
                        help=f"the key ({ADMIN_KEY_HEADER} header) that Triton's model-repository, logging "
                             f"and shared-memory APIs ask for (default: ${ADMIN_KEY_ENV}, else a random one, "
                             "printed at start)")
    parser.add_argument("--no-restricted-api", action="store_true",
                        help="leave those APIs open to every client")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument("--ready-timeout", type=float, default=300.0,
                        help="seconds to wait for /v2/health/ready (default: %(default)s)")
    parser.add_argument("--log-file", default=None, help="also write tritonserver's output here")
    parser.add_argument("--tritonserver-arg", action="append", default=[], metavar="ARG",
                        help="extra tritonserver argument, e.g. --tritonserver-arg=--exit-timeout-secs=5")
    return parser


def _console_logger() -> logging.Logger:
    """The launcher's own lines: information on stdout (the ready line is read by scripts),
    errors on stderr, the text as it is."""
    logger = logging.getLogger("multilora.launcher")
    if not logger.handlers:
        out = logging.StreamHandler(sys.stdout)
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        err = logging.StreamHandler(sys.stderr)
        err.setLevel(logging.WARNING)
        for handler in (out, err):
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def main(argv: Sequence[str] | None = None) -> int:
    log = _console_logger()
    args = build_parser().parse_args(argv)
    try:
        engine_args = parse_engine_args(args.engine_arg)
    except ValueError as error:
        log.error("multilora-serve: %s", error)
        return 2
    server = TritonServer(
        args.model_repository, host=args.host, http_port=args.http_port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port, engine_args=engine_args,
        log_verbose=args.log_verbose, ready_timeout=args.ready_timeout, log_file=args.log_file,
        echo=True, extra_args=args.tritonserver_arg, model_control_mode=args.model_control_mode,
        admin_key=args.admin_key, restrict_admin=not args.no_restricted_api)

    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        # First signal: let tritonserver unload the model cleanly; a second one kills it.
        process = server.process
        if process is not None and process.poll() is None:
            if stop_requested.is_set():
                kill_process_group(process)
            else:
                process.send_signal(signal.SIGTERM)
        stop_requested.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
    except TritonServerError as error:
        if stop_requested.is_set():
            server.stop()
            return 0
        log.error("multilora-serve: %s", error)
        return 1
    log.info("HTTP:    %s  (e.g. %s/v2/models/multilora/generate)", server.http_url, server.http_url)
    log.info("gRPC:    %s", server.grpc_url)
    log.info("metrics: %s", server.metrics_url)
    if server.restrict_admin:
        log.info("admin:   model-repository, logging and shared-memory APIs need the header '%s: %s' "
                 "(gRPC metadata '%s%s')", ADMIN_KEY_HEADER, server.admin_key, GRPC_HEADER_PREFIX, ADMIN_KEY_HEADER)
    log.info("multilora ready: http=%s grpc=%s metrics=%s", server.http_url, server.grpc_url, server.metrics_url)
    code = server.wait()
    server.stop()
    if stop_requested.is_set():
        return 0
    log.error("multilora-serve: tritonserver exited with code %s\n%s", code, server.log_tail())
    return code or 1


if __name__ == "__main__":
    sys.exit(main())
