"""Churn: 10,000 mixed load / unload / reload / file-swap / request / abort / step operations on
one engine, with traffic running all along. Every request that is served gives the output of the
adapter version it was admitted with (the demo adapters do known string tasks, so the expected
text is the task applied to the prompt), every refused one is refused as unknown, and at the end
the page ledger and the reference counts are back at their baseline."""
import os
import random
import shutil
import tempfile

import pytest

from demo.tasks import ADAPTERS, TASKS, heldout_strings
from engine.adapter_fleet import evict_retired
from engine.config import EngineConfig
from engine.errors import AdapterNotFoundError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "demo")
NUM_OPS = int(os.environ.get("CHURN_OPS", 10_000))
NUM_NAMES = 8
PARAMS = SamplingParams(temperature=0, max_tokens=24)
FILES = ("adapter_config.json", "adapter_model.safetensors")


def put_version(root: str, version: str, name: str) -> None:
    """Point ``root/name`` at a copy of a version's files (one rename of a link inside the root:
    the files seen through it get another inode, as a replaced file does)."""
    link = os.path.join(root, f".{name}.tmp")
    os.symlink(os.path.join(root, f".v-{version}"), link)
    os.replace(link, os.path.join(root, name))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # renames there cost microseconds
    root = tempfile.mkdtemp(prefix="multilora-churn-", dir=shm)
    for version in ADAPTERS:
        shutil.copytree(os.path.join(DEMO, "adapters", version), os.path.join(root, f".v-{version}"))
    engine = LLMEngine(EngineConfig(model=os.path.join(DEMO, "base"), num_pages=256,
                                    lora_roots=[str(root)], max_host_adapter_bytes=3 << 20, max_num_seqs=48))
    engine.churn_root = root
    yield engine
    shutil.rmtree(root, ignore_errors=True)


def test_10000_operations_under_traffic_leave_the_ledgers_at_baseline_with_no_wrong_output(engine):
    rng = random.Random(14)
    root = engine.churn_root
    lora = engine.lora
    digest_version = {}  # the three versions' digests, learned by loading each once
    for version in ADAPTERS:
        put_version(root, version, f"ref-{version}")
        digest_version[lora.load(f"ref-{version}").digest] = version
        lora.unload(f"ref-{version}")
    # short prompts keep each request a few steps long (a CPU step of the demo takes ~40 ms)
    prompts = sorted({s[:rng.randrange(1, 5)].strip() or "a" for s in heldout_strings(64)})
    names = [f"n{i}" for i in range(NUM_NAMES)]
    on_disk = {}
    for name in names:
        on_disk[name] = rng.choice(ADAPTERS)
        put_version(root, on_disk[name], name)
    served = set(names)  # names under the root are served until unloaded
    live: dict[str, tuple[str, str]] = {}  # request id -> (version or "" for the base, prompt)
    text: dict[str, str] = {}
    counts = dict.fromkeys(["request", "refused", "step", "load", "unload", "reload", "swap", "abort"], 0)
    wrong: list = []
    finished = 0

    def collect(outputs) -> None:
        nonlocal finished
        for out in outputs:
            text[out.request_id] = text.get(out.request_id, "") + out.text
            if out.finished:
                version, prompt = live.pop(out.request_id)
                finished += 1
                if out.finish_reason != "abort":
                    want = TASKS[version](prompt)
                    if text[out.request_id] != want:
                        wrong.append((out.request_id, version, prompt, text[out.request_id], want))
                del text[out.request_id]

    for i in range(NUM_OPS):
        op = rng.choices(["request", "step", "load", "unload", "reload", "swap", "abort"],
                         weights=[20, 4, 20, 20, 14, 14, 8])[0]
        counts[op] += 1
        name = rng.choice(names)
        if op == "request":
            target = None if rng.random() < 0.1 else name
            rid, prompt = f"r{i}", rng.choice(prompts)
            try:
                seq = engine.make_sequence(rid, prompt, None, PARAMS, target)
            except AdapterNotFoundError as error:
                assert target not in served and str(error) == f"LoRA adapter '{target}' is not known"
                counts["refused"] += 1
                continue
            assert target is None or target in served
            live[rid] = (digest_version[seq.lora.digest] if seq.lora is not None else "", prompt)
            if seq.lora is not None:
                assert digest_version[seq.lora.digest] == on_disk[target]  # never stale
            engine.add(seq)
        elif op == "step":
            collect(engine.step())
        elif op == "load":
            lora.load(name, os.path.join(root, name))
            served.add(name)
        elif op == "unload":
            if name in served:
                lora.unload(name)
                served.discard(name)
            else:
                with pytest.raises(AdapterNotFoundError):
                    lora.unload(name)
        elif op in ("reload", "swap"):
            on_disk[name] = rng.choice(ADAPTERS)
            put_version(root, on_disk[name], name)
            if op == "reload":
                if name in served:
                    assert digest_version[lora.reload(name)[1].digest] == on_disk[name]
                else:
                    with pytest.raises(AdapterNotFoundError):
                        lora.reload(name)
        elif op == "abort" and live:
            out = engine.abort(rng.choice(sorted(live)))
            collect([out] if out is not None else [])
        if i % 500 == 0:
            engine.pages.check_invariants()
    while engine.has_work():
        collect(engine.step())
    assert not wrong, f"{len(wrong)} wrong outputs, e.g. {wrong[:3]}"
    assert not live and finished == counts["request"] - counts["refused"]
    assert min(counts.values()) > NUM_OPS // 100, counts  # every kind of operation ran many times
    # back to baseline: no KV, no pin, no reference; after unloading every name, no adapter at all
    engine.pages.check_invariants()
    assert engine.pages.num_kv_pages == 0 and not engine.pages._pins and not lora._refs
    for name in sorted(served):
        lora.unload(name)
    evict_retired(engine)
    assert engine.pages.num_adapter_pages == 0 and engine.pages.num_free == engine.pages.num_pages
    assert lora.snapshot().num_host == 0 and lora.snapshot().host_bytes == 0
    assert not engine.retired_adapters
    assert engine.pages.num_adapter_evictions > 0 and engine.scheduler.adapter_pool_hits > 0
