"""sampling_parameters logprobs=k: the log probability of each sampled token and of the k most likely
tokens at its position, from the raw logits (before temperature, top-k, top-p, min_tokens), checked
teacher-forced against Hugging Face Transformers + PEFT (float32, CPU) on the embedded demo model."""
import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampler import sample
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from engine.sequence import Sequence

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "demo")
BASE = os.path.join(DEMO, "base")
ADAPTERS = {name: os.path.join(DEMO, "adapters", name) for name in ("upper", "reverse")}
# absolute, on float32 logprobs; CUDA: the Triton kernels' float32 matmuls
TOL = {"cpu": 1e-4, "cuda": 1e-4}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.fixture(scope="module", params=DEVICES)
def llm(request):
    return LLM(model=BASE, adapters=ADAPTERS, dtype="float32", device=request.param, max_num_seqs=8, num_pages=256)


@pytest.fixture(scope="module")
def hf():
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, ADAPTERS["upper"], adapter_name="upper")
    model.load_adapter(ADAPTERS["reverse"], adapter_name="reverse")
    return model.eval()


def tol(llm) -> float:
    return TOL[llm.engine.runner.device.type]


def hf_logprobs(hf, prompt_ids: list[int], output_ids: list[int], lora_name: str | None) -> torch.Tensor:
    """Teacher-forced: [len(output_ids), V] log_softmax of HF's float32 logits at each generated position."""
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        if lora_name is None:
            with hf.disable_adapter():
                logits = hf(ids).logits
        else:
            hf.set_adapter(lora_name)
            logits = hf(ids).logits
    n = len(prompt_ids)
    return torch.log_softmax(logits[0, n - 1:n - 1 + len(output_ids)].float(), dim=-1)


def check_against(reference: torch.Tensor, out: RequestOutput, k: int, tol: float = TOL["cpu"]) -> None:
    assert len(out.logprobs) == len(out.logprob_ranks) == len(out.token_ids) > 0
    total = 0.0
    for pos, (token, entry, ranks) in enumerate(zip(out.token_ids, out.logprobs, out.logprob_ranks)):
        ref = reference[pos]
        assert list(entry)[0] == token  # the sampled token first
        assert entry[token] == pytest.approx(ref[token].item(), abs=tol)
        assert ranks[token] == int((ref >= ref[token]).sum())
        top = ref.topk(k)
        others = [t for t in entry if t != token]
        assert len(entry) == k + (token not in top.indices.tolist())
        assert set(entry) - {token} <= set(top.indices.tolist())
        for rank, (t, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
            assert entry[t] == pytest.approx(value, abs=tol)
            assert ranks[t] == rank
        assert others == [t for t in top.indices.tolist() if t != token]  # most likely first
        total += entry[token]
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-9)
    sampled = reference.gather(1, torch.tensor(out.token_ids)[:, None])
    assert out.cumulative_logprob == pytest.approx(sampled.sum().item(), abs=tol * len(out.token_ids))


@pytest.mark.parametrize("lora_name", [None, "upper", "reverse"])
def test_greedy_logprobs_match_hf_teacher_forced(llm, hf, lora_name):
    k = 5
    prompt = "hello world"
    out, = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, logprobs=k), lora_names=[lora_name])
    assert out.text == {None: "hello world", "upper": "HELLO WORLD", "reverse": "dlrow olleh"}[lora_name]
    check_against(hf_logprobs(hf, out.prompt_token_ids, out.token_ids, lora_name), out, k, tol(llm))
    for entry, ranks in zip(out.logprobs, out.logprob_ranks):
        assert ranks[next(iter(entry))] == 1  # greedy: the sampled token is the most likely
    # each token's text alone; the sampled ones spell the output (a byte-level vocabulary)
    tokenizer = llm.tokenizer
    assert all(text == tokenizer.decode([t]) for t, text in out.token_texts.items())
    assert "".join(out.token_texts[t] for t in out.token_ids[:-1]) == out.text  # the last one is EOS


def test_sampled_logprobs_are_raw_whatever_temperature_top_k_top_p_min_tokens(llm, hf):
    """vLLM's raw_logprobs: the model's distribution, not the one sampled from."""
    k = 3
    params = SamplingParams(temperature=1.7, top_k=4, top_p=0.8, seed=11, max_tokens=12, min_tokens=12,
                            logprobs=k)
    out, = llm.generate(["abc"], params, lora_names=["reverse"])
    reference = hf_logprobs(hf, out.prompt_token_ids, out.token_ids, "reverse")
    check_against(reference, out, k, tol(llm))
    # min_tokens kept EOS from being sampled, yet its raw logprob is reported where it is likely
    eos = llm.engine.eos_token_ids[0]
    assert eos not in out.token_ids
    assert any(eos in entry and entry[eos] == pytest.approx(reference[pos, eos].item(), abs=tol(llm))
               for pos, entry in enumerate(out.logprobs))


