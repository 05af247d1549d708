"""Adapter identity: a name resolves to a digest when a request is admitted and the request keeps
it; the host tier and the GPU pool are keyed by digest. The failure cases users report against
other servers (stale versions after a reload, one tenant's request served with another adapter,
a file changed while it is read), each as a test on a real engine."""
import os
import shutil
import threading
import time

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from engine.adapter_fleet import evict_retired
from engine.config import EngineConfig
from engine.errors import AdapterExistsError, AdapterLoadError, AdapterNotFoundError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from helpers import write_adapter, write_checkpoint

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
PROMPT = [1, 40, 41, 42, 43, 44]
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base, two versions of one adapter (same shapes, other weights), and an adapter made for
    a base of another width."""
    root = tmp_path_factory.mktemp("identity")
    base = write_checkpoint(str(root / "base"), "llama")
    v1 = write_adapter(str(root / "v1"), base, 4, ["q_proj", "v_proj", "down_proj"], seed=1)
    v2 = write_adapter(str(root / "v2"), base, 4, ["q_proj", "v_proj", "down_proj"], seed=2)
    other_base = write_checkpoint(str(root / "other_base"), "llama", hidden_size=48)
    foreign = write_adapter(str(root / "foreign"), other_base, 4, ["q_proj", "v_proj"], seed=3)
    return {"base": base, "v1": v1, "v2": v2, "foreign": foreign}


def put_version(source: str, dest) -> None:
    """Replace an adapter directory's files with another version's (atomic renames)."""
    os.makedirs(dest, exist_ok=True)
    for name in FILES:
        shutil.copy(os.path.join(source, name), os.path.join(dest, name + ".tmp"))
        os.replace(os.path.join(dest, name + ".tmp"), os.path.join(dest, name))


def make_engine(models, tmp_path, adapters=None) -> LLMEngine:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    return LLMEngine(EngineConfig(model=models["base"], num_pages=96, block_size=4, lora_roots=[str(root)]),
                     adapters or {})


def run(engine: LLMEngine, seqs) -> dict[str, list[int]]:
    tokens = {s.request_id: [] for s in seqs}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    return tokens


def peft_greedy(base: str, adapter: str) -> list[int]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    model.eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


@pytest.fixture(scope="module")
def expected(models):
    return {v: peft_greedy(models["base"], models[v]) for v in ("v1", "v2")}


def assert_baseline(engine: LLMEngine) -> None:
    """Nothing held: no KV page, no pin, no reference; every page free or an adapter's."""
    engine.pages.check_invariants()
    assert engine.pages.num_kv_pages == 0 and not engine.pages._pins and not engine.lora._refs
    assert engine.pages.num_free + engine.pages.num_adapter_pages == engine.pages.num_pages


def test_same_name_reload_serves_the_new_version(models, tmp_path, expected):
    engine = make_engine(models, tmp_path)
    put_version(models["v1"], tmp_path / "root" / "a")
    first = engine.make_sequence("r1", None, PROMPT, GREEDY, "a")
    engine.add(first)
    assert run(engine, [first])["r1"] == expected["v1"]
    put_version(models["v2"], tmp_path / "root" / "a")
    previous, packed = engine.lora.reload("a")
    assert previous == first.lora.digest and packed.digest != previous
    second = engine.make_sequence("r2", None, PROMPT, GREEDY, "a")
    engine.add(second)
    assert second.lora.digest == packed.digest and run(engine, [second])["r2"] == expected["v2"]
    assert not engine.pages.is_resident(previous), "the old version's pages outlived the reload"
    assert_baseline(engine)


def test_a_changed_file_is_read_again_at_resolution_without_reload(models, tmp_path, expected):
    """Size, mtime and inode of the files are compared at every resolution: never served stale."""
    engine = make_engine(models, tmp_path)
    put_version(models["v1"], tmp_path / "root" / "a")
    d1 = engine.lora.acquire("a")
    engine.lora.release(d1.key)
    put_version(models["v2"], tmp_path / "root" / "a")
    seq = engine.make_sequence("r", None, PROMPT, GREEDY, "a")
    engine.add(seq)
    assert seq.lora.digest != d1.digest and run(engine, [seq])["r"] == expected["v2"]
    assert_baseline(engine)


