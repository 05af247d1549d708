"""Preemption, aborts and adapter eviction under TP = 2 (gloo, CPU): a pool too small for the
load makes rank 0's page manager evict idle adapters and preempt requests; every request still
gives TP = 1's tokens (aborted ones a prefix of them), the ledgers (pages, pins, adapter
references, the scheduler's queues) are back to baseline, and each rank's pool holds its own
shard of every resident adapter at the page ids rank 0 chose."""
import pytest
import torch

from engine.config import EngineConfig, ModelConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from helpers import write_checkpoint, write_raw_adapter

PROMPT_LENS = [9, 3, 14, 6, 11, 2, 8, 5, 12, 7]
ABORT_AT = {4: "2", 9: "7"}  # step -> request aborted then


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-scheduling")
    base = write_checkpoint(str(root / "base"), "llama_gqa", num_hidden_layers=1)
    shapes = ModelConfig.from_dir(base).projection_shapes()
    modules = [["q_proj", "down_proj"], ["v_proj", "o_proj"], ["gate_proj", "up_proj", "k_proj"]]
    adapters = {f"a{i}": write_raw_adapter(str(root / f"a{i}"), 1, shapes, rank, modules[i % 3], seed=i)
                for i, rank in enumerate([2, 4, 8, 16, 6])}
    return base, adapters


def run(base, adapters, size: int, aborts: dict[int, str]) -> tuple[LLMEngine, dict[str, list[int]]]:
    engine = LLMEngine(EngineConfig(model=base, num_pages=40, block_size=4, max_num_seqs=4,
                                    max_num_batched_tokens=12, tensor_parallel_size=size), adapters)
    names = [None, *adapters]
    for i, n in enumerate(PROMPT_LENS):
        params = SamplingParams(temperature=0, max_tokens=12 + i % 3, ignore_eos=True)
        engine.add(engine.make_sequence(str(i), None, [1] + [3 + (i * 7 + j) % 250 for j in range(n)], params,
                                        names[i % len(names)]))
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_work():
        outputs = engine.step()
        if step in aborts:
            out = engine.abort(aborts[step])
            outputs += [out] if out is not None else []
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        engine.pages.check_invariants()
        step += 1
    return engine, tokens


def test_preemption_aborts_and_eviction_under_tp2(model):
    base, adapters = model
    single, expected = run(base, adapters, 1, {})
    engine, got = run(base, adapters, 2, ABORT_AT)
    try:
        assert engine.scheduler.num_preemptions > 0 and engine.pages.num_adapter_evictions > 0
        for rid, want in expected.items():
            if rid in ABORT_AT.values():
                assert got[rid] == want[:len(got[rid])] and len(got[rid]) < len(want), rid
            else:
                assert got[rid] == want, f"request {rid}"
        # the ledgers, all on rank 0, back to baseline
        assert engine.pages.num_kv_pages == 0 and not engine.pages._pins
        assert engine.pages.num_free == engine.pages.num_pages - engine.pages.num_adapter_pages
        assert not engine.seqs and not engine.scheduler.has_work()
        assert not engine.lora._refs, "adapter references left with no request"
        # every rank's pool: its shard of each resident adapter, at the same page ids
        versions = {packed.key: packed for _, _, packed, _ in engine.lora.entries() if packed is not None}
        for key in engine.pages.resident_adapters():  # the pool knows versions by their digest
            packed = versions[key]
            for rank, pages in enumerate(engine.runner.pool_pages(engine.pages.adapter_pages(key))):
                assert torch.equal(pages.transpose(0, 1).reshape(packed.data.shape[1], -1), packed.data[rank])
    finally:
        engine.runner.close()
    assert [w.returncode for w in engine.runner.workers] == [0]
