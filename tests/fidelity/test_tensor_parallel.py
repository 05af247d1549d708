"""Tensor parallelism on CPU (gloo): TP = 2 and 4, both LoRA modes, token for token against
TP = 1 and against HF Transformers + PEFT (float32), on a mixed batch of adapters of different
ranks and module sets plus base-model requests, joining at different steps."""
import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from helpers import write_adapter, write_checkpoint
from test_fidelity import NEW_TOKENS, Reference, random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
ADAPTERS = {  # name -> (rank, modules): ranks 1..16, different module sets
    "r1_qv": (1, ["q_proj", "v_proj"]),
    "r5_mixed": (5, ["k_proj", "o_proj", "up_proj"]),
    "r8_mlp": (8, ["gate_proj", "up_proj", "down_proj"]),
    "r16_all": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}
# (model, tensor_parallel_size, fully_sharded_loras): every model at TP 2 and 4, each mode at
# each size; llama has 4 KV heads (MHA), llama_gqa and qwen2 (q/k/v bias) have 2, so TP 4
# replicates their KV heads
CASES = [("llama", 2, False), ("llama", 4, True), ("llama_gqa", 2, True), ("llama_gqa", 4, False),
         ("qwen2", 2, False), ("qwen2", 4, True)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (base, adapters, HF + PEFT outputs, TP = 1 outputs) of the prompts below."""
    made = {}

    def get(kind):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"tp-{kind}")
            base = write_checkpoint(str(root / "base"), kind)
            adapters = {name: write_adapter(str(root / name), base, rank, modules, seed=i + 1,
                                            use_rslora=name == "r5_mixed")
                        for i, (name, (rank, modules)) in enumerate(ADAPTERS.items())}
            reference = Reference(base, adapters)
            expected = [reference.generate([p], [n])[0] for p, n in zip(PROMPTS, NAMES)]
            single = run_batch(LLMEngine(EngineConfig(model=base, num_pages=128, block_size=4), adapters))
            made[kind] = base, adapters, expected, single
        return made[kind]
    return get


PROMPTS = random_prompts(8, seed=3)
NAMES = [[None, *ADAPTERS][i % (len(ADAPTERS) + 1)] for i in range(len(PROMPTS))]


def run_batch(engine: LLMEngine) -> list[list[int]]:
    """Three requests join every other step, mid-decode of the others."""
    results: dict[str, list[int]] = {}
    pending = list(enumerate(zip(PROMPTS, NAMES)))
    step = 0
    while pending or engine.has_work():
        if pending and step % 2 == 0:
            for i, (prompt, name) in pending[:3]:
                engine.add(engine.make_sequence(str(i), None, prompt, GREEDY, name))
            pending = pending[3:]
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    return [results[str(i)] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("kind,size,fully_sharded", CASES, ids=[f"{k}-tp{n}-{'full' if f else 'default'}"
                                                               for k, n, f in CASES])
def test_tensor_parallel_matches_tp1_and_peft(models, kind, size, fully_sharded):
    base, adapters, expected, single = models(kind)
    assert single == expected  # TP = 1 is the engine as it was
    engine = LLMEngine(EngineConfig(model=base, num_pages=128, block_size=4, tensor_parallel_size=size,
                                    fully_sharded_loras=fully_sharded), adapters)
    try:
        got = run_batch(engine)
        for i, name in enumerate(NAMES):
            assert got[i] == expected[i], f"prompt {i} with adapter {name} at TP {size}"
        assert engine.pages.num_kv_pages == 0
        engine.pages.check_invariants()
        # the page manager of rank 0 decided for all ranks: each rank holds its own shard of every
        # resident adapter at the same page ids
        versions = {packed.key: (name, packed) for name, _, packed, _ in engine.lora.entries() if packed is not None}
        resident = engine.pages.resident_adapters()  # versions, by digest
        assert resident and {versions[key][0] for key in resident} <= set(ADAPTERS)  # (a small pool evicts some)
        for key in resident:
            name, packed = versions[key]
            per_rank = engine.runner.pool_pages(engine.pages.adapter_pages(key))
            assert len(per_rank) == size
            for rank, pages in enumerate(per_rank):
                stored = pages.transpose(0, 1).reshape(packed.data.shape[1], -1)  # [L, n * PAGE]
                assert torch.equal(stored, packed.data[rank]), f"rank {rank}'s pages of {name}"
    finally:
        engine.runner.close()
    assert all(w.returncode == 0 for w in engine.runner.workers)
