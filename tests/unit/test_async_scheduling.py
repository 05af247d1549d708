"""Async scheduling: step N+1 is launched before step N's tokens reach the host. Its outputs must
be exactly those of the synchronous engine, whatever ends a request (max_tokens, EOS, stop
strings, stop tokens, aborts, preemption), and it must leave no page behind."""
import pytest

from engine.config import EngineConfig, ModelConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from helpers import write_checkpoint, write_raw_adapter

PROMPTS = [[1] + [40 + i] * (3 + 5 * i) for i in range(6)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    base = write_checkpoint(str(root / "base"), "llama_gqa", num_hidden_layers=2)
    shapes = ModelConfig.from_dir(base).projection_shapes()
    adapters = {f"a{i}": write_raw_adapter(str(root / f"a{i}"), 2, shapes, rank, modules, seed=i)
                for i, (rank, modules) in enumerate([(4, ["q_proj", "v_proj"]), (8, ["o_proj", "down_proj"])])}
    return base, adapters


def make_engine(model, async_scheduling, decode_graphs, num_pages=64):
    base, adapters = model
    return LLMEngine(EngineConfig(model=base, num_pages=num_pages, block_size=4, max_num_seqs=6,
                                  max_num_batched_tokens=32, decode_graphs=decode_graphs,
                                  async_scheduling=async_scheduling), adapters)


def run(engine, requests, abort_at=None):
    """Drive the engine to the end; ``abort_at``: (step index, request id)."""
    for rid, prompt, params, lora in requests:
        engine.add(engine.make_sequence(rid, None, prompt, params, lora))
    results = {rid: ([], "", None) for rid, *_ in requests}
    steps = 0
    while engine.has_work():
        outputs = engine.step()
        steps += 1
        if abort_at is not None and steps == abort_at[0]:
            out = engine.abort(abort_at[1])
            outputs = outputs + ([out] if out is not None else [])
        for out in outputs:
            ids, text, reason = results[out.request_id]
            assert reason is None, f"{out.request_id} got a delta after its final one"
            results[out.request_id] = (ids + out.token_ids, text + out.text, out.finish_reason)
    assert all(reason is not None for _, _, reason in results.values())
    engine.pages.check_invariants()
    assert engine.pages.num_kv_pages == 0 and not engine.seqs
    return results


def requests_for(free_tokens):
    """Requests ending in every way: by length, by EOS-like stop tokens, by stop strings, seeded sampling."""
    reqs = [
        ("len", PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), None),
        ("len-a0", PROMPTS[1], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True), "a0"),
        ("stop-token", PROMPTS[2], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                  stop_token_ids=[free_tokens[3]]), "a1"),
        ("min-tokens", PROMPTS[2], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, min_tokens=6,
                                                  stop_token_ids=[free_tokens[3]]), "a1"),
        ("seeded", PROMPTS[3], SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=10,
                                              ignore_eos=True), "a0"),
        ("one", PROMPTS[4], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), None),
        ("long", PROMPTS[5], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), "a1"),
    ]
    return reqs


@pytest.fixture(scope="module")
def free_tokens(model):
    engine = make_engine(model, False, "off")
    out = run(engine, [("free", PROMPTS[2], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), "a1")])
    return out["free"][0]


@pytest.mark.parametrize("decode_graphs", ["off", "static", "auto"])  # auto: captured graphs on CUDA
def test_async_outputs_equal_sync_outputs(model, free_tokens, decode_graphs):
    sync = run(make_engine(model, False, decode_graphs), requests_for(free_tokens))
    engine = make_engine(model, True, decode_graphs)
    result = run(engine, requests_for(free_tokens))
    assert result == sync
    assert sync["stop-token"][2] == "stop" and len(sync["stop-token"][0]) == free_tokens.index(free_tokens[3]) + 1
    assert sync["min-tokens"][2] == "stop" and len(sync["min-tokens"][0]) > 6
    assert sync["len"][2] == "length" and len(sync["len"][0]) == 12
    assert sync["one"][0] and len(sync["one"][0]) == 1


def test_a_step_is_launched_ahead_and_ends_cleanly_with_stop_strings(model, free_tokens):
    engine = make_engine(model, True, "static")
    sync_engine = make_engine(model, False, "static")
    text = run(sync_engine, [("t", PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), None)])
    stop = text["t"][1][4:6]
    assert stop
    reqs = [("s", PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]), None),
            ("t", PROMPTS[1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), "a0")]
    engine.add(engine.make_sequence("x", None, PROMPTS[0], SamplingParams(temperature=0, max_tokens=5), None))
    first = engine.step()
    assert [o.request_id for o in first] == ["x"] and len(first[0].token_ids) == 1
    assert engine._in_flight is not None  # the next step is already queued
    while engine.has_work():
        engine.step()
    assert run(engine, reqs) == run(sync_engine, reqs)


def test_abort_while_a_step_is_in_flight(model, free_tokens):
    reqs = requests_for(free_tokens)
    sync = run(make_engine(model, False, "static"), reqs, abort_at=(3, "long"))
    result = run(make_engine(model, True, "static"), reqs, abort_at=(3, "long"))
    assert result["long"][2] == "abort"
    assert result == sync


def test_preemption_with_pending_tokens(model, free_tokens):
    """A pool too small for every request at once: sequences are preempted while their newest
    token is still on the device, and recomputed with it."""
    reqs = [(f"r{i}", PROMPTS[i % 6], SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
             [None, "a0", "a1"][i % 3]) for i in range(8)]
    sync_engine = make_engine(model, False, "static", num_pages=26)
    sync = run(sync_engine, reqs)
    engine = make_engine(model, True, "static", num_pages=26)
    result = run(engine, reqs)
    assert engine.scheduler.num_preemptions > 0
    assert result == sync
    reference = run(make_engine(model, False, "off", num_pages=200), reqs)
    assert result == reference
