"""Random interleavings of add / step / abort on a small pool: pages are conserved, nothing is
freed twice, a pinned adapter is never evicted, every request ends exactly once, and the pool
holds no KV when all requests are done."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import EngineConfig, ModelConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from helpers import write_checkpoint, write_raw_adapter


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("random")
    base = write_checkpoint(str(root / "base"), "llama_gqa", num_hidden_layers=1)
    config = ModelConfig.from_dir(base)
    adapters = {f"a{i}": write_raw_adapter(str(root / f"a{i}"), 1, config.projection_shapes(), rank,
                                           ["q_proj", "down_proj"] if i % 2 else ["v_proj"], seed=i)
                for i, rank in enumerate([1, 4, 16, 32])}
    return LLMEngine(EngineConfig(model=base, num_pages=56, block_size=4, max_num_seqs=4,
                                  max_num_batched_tokens=12), adapters)


op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 16), st.sampled_from([None, "a0", "a1", "a2", "a3"])),
    st.tuples(st.just("step"), st.integers(1, 3)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(op, max_size=40))
def test_random_interleavings_keep_the_pool_consistent(engine, operations):
    finals: dict[str, int] = {}
    added: list[str] = []

    def collect(outputs):
        for out in outputs:
            if out.finished:
                finals[out.request_id] = finals.get(out.request_id, 0) + 1

    for operation in operations:
        if operation[0] == "add":
            _, prompt_len, max_tokens, lora = operation
            rid = f"r{len(added)}-{id(operations)}"
            engine.add(engine.make_sequence(rid, None, [1] + [5] * prompt_len,
                                            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), lora))
            added.append(rid)
        elif operation[0] == "step":
            for _ in range(operation[1]):
                collect(engine.step())
        elif added:
            out = engine.abort(added[operation[1] % len(added)])
            if out is not None:
                collect([out])
        engine.pages.check_invariants()
        running = {s.lora.key for s in engine.scheduler.running if s.lora is not None}
        assert all(engine.pages.is_resident(name) for name in running)
    while engine.has_work():
        collect(engine.step())
        engine.pages.check_invariants()
    assert sorted(finals) == sorted(added) and set(finals.values()) <= {1}
    assert engine.pages.num_kv_pages == 0
    assert not engine.pages._pins, "adapters left pinned with no request running"
    assert not engine.seqs


def test_the_random_runs_exercised_eviction_and_preemption(engine):
    """Runs after the property test on the same engine: the interleavings reached the hard paths."""
    assert engine.pages.num_adapter_evictions > 0
    assert engine.scheduler.num_preemptions > 0
