"""The client examples run against a live server with the demo model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from e2e_helpers import MODEL_REPOSITORY, ROOT

pytestmark = pytest.mark.e2e
EXAMPLES = ROOT / "client_examples"


def run(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_grpc_stream(llm_server):
    done = run([sys.executable, str(EXAMPLES / "grpc_stream.py"), "--url", llm_server.grpc_url,
                "--lora", "upper", "hello world"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["HELLO WORLD", "[finish_reason: stop]"]


def test_grpc_stream_reports_errors(llm_server):
    done = run([sys.executable, str(EXAMPLES / "grpc_stream.py"), "--url", llm_server.grpc_url,
                "--lora", "no_such_adapter"])
    assert done.returncode == 1 and "no_such_adapter" in done.stderr


@pytest.mark.parametrize("stream", [False, True])
def test_http_generate(llm_server, stream):
    done = run([sys.executable, str(EXAMPLES / "http_generate.py"), "--url",
                llm_server.http_address, "--lora", "reverse", "hello world"]
               + (["--stream"] if stream else []))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "dlrow olleh"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_generate(llm_server):
    done = run(["bash", str(EXAMPLES / "curl_generate.sh"), "--url", llm_server.http_url,
                "--lora", "rot13", "hello world"])
    assert done.returncode == 0, done.stderr
    generate_line = done.stdout.splitlines()[1]
    assert json.loads(generate_line)["text_output"] == "uryyb jbeyq"
    events = [json.loads(line[len("data: "):]) for line in done.stdout.splitlines()
              if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == "uryyb jbeyq"


def test_grpc_many_adapters(llm_server):
    done = run([sys.executable, str(EXAMPLES / "grpc_many_adapters.py"), "--url",
                llm_server.grpc_url, "-n", "32"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("OK: 32 requests over 4 adapters")


def test_shell_examples_parse():
    for script in EXAMPLES.glob("*.sh"):
        assert run(["bash", "-n", str(script)]).returncode == 0, script


def test_perf_analyzer_input_matches_the_model_inputs():
    config = (MODEL_REPOSITORY / "multilora" / "config.pbtxt").read_text()
    data = json.loads((EXAMPLES / "perf_analyzer_input.json").read_text())["data"]
    assert len(data) >= 4
    for entry in data:
        for name, values in entry.items():
            assert f'name: "{name}"' in config, name
            assert isinstance(values, list) and len(values) == 1
        assert entry["stream"] == [True]
        json.loads(entry["sampling_parameters"][0])
    assert {e["lora_name"][0] for e in data} == {"", "upper", "reverse", "rot13"}


def test_adapter_admin_lists_and_says_why_it_cannot_load(llm_server):
    """The shared server has no admin token: list answers, load is refused with what to set."""
    done = run([sys.executable, str(EXAMPLES / "adapter_admin.py"), "--url", llm_server.grpc_url, "list"])
    assert done.returncode == 0, done.stderr
    assert {"upper", "reverse", "rot13"} <= {row["name"] for row in json.loads(done.stdout)["adapters"]}
    done = run([sys.executable, str(EXAMPLES / "adapter_admin.py"), "--url", llm_server.grpc_url, "--token", "t",
                "upload", "x", str(ROOT / "demo" / "adapters" / "upper")])
    assert done.returncode == 1 and "MULTILORA_ADMIN_TOKEN" in done.stderr and "only action list" in done.stderr