def test_k_zero_and_max(llm, hf):
    zero, top = llm.generate(["xyz", "xyz"], [SamplingParams(temperature=0, max_tokens=6, logprobs=0),
                                            SamplingParams(temperature=0, max_tokens=6, logprobs=MAX_LOGPROBS)],
                             lora_names=["upper", "upper"])
    assert all(list(entry) == [t] for entry, t in zip(zero.logprobs, zero.token_ids))
    reference = hf_logprobs(hf, zero.prompt_token_ids, zero.token_ids, "upper")
    check_against(reference, zero, 0, tol(llm))
    check_against(reference, top, MAX_LOGPROBS, tol(llm))
    assert zero.cumulative_logprob == pytest.approx(top.cumulative_logprob, abs=1e-6)


def test_mixed_batch_only_askers_get_logprobs_each_their_own_k(llm, hf):
    prompts = ["one", "two", "three", "four"]
    params = [SamplingParams(temperature=0, max_tokens=10, logprobs=k) for k in (None, 1, None, 7)]
    names = [None, "upper", "reverse", "reverse"]
    outs = llm.generate(prompts, params, lora_names=names)
    for out, p, name in zip(outs, params, names):
        if p.logprobs is None:
            assert out.logprobs is out.logprob_ranks is out.token_texts is out.cumulative_logprob is None
        else:
            check_against(hf_logprobs(hf, out.prompt_token_ids, out.token_ids, name), out, p.logprobs, tol(llm))
    # asking changes no token
    alone = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10), lora_names=names)
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]


def test_a_step_where_nobody_asks_computes_nothing():
    logits = torch.randn(3, 11)
    seqs = [Sequence(str(i), [1], SamplingParams(temperature=0)) for i in range(3)]
    tokens, logprobs = sample(logits, seqs, (2,), torch.Generator())
    assert logprobs is None and tokens.tolist() == logits.argmax(-1).tolist()
    seqs[1].params = SamplingParams(temperature=0, logprobs=2)
    tokens, logprobs = sample(logits, seqs, (2,), torch.Generator())
    assert logprobs.rows == [1] and logprobs.values.shape == logprobs.ids.shape == (1, 3)
    expected = torch.log_softmax(logits[1], -1)
    assert logprobs.values[0].tolist() == pytest.approx([expected.max().item()] + expected.topk(2).values.tolist())
    assert logprobs.ids[0].tolist() == [1] + expected.topk(2).indices.tolist()


def run_engine(async_scheduling: bool, decode_graphs: str, requests, device: str = "cpu") -> dict[str, RequestOutput]:
    """Streams every request through LLMEngine.step, joining the deltas."""
    config = EngineConfig(model=BASE, dtype="float32", device=device, num_pages=256, max_num_seqs=4, block_size=4,
                          max_num_batched_tokens=16, async_scheduling=async_scheduling, decode_graphs=decode_graphs)
    engine = LLMEngine(config, ADAPTERS)
    results = {}
    for rid, prompt, params, name in requests:
        engine.add(engine.make_sequence(rid, prompt, None, params, name))
        results[rid] = RequestOutput(request_id=rid)
    num_deltas = 0
    while engine.has_work():
        for delta in engine.step():
            if delta.logprobs is not None:
                assert len(delta.logprobs) == len(delta.token_ids)
                assert set(delta.token_texts) == {t for entry in delta.logprobs for t in entry}
            results[delta.request_id] = results[delta.request_id].merge(delta)
            num_deltas += 1
    assert num_deltas > len(requests)  # streamed, not one delta each
    return results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decode_graphs", ["off", "static", "auto"])  # auto: captured graphs on CUDA
