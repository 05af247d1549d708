"""Thousands of adapters through a pool that holds a few dozen: every output exact, residency counted."""
import random

import pytest

from engine.config import EngineConfig, ModelConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from helpers import write_checkpoint, write_raw_adapter

MODULE_SETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"],
               ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ["o_proj", "down_proj"]]
NUM_ADAPTERS = 2000
NUM_REQUESTS = 500
PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    base = write_checkpoint(str(root / "base"), "llama_gqa", num_hidden_layers=1)
    config = ModelConfig.from_dir(base)
    rng = random.Random(0)
    adapters = {}
    for i in range(NUM_ADAPTERS):
        rank = rng.choice([1, 2, 4, 8, 16, 32, 64])
        adapters[f"a{i}"] = write_raw_adapter(str(root / "adapters" / f"a{i}"), config.num_layers,
                                              config.projection_shapes(), rank, rng.choice(MODULE_SETS), seed=i)
    return base, adapters


def test_two_thousand_adapters_power_law(many):
    base, adapters = many
    rng = random.Random(1)
    names = list(adapters)
    weights = [1.0 / (i + 1) for i in range(len(names))]  # power law (alpha 1) popularity
    requests = [([1] + [rng.randrange(3, 259) for _ in range(rng.randrange(2, 12))], rng.choices(names, weights)[0])
                for _ in range(NUM_REQUESTS)]
    probe = LLMEngine(EngineConfig(model=base, num_pages=1), adapters)
    mean_pages = sum(probe.lora.acquire(n).num_pages for n in names[:200]) / 200
    num_pages = int(20 * mean_pages) + 64  # about 20 adapters next to the KV of the batch
    llm = LLM(model=base, adapters=adapters, num_pages=num_pages, max_num_seqs=32, max_host_adapter_bytes=1 << 20)
    outs = llm.generate([p for p, _ in requests], PARAMS, lora_names=[n for _, n in requests])

    # each adapter alone, all its requests together, in a pool with room for everything
    roomy = LLM(model=base, adapters=adapters, num_pages=4096)
    by_adapter: dict[str, list[int]] = {}
    for i, (_, name) in enumerate(requests):
        by_adapter.setdefault(name, []).append(i)
    for name, indices in by_adapter.items():
        alone = roomy.generate([requests[i][0] for i in indices], PARAMS, lora_names=name)
        for i, out in zip(indices, alone):
            assert outs[i].token_ids == out.token_ids, f"request {i} with adapter {name}"

    stats = llm.engine.get_stats()
    distinct = len(by_adapter)
    assert distinct > 100  # power law over 2000: many distinct adapters, a few very popular
    assert stats.adapter_misses_total + stats.adapter_prefetches_total >= distinct
    assert stats.adapter_evictions_total > 0
    assert stats.adapter_hits_total + stats.adapter_misses_total == NUM_REQUESTS
    assert stats.adapter_hits_total > NUM_REQUESTS // 4  # popular adapters stay resident
    assert stats.num_adapters_gpu <= 64 and stats.num_kv_blocks_used == 0
    llm.engine.pages.check_invariants()
