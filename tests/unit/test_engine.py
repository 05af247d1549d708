"""Engine behaviour: stop conditions, streaming deltas, abort, errors, checkpoints."""
import json
import os
import shutil
import threading

import pytest
from transformers import AutoModelForCausalLM

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig, ModelConfig
from engine.errors import AdapterNotFoundError, CheckpointError, InvalidRequestError
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from helpers import write_adapter, write_checkpoint

PROMPT = [1, 40, 41, 42, 43, 44]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("engine") / "base"), "llama_gqa")


@pytest.fixture(scope="module")
def llm(base):
    return LLM(model=base, num_pages=64)


def free_run(llm, n=20):
    return llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]


def test_stop_string_truncates_text(llm):
    full = free_run(llm)
    text = full.text
    assert len(text) >= 6
    stop = text[3:5]
    first = text.find(stop)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:first]
    assert full.token_ids[:len(out.token_ids)] == out.token_ids


def test_stop_token_ids_and_min_tokens(llm):
    full = free_run(llm).token_ids
    target = full[4]
    first = full.index(target)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[target],
                                                ignore_eos=True))[0]
    assert out.token_ids == full[:first + 1] and out.finish_reason == "stop"
    # min_tokens: the stop token is masked until min_tokens are out
    later = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, min_tokens=first + 3,
                                                  stop_token_ids=[target], ignore_eos=True))[0]
    assert len(later.token_ids) >= first + 3
    assert target not in later.token_ids[:first + 3]


def test_eos_stops_unless_ignored(llm):
    full = free_run(llm).token_ids
    eos_llm_ids = llm.engine.eos_token_ids
    assert 2 in eos_llm_ids
    # make the 3rd generated token an EOS by declaring it one
    llm.engine.eos_token_ids = (full[2],)
    try:
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20))[0]
        assert out.token_ids == full[:full.index(full[2]) + 1] and out.finish_reason == "stop"
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
        assert out.token_ids == full and out.finish_reason == "length"
    finally:
        llm.engine.eos_token_ids = eos_llm_ids


def test_prompt_and_max_tokens_limits(llm):
    engine = llm.engine
    limit = engine.max_model_len
    with pytest.raises(InvalidRequestError, match="prompt has"):
        engine.make_sequence("x", None, [1] * limit, SamplingParams(max_tokens=1), None)
    with pytest.raises(InvalidRequestError, match="max_tokens=.*beyond the context"):
        engine.make_sequence("x", None, [1] * 10, SamplingParams(max_tokens=limit), None)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.make_sequence("x", None, [1, 999999], SamplingParams(), None)
    with pytest.raises(InvalidRequestError, match="exactly one"):
        engine.make_sequence("x", "text", [1], SamplingParams(), None)
    with pytest.raises(AdapterNotFoundError, match="'missing' is not known"):
        engine.make_sequence("x", None, [1, 2], SamplingParams(), "missing")


def test_async_engine_step_sink_gets_each_steps_outputs_at_once(base):
    """With a step sink, the loop hands over one list per step (all of the step's requests), and
    the per-request callbacks are not called for those outputs."""
    engine = AsyncEngine(EngineConfig(model=base, num_pages=64))
    batches, direct = [], []
    done = threading.Event()

    def sink(outputs):
        batches.append(list(outputs))
        if sum(o.finished for batch in batches for o in batch) == 3:
            done.set()

    engine.step_sink = sink
    engine.start()
    try:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        for rid in ("a", "b", "c"):
            engine.add_request(rid, None, [1, 5, 7], params, None, direct.append)
        assert done.wait(30)
    finally:
        engine.shutdown()
    assert direct == []
    outputs = [o for batch in batches for o in batch]
    for rid in ("a", "b", "c"):
        mine = [o for o in outputs if o.request_id == rid]
        assert sum(len(o.token_ids) for o in mine) == 6 and [o.finished for o in mine] == [False] * (len(mine) - 1) + [True]
    assert max(len(batch) for batch in batches) == 3  # the three requests decode in the same steps
    assert all(len({o.request_id for o in batch}) == len(batch) for batch in batches)  # one output per request a step