def test_reload_while_requests_run_keeps_each_request_on_its_version(models, tmp_path, expected):
    """Requests admitted before the reload finish with the old version, those after it get the
    new one, in the same batches; each output equals HF + PEFT with its version."""
    engine = make_engine(models, tmp_path)
    put_version(models["v1"], tmp_path / "root" / "a")
    seqs, versions = [], {}
    for i in range(3):
        seqs.append(engine.make_sequence(f"old{i}", None, PROMPT, GREEDY, "a"))
        engine.add(seqs[-1])
        versions[f"old{i}"] = "v1"
    tokens = {s.request_id: [] for s in seqs}
    for _ in range(3):  # the old ones are decoding
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    put_version(models["v2"], tmp_path / "root" / "a")
    engine.lora.reload("a")
    for i in range(3):
        seq = engine.make_sequence(f"new{i}", None, PROMPT, GREEDY, "a")
        engine.add(seq)
        tokens[seq.request_id] = []
        versions[seq.request_id] = "v2"
    for out in engine.step():
        tokens[out.request_id].extend(out.token_ids)
    assert engine.pages.num_resident_adapters == 2  # both versions serve in one batch
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    assert {rid: tokens[rid] for rid in versions} == {rid: expected[v] for rid, v in versions.items()}
    assert engine.pages.num_resident_adapters == 1  # the old version left with its last request
    assert_baseline(engine)


def test_two_names_with_the_same_bytes_share_one_copy_and_one_set_of_pages(models, tmp_path, expected):
    engine = make_engine(models, tmp_path)
    put_version(models["v1"], tmp_path / "root" / "a")
    put_version(models["v1"], tmp_path / "root" / "b")
    seqs = [engine.make_sequence(f"r{i}", None, PROMPT, GREEDY, name) for i, name in enumerate("abab")]
    for seq in seqs:
        engine.add(seq)
    assert len({id(s.lora) for s in seqs}) == 1 and engine.lora.snapshot().num_host == 1
    tokens = run(engine, seqs)
    assert all(t == expected["v1"] for t in tokens.values())
    assert engine.pages.num_resident_adapters == 1 and engine.scheduler.adapter_pool_misses == 1
    # unloading one name keeps the bytes the other serves
    engine.lora.unload("a")
    evict_retired(engine)
    assert engine.pages.num_resident_adapters == 1 and engine.lora.is_in_host("b")
    with pytest.raises(AdapterNotFoundError, match="^LoRA adapter 'a' is not known$"):
        engine.make_sequence("x", None, PROMPT, GREEDY, "a")
    assert_baseline(engine)