def test_async_scheduling_gives_the_same_logprobs_as_sync(hf, decode_graphs, device):
    requests = [
        ("greedy", "hello", SamplingParams(temperature=0, max_tokens=20, logprobs=4), "upper"),
        ("plain", "hello", SamplingParams(temperature=0, max_tokens=20), "reverse"),
        ("seeded", "abc def", SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=14, ignore_eos=True,
                                             logprobs=2), None),
        ("stop", "stop here", SamplingParams(temperature=0, max_tokens=20, stop=["ere"], logprobs=1), None),
        ("later", "queued prompt", SamplingParams(temperature=0, max_tokens=9, logprobs=0), "reverse"),
        ("wide", "mixed", SamplingParams(temperature=0, max_tokens=9, logprobs=MAX_LOGPROBS), "upper"),
    ]
    sync = run_engine(False, decode_graphs, requests, device)
    overlapped = run_engine(True, decode_graphs, requests, device)
    for rid, *_ in requests:
        a, b = sync[rid], overlapped[rid]
        assert (a.token_ids, a.text, a.logprob_ranks, a.token_texts) == (b.token_ids, b.text, b.logprob_ranks,
                                                                         b.token_texts), rid
        if a.logprobs is None:
            assert b.logprobs is None and b.cumulative_logprob is None
            continue
        # A request that ends leaves its dropped token's row in the next step under async scheduling,
        # and a CPU matmul of another row count rounds differently (float32 ulps); the requests of
        # test_async_scheduling_is_exact share identical steps in both modes and agree exactly.
        assert [list(e) for e in a.logprobs] == [list(e) for e in b.logprobs], rid
        for ea, eb in zip(a.logprobs, b.logprobs):
            assert ea == pytest.approx(eb, abs=1e-5), rid
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4), rid
    assert sync["plain"].logprobs is None and overlapped["plain"].logprobs is None
    # the stop string cut the text, not the tokens: one entry per token still
    assert sync["stop"].text == "stop h" and len(sync["stop"].logprobs) == len(sync["stop"].token_ids)
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    for rid, prompt, params, name in requests:
        if params.logprobs is not None:
            reference = hf_logprobs(hf, tokenizer(prompt)["input_ids"], sync[rid].token_ids, name)
            check_against(reference, sync[rid], params.logprobs, TOL[device])


@pytest.mark.parametrize("device", DEVICES)
def test_async_scheduling_is_exact(device):
    """Requests that all run to the same length: the steps hold the same rows in both modes."""
    requests = [(f"r{i}", prompt, SamplingParams(temperature=t, seed=i, max_tokens=12, ignore_eos=True, logprobs=k),
                 name)
                for i, (prompt, t, k, name) in enumerate([("hello", 0, 3, "upper"), ("abc def", 0.9, 2, None),
                                                          ("zz", 0, None, "reverse"), ("queued", 1.3, 20, "upper")])]
    graphs = "auto" if device == "cuda" else "off"
    sync = run_engine(False, graphs, requests, device)
    overlapped = run_engine(True, graphs, requests, device)
    assert sync == overlapped
    assert sync["r2"].logprobs is None and sync["r3"].logprobs is not None


def test_outputs_cross_msgpack_and_merge():
    msgspec = pytest.importorskip("msgspec")  # the engine process's wire format
    a = RequestOutput("r", token_ids=[5], logprobs=[{5: -0.5, 7: -1.0}], logprob_ranks=[{5: 1, 7: 2}],
                      token_texts={5: "a", 7: "b"}, cumulative_logprob=-0.5)
    b = RequestOutput("r", token_ids=[9], logprobs=[{9: -2.0, 5: -0.25}], logprob_ranks=[{9: 3, 5: 1}],
                      token_texts={9: "c", 5: "a"}, cumulative_logprob=-2.5, finished=True)
    joined = a.merge(b)
    assert joined.logprobs == [{5: -0.5, 7: -1.0}, {9: -2.0, 5: -0.25}]
    assert joined.logprob_ranks == [{5: 1, 7: 2}, {9: 3, 5: 1}]
    assert joined.token_texts == {5: "a", 7: "b", 9: "c"} and joined.cumulative_logprob == -2.5
    assert RequestOutput("r").merge(a).logprobs == a.logprobs  # the offline API starts from an empty output
    assert a.merge(RequestOutput("r", finished=True)).cumulative_logprob == -0.5
    assert RequestOutput("r").merge(RequestOutput("r")).logprobs is None
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(joined), type=RequestOutput)
    assert back == joined and list(back.logprobs[1]) == [9, 5]  # int keys and their order survive


@pytest.mark.parametrize("value, message", [
    (21, "logprobs must be an integer in [0, 20]"),
    (-1, "logprobs must be an integer in [0, 20]"),
    ("21", "logprobs must be an integer in [0, 20]"),
    ("three", "logprobs='three' has the wrong type"),
    (True, "logprobs=True has the wrong type"),
    (2.5, "logprobs=2.5 has the wrong type"),
    ([3], "logprobs=[3] has the wrong type"),
])
def test_invalid_logprobs_name_the_field(value, message):
    with pytest.raises(InvalidRequestError, match="sampling_parameters: ") as caught:
        SamplingParams.from_dict({"logprobs": value})
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_logprobs_parsed_as_genai_perf_sends_them():
    assert SamplingParams.from_dict({"logprobs": "3"}).logprobs == 3
    assert SamplingParams.from_dict({"logprobs": 0}).logprobs == 0
    assert SamplingParams.from_dict({"logprobs": None}).logprobs is None
    assert SamplingParams.from_dict({"logprobs": 20.0}).logprobs == 20
    assert SamplingParams().logprobs is None
    with pytest.raises(InvalidRequestError, match="logprobs"):
        SamplingParams(logprobs=True)