def test_async_engine_streams_deltas_and_aborts(base, tmp_path):
    adapter = write_adapter(str(tmp_path / "a"), base, 4, ["q_proj"], seed=3)
    engine = AsyncEngine(EngineConfig(model=base, num_pages=64), {"a": adapter})
    engine.start()
    try:
        done = threading.Event()
        got = []

        def collect(out):
            got.append(out)
            if out.finished:
                done.set()

        engine.add_request("r1", "hello", None, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), "a",
                           collect)
        assert done.wait(30)
        assert sum(len(o.token_ids) for o in got) == 8 and [o.finished for o in got].count(True) == 1
        assert got[-1].finish_reason == "length" and got[-1].num_prompt_tokens == 6

        aborted = threading.Event()
        final = []

        def on_abort(out):
            if out.finished:
                final.append(out)
                aborted.set()

        limit = engine.max_model_len
        engine.add_request("r2", None, [1, 5], SamplingParams(max_tokens=limit - 2, ignore_eos=True), None, on_abort)
        engine.abort("r2")
        assert aborted.wait(30)
        assert final[0].finish_reason == "abort"
        for _ in range(100):
            stats = engine.stats()
            if stats.num_kv_blocks_used == 0:
                break
            threading.Event().wait(0.05)
        assert stats.num_kv_blocks_used == 0 and stats.num_running == 0
    finally:
        engine.shutdown()


def test_sharded_checkpoint_loads_the_same(base, tmp_path, llm):
    model = AutoModelForCausalLM.from_pretrained(base)
    sharded = str(tmp_path / "sharded")
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    for name in os.listdir(base):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(base, name), sharded)
    out = LLM(model=sharded, num_pages=64).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert out.token_ids == free_run(llm).token_ids


