"""Greedy outputs of the engine, token for token, against Hugging Face Transformers + PEFT (float32, CPU)."""
import functools
import random

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from engine import decode_graphs
from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

NEW_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


class Reference:
    """HF + PEFT with every adapter loaded, generating greedily."""

    def __init__(self, base: str, adapters: dict[str, str]):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        names = list(adapters)
        self.model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self.model.eval()

    def generate(self, prompts: list[list[int]], names: list[str | None]) -> list[list[int]]:
        """One HF batch; prompts must have equal lengths (no padding)."""
        assert len({len(p) for p in prompts}) == 1
        ids = torch.tensor(prompts)
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                      min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                      pad_token_id=0, adapter_names=[n or "__base__" for n in names])
        return out[:, ids.shape[1]:].tolist()


def random_prompts(n: int, seed: int, min_len: int = 3, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 259) for _ in range(rng.randrange(min_len, max_len))] for _ in range(n)]


@pytest.fixture(scope="module")
def reference(model_set):
    return Reference(*model_set)


def test_mixed_batch_matches_peft_alone(model_set, reference):
    """Base-model and five adapters (ranks 1-16, different modules) in one continuous batch,
    arriving at different steps, each equal to HF + PEFT run on that prompt alone."""
    base, adapters = model_set
    engine = LLMEngine(EngineConfig(model=base, num_pages=128, block_size=4), adapters)
    names = [None] + list(adapters)
    prompts = random_prompts(12, seed=1)
    lora_names = [names[i % len(names)] for i in range(len(prompts))]
    results: dict[str, list[int]] = {}
    pending = list(enumerate(zip(prompts, lora_names)))
    step = 0
    while pending or engine.has_work():
        # three new requests every other step: joins happen mid-decode of the others
        if pending and step % 2 == 0:
            for i, (prompt, name) in pending[:3]:
                engine.add(engine.make_sequence(str(i), None, prompt, GREEDY, name))
            pending = pending[3:]
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    for i, (prompt, name) in enumerate(zip(prompts, lora_names)):
        expected = reference.generate([prompt], [name])[0]
        assert results[str(i)] == expected, f"prompt {i} with adapter {name}"
    assert engine.pages.num_kv_pages == 0


def test_mixed_adapter_names_batch(model_set, reference):
    """HF's own mixed-adapter batch (adapter_names=[...]) agrees with the engine's batch."""
    base, adapters = model_set
    llm = LLM(model=base, adapters=adapters, num_pages=128)
    prompts = random_prompts(6, seed=2, min_len=17, max_len=18)
    names = [None] + list(adapters)
    expected = reference.generate(prompts, names)
    outs = llm.generate(prompts, GREEDY, lora_names=names)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)


def test_no_adapter_leaks_between_requests(model_set):
    """The same prompt for every adapter in one batch equals each adapter run alone, and the
    adapters really differ from each other."""
    base, adapters = model_set
    llm = LLM(model=base, adapters=adapters, num_pages=128)
    prompt = random_prompts(1, seed=3)[0]
    names = [None] + list(adapters)
    together = [o.token_ids for o in llm.generate([prompt] * len(names), GREEDY, lora_names=names)]
    alone = [llm.generate([prompt], GREEDY, lora_names=[n])[0].token_ids for n in names]
    assert together == alone
    assert len({tuple(t) for t in together}) == len(names)


def run_all(base, adapters, prompts, names, **engine_args):
    llm = LLM(model=base, adapters=adapters, **engine_args)
    return llm, [o.token_ids for o in llm.generate(prompts, GREEDY, lora_names=names)]


