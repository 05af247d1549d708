"""The Dockerfile refers to things that exist (no docker engine here: paths only)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

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


def test_cmd_serves_the_copied_model_repository():
    cmd = [rest for keyword, rest in instructions() if keyword == "CMD"][-1]
    argv = json.loads(cmd)
    assert argv[0] == "tritonserver"
    repository = next(a.split("=", 1)[1] for a in argv if a.startswith("--model-repository="))
    destinations = {
        dest if dest.startswith("/") else f"{workdir().rstrip('/')}/{dest.removeprefix('./')}"
        for sources, dest in copies() if sources == ["model_repository"]}
    assert repository.rstrip("/") in {d.rstrip("/") for d in destinations}
    assert (ROOT / "model_repository" / "multilora" / "config.pbtxt").is_file()


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
