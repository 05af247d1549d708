"""A request whose logits are not finite fails alone: one final error for it, the rest of its
batch token-identical to a run without it, pages and adapter references back to where they
were; its adapter is quarantined (later requests on it refused, saying which and why), a
base-model request just fails.

The non-finite logits are real: an adapter that passes every load check and overflows float32
on one token of the demo's vocabulary (tests/helpers.py write_overflowing_adapter), and for the
base model the same update folded into its layer-0 weights.
"""
import os

import pytest
import torch

from engine import core_wire
from engine.errors import AdapterLoadError, AdapterQuarantinedError, NonFiniteLogitsError
from engine.llm import LLM
from engine.outputs import RequestOutput
from engine.sampler import NON_FINITE, mark_non_finite
from engine.sampling_params import SamplingParams
from helpers import write_overflowing_adapter

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "demo")
DEMO = os.path.join(ROOT, "base")
ADAPTERS = {name: os.path.join(ROOT, "adapters", name) for name in ("upper", "reverse", "rot13")}
GREEDY = SamplingParams(temperature=0, max_tokens=12)
ONE = SamplingParams(temperature=0, max_tokens=1)  # on the overflowing adapter: its outputs are not echoes
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12)


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory) -> tuple[str, str]:
    """(adapter path, its trigger character)."""
    path = str(tmp_path_factory.mktemp("overflow") / "overflow")
    token = write_overflowing_adapter(path, DEMO)
    return path, chr(token - 5 + 32)  # demo ids: printable ASCII chr(32..126) = 5..99


def jobs(trigger: str | None) -> list[tuple[str, str | None, SamplingParams]]:
    """Requests on every demo adapter, the base model and the overflowing adapter (a prompt
    without the trigger), seeded and greedy; with ``trigger``, one more on the overflowing
    adapter whose prompt holds it, in the middle of the batch."""
    batch = [("hello world", None, GREEDY), ("abc12", "upper", GREEDY), ("xyz q", "reverse", SEEDED),
             ("abc", "overflow", ONE), ("pqrs", "rot13", GREEDY), ("k9", "upper", SEEDED), ("mn", None, SEEDED)]
    if trigger is not None:
        batch.insert(3, (f"a{trigger}c", "overflow", GREEDY))
    return batch


def run(llm: LLM, batch) -> list[RequestOutput]:
    prompts, names, params = zip(*((p, n, s) for p, n, s in batch))
    return llm.generate(list(prompts), list(params), lora_names=list(names))