def test_preemption_and_chunked_prefill_keep_outputs(model_set):
    """A pool too small for all requests at once (preemption by recomputation) and a token budget
    smaller than the prompts (chunked prefill) change nothing in the outputs."""
    base, adapters = model_set
    prompts = random_prompts(8, seed=4, min_len=20, max_len=40)
    names = [[None, "r1_qv", "r4_attn"][i % 3] for i in range(len(prompts))]
    _, expected = run_all(base, adapters, prompts, names, num_pages=256)
    tight, got = run_all(base, adapters, prompts, names, num_pages=16, block_size=8, max_num_batched_tokens=24)
    assert got == expected
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.pages.num_kv_pages == 0
    tight.engine.pages.check_invariants()


def test_adapter_eviction_keeps_outputs(model_set):
    """More adapters than the pool holds next to the KV: idle adapters are evicted and copied in
    again when needed, and every output stays the same."""
    base, adapters = model_set
    prompts = random_prompts(12, seed=7, min_len=5, max_len=30)
    names = [list(adapters)[i % len(adapters)] for i in range(len(prompts))]
    _, expected = run_all(base, adapters, prompts, names, num_pages=512)
    # room for the largest adapter and two requests' KV, not for all adapters at once
    largest = max(p.num_pages for p in (LLMEngine(EngineConfig(model=base, block_size=8, num_pages=1), adapters)
                                        .lora.acquire(n) for n in adapters))
    tight, got = run_all(base, adapters, prompts, names, num_pages=largest + 10, block_size=8, max_num_seqs=2)
    assert got == expected
    assert tight.engine.pages.num_adapter_evictions > 0
    assert tight.engine.scheduler.adapter_pool_misses > len(adapters)
    assert tight.engine.pages.num_kv_pages == 0
    tight.engine.pages.check_invariants()


def test_seeded_sampling_is_independent_of_the_batch(model_set):
    base, adapters = model_set
    llm = LLM(model=base, adapters=adapters, num_pages=128)
    prompt = random_prompts(1, seed=5)[0]
    name = list(adapters)[2]
    seeded = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([prompt], seeded, lora_names=[name])[0].token_ids
    others = random_prompts(5, seed=6)
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    crowd = llm.generate(others[:2] + [prompt] + others[2:], [unseeded] * 2 + [seeded] + [unseeded] * 3,
                         lora_names=[None, name, name, "r1_qv", None, "r16_all"])
    assert crowd[2].token_ids == alone
    other_seed = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=99, max_tokens=12, ignore_eos=True)
    assert llm.generate([prompt], other_seed, lora_names=[name])[0].token_ids != alone


def test_static_decode_buffers_keep_outputs(model_set):
    """Decode steps through the static, padded buffers of the CUDA-graph path (run eagerly here)
    give the tokens of the ordinary path: padding rows, the scratch page and padded LoRA tables
    touch nothing real."""
    base, adapters = model_set
    prompts = random_prompts(7, seed=8)
    names = [None] + list(adapters) + [None]
    _, expected = run_all(base, adapters, prompts, names, num_pages=256)
    static, got = run_all(base, adapters, prompts, names, num_pages=256, decode_graphs="static", max_num_seqs=16)
    assert static.engine.runner.graphs is not None and not static.engine.runner.graphs.capture
    assert got == expected


def test_staged_decode_inputs_keep_outputs(model_set, monkeypatch):
    """The GPU path's staging of the decode inputs (a separate host buffer, one prefix copy a step:
    the block tables last, only the step's rows) run on CPU: a missed input would change tokens."""
    monkeypatch.setattr(decode_graphs, "InputArena", functools.partial(decode_graphs.InputArena, staged=True))
    base, adapters = model_set
    prompts = random_prompts(7, seed=9)
    names = [None] + list(adapters) + [None]
    _, expected = run_all(base, adapters, prompts, names, num_pages=256)
    staged, got = run_all(base, adapters, prompts, names, num_pages=256, decode_graphs="static", max_num_seqs=16)
    arena = staged.engine.runner.graphs.arena
    assert arena.staged and arena.host_bytes.data_ptr() != arena.device_bytes.data_ptr()
    assert got == expected