def test_a_file_replaced_during_load_never_gets_the_digest_of_other_bytes(models, tmp_path):
    """A writer swaps the weights file between two versions, by rename and by rewriting it in
    place, while the adapter is read again and again: every load's digest belongs to the bytes it
    packed. Either a whole version (its digest and its weights), or a torn mix that has a digest
    of its own, never V1's or V2's."""
    engine = make_engine(models, tmp_path)
    lora = engine.lora
    path = tmp_path / "root" / "a"
    known = {}
    for version in ("v1", "v2"):
        put_version(models[version], path)
        _, packed = lora.reload("a")
        known[packed.digest] = packed.data.clone()
    data = {v: open(os.path.join(models[v], FILES[1]), "rb").read() for v in ("v1", "v2")}
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            source = data["v1" if i % 2 else "v2"]
            if i % 4 < 2:
                with open(path / FILES[1], "r+b") as f:  # in place, in two halves
                    f.write(source[:len(source) // 2])
                    f.flush()
                    f.write(source[len(source) // 2:])
            else:
                with open(path / (FILES[1] + ".tmp"), "wb") as f:
                    f.write(source)
                os.replace(path / (FILES[1] + ".tmp"), path / FILES[1])
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        results = [lora.reload("a")[1] for _ in range(60)]
    finally:
        stop.set()
        thread.join()
    whole = 0
    for packed in results:
        if packed.digest in known:
            assert torch.equal(packed.data, known[packed.digest]), "a digest labels bytes other than its own"
            whole += 1
        else:
            assert not any(torch.equal(packed.data, d) for d in known.values()), "known bytes, unknown digest"
    assert whole > 0


def test_unload_while_requests_run(models, tmp_path, expected):
    """Running requests finish on their version, new ones get NOT_FOUND, the pages are freed
    when the last one ends."""
    engine = make_engine(models, tmp_path)
    put_version(models["v1"], tmp_path / "root" / "a")
    seqs = [engine.make_sequence(f"r{i}", None, PROMPT, GREEDY, "a") for i in range(2)]
    for seq in seqs:
        engine.add(seq)
    tokens = {s.request_id: [] for s in seqs}
    for out in engine.step() + engine.step():
        tokens[out.request_id].extend(out.token_ids)
    digest = engine.lora.unload("a")
    assert digest == seqs[0].lora.digest and engine.lora.refs(digest) == 2
    with pytest.raises(AdapterNotFoundError, match="^LoRA adapter 'a' is not known$"):
        engine.make_sequence("late", None, PROMPT, GREEDY, "a")
    assert engine.pages.is_resident(digest)
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id].extend(out.token_ids)
    assert all(t == expected["v1"] for t in tokens.values())
    assert not engine.pages.is_resident(digest) and engine.pages.num_adapter_pages == 0
    assert engine.lora.snapshot().num_host == 0
    assert_baseline(engine)
    engine.lora.load("a")  # found under the root again only when loaded again
    assert engine.lora.is_in_host("a")


def test_an_adapter_made_for_another_base_is_refused_on_shapes(models, tmp_path):
    engine = make_engine(models, tmp_path)
    shutil.copytree(models["foreign"], tmp_path / "root" / "foreign")
    with pytest.raises(AdapterLoadError, match=r"^LoRA adapter 'f': layer 0 q_proj: .* do not match the base model"):
        engine.lora.load("f", str(tmp_path / "root" / "foreign"))
    with pytest.raises(AdapterNotFoundError):
        engine.lora.acquire("f")


def test_load_unload_and_reload_of_a_multi_lora_json_name(models, tmp_path, expected):
    engine = make_engine(models, tmp_path, adapters={"cfg": models["v1"]})
    assert [row[0] for row in engine.lora.entries()] == ["cfg"]
    packed = engine.lora.load("cfg")  # no path: the configured one
    assert engine.lora.is_in_host("cfg") and engine.lora.load("cfg") is packed
    previous, again = engine.lora.reload("cfg")
    assert previous == again.digest == packed.digest  # unchanged files: the same version
    assert engine.lora.unload("cfg") == packed.digest
    assert engine.lora.entries() == [] and not engine.lora.is_in_host("cfg")
    with pytest.raises(AdapterNotFoundError):
        engine.make_sequence("x", None, PROMPT, GREEDY, "cfg")
    with pytest.raises(AdapterNotFoundError):
        engine.lora.reload("cfg")
    engine.lora.load("cfg")  # back from multi_lora.json
    seq = engine.make_sequence("r", None, PROMPT, GREEDY, "cfg")
    engine.add(seq)
    assert seq.lora.digest == packed.digest and run(engine, [seq])["r"] == expected["v1"]
    # another path for a configured name: refused until it is unloaded
    put_version(models["v2"], tmp_path / "root" / "v2copy")
    with pytest.raises(AdapterExistsError, match="already served from another path"):
        engine.lora.load("cfg", str(tmp_path / "root" / "v2copy"))
    assert_baseline(engine)


def test_a_path_outside_lora_roots_is_refused(models, tmp_path, caplog):
    engine = make_engine(models, tmp_path)
    for path in (models["v1"], str(tmp_path / "root" / ".." / "elsewhere"), str(tmp_path / "root")):
        with pytest.raises(AdapterLoadError, match="lora_path must lie under one of the server's lora_roots") as caught:
            engine.lora.load("x", path)
        assert str(tmp_path) not in str(caught.value)  # no server path in the message
    os.symlink(models["v1"], tmp_path / "root" / "link")  # inside by name, outside when resolved
    with pytest.raises(AdapterLoadError, match="lora_path must lie under"):
        engine.lora.load("x", str(tmp_path / "root" / "link"))
    assert engine.lora.entries() == []


@pytest.mark.parametrize("weights, message", [
    (b"\x80\x04\x95\x00\x00pickled", "adapter_weights is a pickle file"),
    (b"PK\x03\x04torch-zip", "adapter_weights is a pickle file"),
    (b"hello", "adapter_weights is not a safetensors file"),
    (b"", "adapter_weights is not a safetensors file"),
])
def test_an_upload_that_is_not_safetensors_is_refused(models, tmp_path, weights, message):
    engine = make_engine(models, tmp_path)
    config = open(os.path.join(models["v1"], FILES[0]), "rb").read()
    with pytest.raises(AdapterLoadError, match=f"^LoRA adapter 'up': {message}"):
        engine.lora.upload("up", config, weights)
    assert engine.lora.entries() == []


def test_an_upload_is_served_and_survives_leaving_host_memory(models, tmp_path, expected):
    engine = make_engine(models, tmp_path)
    files = [open(os.path.join(models["v1"], f), "rb").read() for f in FILES]
    packed = engine.lora.upload("up", *files)
    assert engine.lora.upload("up", *files).digest == packed.digest  # the same bytes again: a no-op
    with pytest.raises(AdapterExistsError, match="already served with other weights"):
        engine.lora.upload("up", files[0], open(os.path.join(models["v2"], FILES[1]), "rb").read())
    deadline = time.monotonic() + 10
    while engine.lora._spooling:  # its copy on disk is written off the upload's path
        assert time.monotonic() < deadline
        time.sleep(0.01)
    engine.lora.max_host_bytes = 0
    engine.lora._shrink()  # out of host memory: read back from the upload's copy on disk
    assert not engine.lora.is_in_host("up")
    seq = engine.make_sequence("r", None, PROMPT, GREEDY, "up")
    engine.add(seq)
    assert seq.lora.digest == packed.digest and run(engine, [seq])["r"] == expected["v1"]
    engine.lora.close()


def test_64_concurrent_loads_of_one_name_read_it_once(models, tmp_path):
    engine = make_engine(models, tmp_path)
    put_version(models["v1"], tmp_path / "root" / "a")
    barrier = threading.Barrier(64)
    results = [None] * 64

    def load(i: int) -> None:
        barrier.wait()
        results[i] = engine.lora.load("a", str(tmp_path / "root" / "a"))

    threads = [threading.Thread(target=load, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.lora.snapshot().loads_total == 1
    assert len({id(p) for p in results}) == 1 and engine.lora.snapshot().num_host == 1


def test_the_digest_covers_the_serving_config_the_base_and_the_dtype(models, tmp_path):
    """Same tensors with another lora_alpha, or packed for another serving dtype or base: other
    digests. The same files under other names or paths: the same digest."""
    from engine.adapters import load_adapter
    from engine.adapter_identity import serving_salt
    from engine.config import ModelConfig
    import json

    config = ModelConfig.from_dir(models["base"])
    salt = serving_salt(b"base", torch.float32)
    digest = load_adapter("a", models["v1"], config, 64, salt=salt).digest
    shutil.copytree(models["v1"], tmp_path / "copy")
    assert load_adapter("b", str(tmp_path / "copy"), config, 64, salt=salt).digest == digest
    cfg_path = tmp_path / "copy" / FILES[0]
    cfg = json.loads(cfg_path.read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 2
    cfg_path.write_text(json.dumps(cfg))
    others = {load_adapter("b", str(tmp_path / "copy"), config, 64, salt=salt).digest,
              load_adapter("a", models["v1"], config, 64, salt=serving_salt(b"base", torch.float16)).digest,
              load_adapter("a", models["v1"], config, 64, salt=serving_salt(b"other", torch.float32)).digest}
    assert digest not in others and len(others) == 3
