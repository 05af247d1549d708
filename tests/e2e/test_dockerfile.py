"""The Dockerfile refers to things that exist (no docker engine here: paths only)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from multilora_serve import container, launcher

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        lines.append((keyword.upper(), rest.strip()))
        current = ""
    return lines


def copies() -> list[tuple[list[str], str]]:
    result = []
    for keyword, rest in instructions():
        if keyword != "COPY":
            continue
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        assert len(parts) >= 2, f"COPY {rest}"
        result.append((parts[:-1], parts[-1]))
    return result


def workdir() -> str:
    dirs = [rest for keyword, rest in instructions() if keyword == "WORKDIR"]
    assert dirs, "Dockerfile sets no WORKDIR"
    return dirs[-1]


def test_base_image_is_a_triton_container_with_python_3_12_or_newer():
    args = {m.group(1): m.group(2) for m in re.finditer(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M)}
    image = next(rest for keyword, rest in instructions() if keyword == "FROM")
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", image)
    assert match, image
    assert (int(match.group(1)), int(match.group(2))) >= (24, 12)  # Ubuntu 24.04, Python 3.12


def test_every_copy_source_exists():
    for sources, _ in copies():
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"


def cmd() -> list[str]:
    return json.loads([rest for keyword, rest in instructions() if keyword == "CMD"][-1])


def test_cmd_serves_the_copied_model_repository():
    argv = cmd()
    assert argv == ["python3", "-m", "multilora_serve.container"]
    command, _ = container.tritonserver_argv({})
    assert command[0] == "tritonserver"
    repository = next(a.split("=", 1)[1] for a in command if a.startswith("--model-repository="))
    destinations = {
        dest if dest.startswith("/") else f"{workdir().rstrip('/')}/{dest.removeprefix('./')}"
        for sources, dest in copies() if sources == ["model_repository"]}
    assert repository.rstrip("/") in {d.rstrip("/") for d in destinations}
    assert (ROOT / "model_repository" / "multilora" / "config.pbtxt").is_file()
    assert ["multilora_serve"] in [sources for sources, _ in copies()]  # the module the CMD runs


def test_cmd_restricts_the_administrative_apis_as_the_launcher_does():
    """Any client could otherwise load and unload models and change Triton's logging: the
    image's command asks for the admin key, the one given or a random one."""
    command, key = container.tritonserver_argv({launcher.ADMIN_KEY_ENV: "s3cret"})
    assert key == "s3cret"
    assert launcher.restricted_api_args("s3cret") == [a for a in command if "restricted" in a]
    for flag in ("--http-restricted-api=", "--grpc-restricted-protocol="):
        (setting,) = [a.removeprefix(flag) for a in command if a.startswith(flag)]
        apis, _, header = setting.partition(":")
        assert set(apis.split(",")) == {"model-repository", "logging", "shared-memory"}
        assert header == f"{launcher.ADMIN_KEY_HEADER}=s3cret"
    first, second = (container.tritonserver_argv({})[1] for _ in range(2))
    assert first and second and first != second and len(first) >= 24  # random, never a fixed default
    command, key = container.tritonserver_argv({container.NO_RESTRICTED_API_ENV: "1"})
    assert key is None and not [a for a in command if "restricted" in a]
    assert "--model-control-mode=explicit" in command
    assert container.tritonserver_argv({}, ["--log-verbose=1"])[0][-1] == "--log-verbose=1"


def test_published_ports_in_the_usage_are_on_the_hosts_loopback():
    usage = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#") and " -p " in line]
    published = re.findall(r"-p (\S+)", " ".join(usage))
    assert published and all(p.startswith("127.0.0.1:") for p in published), published


def test_engine_json_paths_resolve_inside_the_image():
    """engine.json / multi_lora.json paths are relative to their directory; the demo they name
    must be copied to the same place relative to the model repository."""
    dests = {tuple(sources): dest for sources, dest in copies()}
    assert ("demo",) in dests and ("model_repository",) in dests
    version_dir = ROOT / "model_repository" / "multilora" / "1"
    engine_args = json.loads((version_dir / "engine.json").read_text())
    adapters = json.loads((version_dir / "multi_lora.json").read_text())
    for path in [engine_args["model"], *engine_args.get("lora_roots", []), *adapters.values()]:
        resolved = (version_dir / path).resolve()
        assert resolved.is_relative_to(ROOT / "demo"), f"{path} leaves demo/"


def test_project_is_installed_editable_with_pinned_dependencies():
    runs = " ".join(rest for keyword, rest in instructions() if keyword == "RUN")
    assert "-e ." in runs
    for package in ("torch", "numpy", "triton", "transformers", "safetensors"):
        assert re.search(rf'"?{package}==[\w.$]+', runs) or \
            re.search(rf'"{package}==\$\{{\w+\}}"', runs), f"{package} is not pinned"