def assert_idle(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.seqs and not engine.has_work()
    assert engine.pages.num_kv_pages == 0
    assert engine.pages.num_free + engine.pages.num_adapter_pages == engine.pages.num_pages
    assert engine.lora._refs == {}  # every adapter reference given back


def test_mark_non_finite_marks_rows_with_nan_or_infinities():
    logits = torch.randn(5, 7)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    logits[4, 6] = float("-inf")
    tokens = torch.arange(5)
    assert mark_non_finite(logits, tokens).tolist() == [0, NON_FINITE, NON_FINITE, 3, NON_FINITE]
    assert mark_non_finite(logits[:0], tokens[:0]).tolist() == []


def test_errors_cross_the_engine_process_wire_with_their_class():
    for error in (AdapterQuarantinedError("LoRA adapter 'a' is quarantined"), NonFiniteLogitsError("x")):
        frame = core_wire.Encoder().encode(core_wire.StepOutputs([RequestOutput("r", finished=True, error=error)]))
        (out,) = core_wire.client_decoder().decode(frame).outputs
        assert type(out.error) is type(error) and str(out.error) == str(error)
    assert issubclass(AdapterQuarantinedError, AdapterLoadError)  # the Triton model: INVALID_ARG


@pytest.mark.parametrize("decode_graphs, async_scheduling", [("off", False), ("static", True)])
def test_adapter_with_non_finite_logits_fails_alone_and_is_quarantined(overflowing, async_scheduling, decode_graphs):
    path, trigger = overflowing
    args = dict(dtype="float32", device="cpu", async_scheduling=async_scheduling, decode_graphs=decode_graphs,
                max_num_seqs=16)
    adapters = {**ADAPTERS, "overflow": path}
    clean = run(LLM(model=DEMO, adapters=adapters, **args), jobs(None))
    assert all(o.error is None and o.token_ids for o in clean)
    llm = LLM(model=DEMO, adapters=adapters, **args)
    faulty = run(llm, jobs(trigger))
    bad = faulty.pop(3)
    assert isinstance(bad.error, AdapterQuarantinedError), bad
    assert bad.finished and bad.finish_reason == "error" and bad.token_ids == []
    message = str(bad.error)
    for words in ("'overflow'", "non-finite logits", "output token 1", "quarantined", "reloaded"):
        assert words in message, (words, message)
    assert [(o.token_ids, o.text, o.finish_reason) for o in faulty] == \
        [(o.token_ids, o.text, o.finish_reason) for o in clean]
    assert_idle(llm)
    assert llm.engine.quarantine.names() == ["overflow"]
    stats = llm.engine.get_stats()
    assert stats.num_adapters_quarantined == 1 and stats.num_non_finite_requests_total == 1
    # later requests on it are refused before any work, whatever their prompt; others are served
    with pytest.raises(AdapterQuarantinedError) as refused:
        llm.engine.make_sequence("later", "abc", None, ONE, "overflow")
    for words in ("LoRA adapter 'overflow' is quarantined", "non-finite logits", "model is reloaded",
                  "server restarted"):
        assert words in str(refused.value), (words, str(refused.value))
    assert_idle(llm)
    again = run(llm, [j for j in jobs(None) if j[1] != "overflow"])
    assert [o.token_ids for o in again] == [o.token_ids for o in clean if o is not clean[3]]
    assert llm.engine.quarantine.clear("overflow") and llm.engine.quarantine.names() == []
    (served,) = run(llm, [("abc", "overflow", ONE)])
    assert served.error is None and served.token_ids == clean[3].token_ids


def fold_into_base(llm: LLM, adapter_path: str) -> None:
    """Add the overflowing adapter's layer-0 q/k update to the base weights themselves."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(adapter_path, "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn"
    delta = {m: tensors[f"{prefix}.{m}.lora_B.weight"] @ tensors[f"{prefix}.{m}.lora_A.weight"]
             for m in ("q_proj", "k_proj")}
    qkv = llm.engine.runner.model.w["0.qkv"]  # [q + 2 kv, H]
    q_size = delta["q_proj"].shape[0]
    qkv[:q_size] += delta["q_proj"]
    qkv[q_size:q_size + delta["k_proj"].shape[0]] += delta["k_proj"]


def test_base_model_request_with_non_finite_logits_fails_alone(overflowing):
    path, trigger = overflowing
    batch = [("hello", None, GREEDY), (f"x{trigger}", None, GREEDY), ("ab", "upper", GREEDY), ("q", None, SEEDED)]
    outputs = []
    for with_trigger in (False, True):
        llm = LLM(model=DEMO, adapters=ADAPTERS, dtype="float32", device="cpu", async_scheduling=True)
        fold_into_base(llm, path)
        outputs.append(run(llm, batch if with_trigger else batch[:1] + batch[2:]))
    clean, faulty = outputs
    bad = faulty.pop(1)
    assert isinstance(bad.error, NonFiniteLogitsError), bad
    assert "base model" in str(bad.error) and "non-finite logits" in str(bad.error)
    assert [o.token_ids for o in faulty] == [o.token_ids for o in clean]
    assert all(o.error is None for o in faulty)
    assert llm.engine.quarantine.names() == []  # nothing to quarantine: the base serves everyone
    assert_idle(llm)