def test_bad_checkpoints_say_what_is_wrong(base, tmp_path):
    with open(os.path.join(base, "config.json")) as f:
        raw = json.load(f)
    with pytest.raises(CheckpointError, match="not supported"):
        ModelConfig.from_dict({**raw, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(CheckpointError, match="missing required key 'hidden_size'"):
        ModelConfig.from_dict({k: v for k, v in raw.items() if k != "hidden_size"})
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    os.rename(broken / "model.safetensors", broken / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        LLM(model=str(broken))
    with pytest.raises(ValueError, match="unknown key"):
        EngineConfig.from_dict({"model": base, "max_num_seq": 3})


def test_adapter_from_disk_loads_off_the_request_path_and_abort_while_loading(base, tmp_path):
    """A request whose adapter is on disk returns from add_request before the load; it is served
    once loaded; one aborted while its adapter loads ends with 'abort' and holds nothing."""
    adapters = {name: write_adapter(str(tmp_path / name), base, 8, ["q_proj", "down_proj"], seed=i)
                for i, name in enumerate(["x", "y"])}
    engine = AsyncEngine(EngineConfig(model=base, num_pages=64), adapters)
    engine.start()
    try:
        finals: dict[str, list] = {"x": [], "y": []}
        done = {"x": threading.Event(), "y": threading.Event()}

        def collector(name):
            def collect(out):
                finals[name].append(out)
                if out.finished:
                    done[name].set()
            return collect

        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        assert not engine.engine.lora.is_in_host("x")
        engine.add_request("rx", None, [1, 7, 8], params, "x", collector("x"))
        engine.add_request("ry", None, [1, 7, 8], params, "y", collector("y"))
        engine.abort("ry")
        assert done["x"].wait(30) and done["y"].wait(30)
        assert finals["x"][-1].finish_reason == "length" and sum(len(o.token_ids) for o in finals["x"]) == 6
        expected = LLM(model=base, adapters=adapters, num_pages=64).generate([[1, 7, 8]], params, lora_names=["x"])
        assert [t for o in finals["x"] for t in o.token_ids] == expected[0].token_ids
        assert [o.finished for o in finals["y"]].count(True) == 1
        assert finals["y"][-1].finish_reason in ("abort", "length")  # the abort may land after the load
        with pytest.raises(AdapterNotFoundError):
            engine.add_request("rz", None, [1, 7], params, "z", collector("x"))
        for _ in range(100):
            stats = engine.stats()
            if stats.num_kv_blocks_used == 0 and stats.num_running == 0:
                break
            threading.Event().wait(0.05)
        assert stats.num_kv_blocks_used == 0
        assert not engine.engine.lora._refs, "adapter references left behind"
    finally:
        engine.shutdown()


def test_a_huge_prompt_is_refused_by_its_size_before_it_is_tokenized(llm, monkeypatch):
    """A 1 MiB text_input would take about a second of CPU to tokenize: it is refused on its byte
    length (max_model_len * 32) first. The demo's byte tokenizer is 1 byte a token."""
    import time

    import engine.request_checks as checks
    engine = llm.engine
    tokenized = []
    monkeypatch.setattr(engine, "tokenizer", lambda text: tokenized.append(text) or {"input_ids": [1]})
    prompt = "a" * (1 << 20)
    start = time.perf_counter()
    with pytest.raises(InvalidRequestError, match=r"^text_input: the prompt is more than \d+ bytes") as caught:
        engine.make_sequence("x", prompt, None, SamplingParams(max_tokens=1), None)
    assert time.perf_counter() - start < 0.05  # about 0.1 ms; a generous margin for CI
    assert not tokenized and f"max_model_len={engine.max_model_len}" in str(caught.value)
    limit = engine.max_model_len * checks.MAX_PROMPT_BYTES_PER_TOKEN
    with pytest.raises(InvalidRequestError, match="text_input"):  # 4-byte characters: counted in bytes
        engine.make_sequence("x", "\U0001F600" * (limit // 4 + 1), None, SamplingParams(max_tokens=1), None)
    engine.make_sequence("x", "\U0001F600" * (limit // 4), None, SamplingParams(max_tokens=1), None)
    assert len(tokenized) == 1  # within the bound, tokenized (and then judged by its tokens)


def test_too_many_input_ids_are_refused_before_they_are_read(llm):
    engine = llm.engine
    with pytest.raises(InvalidRequestError, match="^input_ids: the prompt has"):
        engine.make_sequence("x", None, ["not read"] * engine.max_model_len, SamplingParams(max_tokens=1), None)
    with pytest.raises(InvalidRequestError, match="^text_input: the prompt has"):
        engine.make_sequence("x", "a" * engine.max_model_len, None, SamplingParams(max_tokens=1), None)


def test_stop_token_ids_outside_the_vocabulary_are_refused(llm):
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError, match=r"^sampling_parameters: stop_token_ids \[%d\]" % vocab):
        llm.engine.make_sequence("x", None, [1, 2], SamplingParams(max_tokens=1, stop_token_ids=[2, vocab]), None)


def test_a_refused_request_holds_no_adapter_reference(base, tmp_path, monkeypatch):
    """Whatever fails after make_sequence takes the adapter reference gives it back: a seed that
    only torch refuses (as 2^64 did, past a caller that skipped SamplingParams' checks), a request
    larger than the pool, any other error."""
    import engine.llm_engine as llm_engine
    adapter = write_adapter(str(tmp_path / "a"), base, 4, ["q_proj"], seed=3)
    engine = LLM(model=base, num_pages=64, adapters={"a": adapter}).engine
    params = SamplingParams(max_tokens=4, seed=1)
    params.seed = 2 ** 64  # as if never checked
    with pytest.raises(ValueError, match="Overflow when unpacking long long"):
        engine.make_sequence("x", None, [1, 2], params, "a")
    assert not engine.lora._refs
    monkeypatch.setattr(engine.pages, "num_pages", 2)
    with pytest.raises(InvalidRequestError, match="pages of KV cache"):
        engine.make_sequence("x", None, [1, 2], SamplingParams(max_tokens=100), "a")
    assert not engine.lora._refs
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise OSError("any failure")

    monkeypatch.setattr(llm_engine, "IncrementalDetokenizer", broken)
    with pytest.raises(OSError):
        engine.make_sequence("x", None, [1, 2], SamplingParams(max_tokens=4), "a")
    assert not engine.lora._refs
    monkeypatch.undo()
    seq = engine.make_sequence("x", None, [1, 2], SamplingParams(max_tokens=4), "a")
    assert engine.lora._refs == {seq.lora.digest: 1}  # per version: the digest the request was admitted with
    engine.release(seq)
    assert not engine.lora._refs
