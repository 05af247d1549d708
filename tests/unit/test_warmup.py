"""Warm start (engine/warmup.py) on the embedded demo model, forced on CPU.

- The engine after its warm-up is the engine without one: pages, the adapter host tier, the
  counters, and token-exact outputs (greedy, seeded and unseeded sampling, logprobs).
- Coverage: with the kernels' launchers choosing the H200's tiles (132 SMs) and every kernel
  launch recorded by its compile key instead of run, random traffic (adapters of any rank and
  modules, prompts of any length, mixed batches, every sampling option) launches no kernel with
  a key that the warm-up did not launch first, with and without decode graphs.
- The plan for a Llama-7B shape on the H200: one rank per tile class, both token classes, every
  (bucket, projection groups) graph.
"""
import dataclasses
import functools
import inspect
import os
import random

import pytest
import torch

from engine.adapters import LORA_MODULES, LoRAAdapter, pack_adapter
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora_batch import GROUPS
from engine.sampling_params import SamplingParams
from engine.warmup import engine_shape, warm_up
from engine.warmup_plan import EngineShape, group_sets, plan_warmup, rank_classes, token_classes
from kernels import tiles

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "demo")
BASE = os.path.join(DEMO, "base")
ADAPTERS = {name: os.path.join(DEMO, "adapters", name) for name in ("upper", "reverse", "rot13")}
H200_SMS = 132


def make_engine(warmup, **overrides) -> LLMEngine:
    args = dict(model=BASE, max_num_seqs=16, warmup=warmup, seed=5)
    args.update(overrides)
    return LLMEngine(EngineConfig(**args), ADAPTERS)


def workload(engine: LLMEngine) -> dict[str, tuple]:
    """Waves of demo requests (every adapter and the base, greedy, seeded, unseeded, logprobs, a
    stop string), a few steps apart; returns each request's tokens, text, finish and logprobs."""
    rng = random.Random(0)
    words = ["hello world", "abc", "the quick brown fox", "zz top", "x", "multi lora serving 42"]
    variants = [dict(temperature=0), dict(temperature=0.9), dict(temperature=0.8, top_k=4, seed=11),
                dict(temperature=1.0, top_p=0.7), dict(temperature=0, logprobs=3), dict(temperature=0, stop=["o"])]
    results: dict[str, list] = {}
    n = 0
    for wave in range(6):
        for _ in range(1 + wave % 4):
            rid = f"r{n}"
            params = SamplingParams(max_tokens=rng.randrange(2, 20), **variants[n % len(variants)])
            name = [None, "upper", "reverse", "rot13"][n % 4]
            engine.add(engine.make_sequence(rid, rng.choice(words), None, params, name))
            results[rid] = [[], "", None, []]
            n += 1
        for _ in range(rng.randrange(1, 5)):
            collect(engine.step(), results)
    while engine.has_work():
        collect(engine.step(), results)
    return {rid: (tuple(t), text, reason, tuple(map(str, lp))) for rid, (t, text, reason, lp) in results.items()}


def collect(outputs, results) -> None:
    for out in outputs:
        entry = results[out.request_id]
        entry[0] += out.token_ids
        entry[1] += out.text
        entry[2] = out.finish_reason
        entry[3] += out.logprobs or []


def state(engine: LLMEngine) -> tuple:
    """What two engines that served the same requests share: the page pool to its free list's
    order, the host tier, the counters (load times aside) and the generator of unseeded sampling."""
    pages = engine.pages
    host = dataclasses.replace(engine.lora.snapshot(), load_seconds_total=0.0)
    stats = dataclasses.replace(engine.get_stats(), adapter_load_seconds_total=0.0)
    return (list(pages._free), pages.resident_adapters(), pages.num_adapter_evictions, host, stats,
            sorted(engine.lora.known), engine.lora.is_in_host("upper"), engine.runner.generator.get_state().tolist())


@pytest.fixture(scope="module")
def engines():
    return make_engine(True), make_engine(False)


def test_the_engine_after_its_warm_up_is_the_engine_without_one(engines):
    warmed, cold = engines
    report = warmed.warmup_report
    assert cold.warmup_report is None
    assert report.num_steps > 0 and report.num_requests > 0 and report.num_skipped == 0
    warmed.pages.check_invariants()
    assert state(warmed) == state(cold)
    assert warmed.pages.num_free == warmed.pages.num_pages and not warmed.pages.resident_adapters()
    assert warmed.lora.snapshot().num_host == 0 and not any(n.startswith("warmup") for n in warmed.lora.known)
    assert workload(warmed) == workload(cold)
    warmed.pages.check_invariants()
    assert state(warmed) == state(cold)


def test_warm_up_on_the_demo_is_small(engines):
    """The CPU run of the same code: a few dozen steps, about a second."""
    report = engines[0].warmup_report
    assert report.num_steps < 100 and report.num_requests < 100
    assert report.seconds < 30


def test_auto_warms_up_on_cuda_only():
    engine = make_engine("auto", max_num_seqs=4)
    assert (engine.warmup_report is not None) == (engine.runner.device.type == "cuda")


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_warmup_value_is_refused(value):
    with pytest.raises(ValueError, match="warmup"):
        EngineConfig(model=BASE, warmup=value)


def test_a_warm_up_needs_an_idle_engine():
    engine = make_engine(False, max_num_seqs=4)
    engine.add(engine.make_sequence("r0", "abc", None, SamplingParams(max_tokens=2), None))
    with pytest.raises(RuntimeError, match="first one"):
        warm_up(engine)


# --- coverage: compile keys of the warm-up against those of random traffic ------------------------
KERNELS = {"kernels.lora_shrink": ["_lora_shrink_kernel"], "kernels.lora_expand": ["_lora_expand_kernel"],
           "kernels.lora_fused": ["_lora_fused_kernel"],
           "kernels.paged_attention": ["_decode_attention_kernel", "_merge_splits_kernel"],
           "kernels.prefill_attention": ["_prefill_attention_kernel"],
           "kernels.elementwise": ["_add_rms_norm_kernel", "_rotary_kv_kernel", "_silu_and_mul_kernel"]}


def int_class(value: int, specialize: bool) -> tuple:
    """How Triton keys an integer argument: 1 is a constant, multiples of 16 are marked as such."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
        return tuple(native_specialize_impl(BaseBackend, value, False, specialize, True))
    except ImportError:
        if not specialize:
            return ("i32" if -2**31 <= value < 2**31 else "i64", None)
        return ("constexpr", 1) if value == 1 else ("i32", "D" if value % 16 == 0 else "")


class Recorder:
    """Stands in for a @triton.jit kernel: records the compile key of each launch, runs nothing."""

    def __init__(self, kernel, keys: set) -> None:
        self.fn = kernel.fn
        self.signature = inspect.signature(kernel.fn)
        options = getattr(kernel, "kwargs", None) or {}
        self.not_specialized = set(options.get("do_not_specialize") or getattr(kernel, "do_not_specialize", ()) or ())
        self.keys = keys

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, **kwargs) -> None:
        params = self.signature.parameters
        bound = self.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in params}).arguments
        key = [tuple(sorted((k, v) for k, v in kwargs.items() if k not in params))]  # num_warps, num_stages
        for name, param in params.items():
            value = bound[name]
            if "constexpr" in str(param.annotation):
                key.append((name, value))
            elif isinstance(value, torch.Tensor):
                key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
            elif isinstance(value, bool) or not isinstance(value, int):
                key.append((name, type(value).__name__))
            else:
                key.append((name,) + int_class(value, name not in self.not_specialized))
        self.keys.add((self.fn.__name__, tuple(key)))


def on_h200(fn):
    """A tiles function that chooses as on the H200, whatever device the tensors are on."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def chosen(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        bound.arguments["on_gpu"] = True
        if "num_sms" in bound.arguments:
            bound.arguments["num_sms"] = H200_SMS
        return fn(*bound.args, **bound.kwargs)
    return chosen


@pytest.fixture
def recorded(monkeypatch):
    import importlib

    keys: set = set()
    for module_name, names in KERNELS.items():
        module = importlib.import_module(module_name)
        for name in names:
            monkeypatch.setattr(module, name, Recorder(getattr(module, name), keys))
    for name in ("lora_block_m", "shrink_tiles", "expand_tiles", "fused_tiles", "decode_attention_tiles",
                 "prefill_attention_tiles"):
        monkeypatch.setattr(tiles, name, on_h200(getattr(tiles, name)))
    return keys


def random_adapter(engine: LLMEngine, name: str, rng: random.Random):
    rank = rng.choice([1, 2, 7, 8, 15, 16, 17, 24, 31, 32, 33, 40, 48, 63, 64])
    modules = [m for m in LORA_MODULES if rng.random() < 0.5] or [rng.choice(LORA_MODULES)]
    shapes = engine.model_config.projection_shapes()
    layer = {m: (torch.randn(rank, shapes[m][0]) * 0.01, torch.randn(shapes[m][1], rank) * 0.01, 2.0)
             for m in modules}
    adapter = LoRAAdapter(name, "<test>", rank, tuple(modules), [layer] * engine.model_config.num_layers)
    engine.lora.register(name, pack_adapter(adapter, engine.model_config, engine.runner.page_size,
                                            engine.runner.dtype))
    return name


def random_traffic(engine: LLMEngine, seed: int, num_waves: int = 30) -> None:
    """Under ``recorded`` the kernels do not run: logits are whatever their buffers held, and a
    request whose logits come out non-finite fails and quarantines its adapter. The quarantine is
    lifted after each step, so that every adapter keeps being asked for."""
    rng = random.Random(seed)
    names = [random_adapter(engine, f"t{i}", rng) for i in range(12)]
    room = engine.max_model_len
    variants = [dict(temperature=0), dict(temperature=0.9, seed=3), dict(temperature=0.8, top_k=5, top_p=0.8),
                dict(temperature=0, logprobs=2), dict(temperature=0.7, min_tokens=3, stop_token_ids=[5])]
    n = 0
    for _ in range(num_waves):
        for _ in range(rng.choice([1, 1, 2, 3, 5, 8, 13])):
            long = rng.random() < 0.15
            prompt_len = rng.randrange(200, room - 40) if long else rng.randrange(1, 60)
            params = SamplingParams(max_tokens=rng.randrange(3, 30), ignore_eos=True, **rng.choice(variants))
            adapter = rng.choice(names + [None] * 4)
            prompt = [rng.randrange(engine.model_config.vocab_size) for _ in range(prompt_len)]
            engine.add(engine.make_sequence(f"q{n}", None, prompt, params, adapter))
            n += 1
        for _ in range(rng.randrange(1, 8)):
            engine.step()
            for name in engine.quarantine.names():
                engine.quarantine.clear(name)
    while engine.has_work():
        engine.step()


def constexpr(key: tuple, name: str):
    return next(entry[1] for entry in key[1][1:] if entry[0] == name)


@pytest.mark.parametrize("decode_graphs", ["static", "off"])
def test_random_traffic_launches_no_kernel_the_warm_up_did_not(recorded, decode_graphs):
    engine = make_engine(True, kernels="triton", decode_graphs=decode_graphs, max_model_len=1024, max_num_seqs=32)
    warmed = set(recorded)
    assert {tiles.lora_block_m(n) for n in (2, 512)} == {16, 64}  # the H200's choices, as the launchers see them
    fused = {constexpr(k, "BLOCK_R") for k in warmed if k[0] == "_lora_fused_kernel"}
    assert fused == set()  # no step takes the fused kernel (tiles.lora_fused: the split pair measured faster)
    recorded.clear()
    random_traffic(engine, seed=1)
    assert recorded, "the traffic launched nothing"
    missing = sorted(recorded - warmed, key=repr)
    assert not missing, f"{len(missing)} compile keys only the traffic reached, e.g. {missing[:2]}"


def test_the_plan_for_a_7b_model_on_the_h200():
    h, inter = 4096, 11008
    groups = {"qkv": (h, 3, h), "o": (h, 1, h), "gate_up": (h, 2, inter), "down": (inter, 1, h)}
    buckets = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    # what DecodeGraphs.capture_all captures: no LoRA, and two group sets at every rank bound
    captured = frozenset([(b, frozenset(), 0) for b in buckets] +
                         [(b, g, bound) for b in buckets for g in (frozenset(("qkv", "o")), frozenset(GROUPS))
                          for bound in (16, 32, 64)])
    shape = EngineShape(on_gpu=True, num_sms=H200_SMS, page_size=2 * 16 * 32 * 128, block_size=16,
                        max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=2048, max_lora_rank=64,
                        num_kv_heads=32, head_dim=128, groups=groups, group_modules=dict(GROUPS),
                        graph_buckets=buckets, captured=captured)
    assert token_classes(shape) == [2, 512]
    assert rank_classes(shape) == [1, 17, 33]  # BLOCK_R 16, 32 and 64
    plan = plan_warmup(shape)
    assert plan.num_unreached == 0
    assert {frozenset(a.modules) for a in plan.adapters if a.rank == 1} == {
        frozenset(m for g in s for m in GROUPS[g]) for s in group_sets(GROUPS)}
    graph_jobs = [j for j in plan.jobs if j.label.startswith("decode graph")]
    assert len(graph_jobs) == len(buckets) * (16 - 3)
    assert len(plan.jobs) < 200


def test_engine_shape_of_the_demo_without_graphs():
    engine = make_engine(False, max_num_seqs=4)
    shape = engine_shape(engine)
    assert shape.graph_buckets == () and shape.eager_decode_sizes == (1, 2, 3, 4)
    assert shape.groups["down"] == (512, 1, 128) and shape.groups["qkv"] == (128, 3, 128)


def test_a_warm_up_adapter_that_overflows_still_serves_the_jobs_after_it(tmp_path):
    # with the kernels recorded (test_random_traffic_...) logits are whatever their buffers held, and
    # a warm-up adapter quarantined by one job used to be refused by every later job: the shapes only
    # those reached (e.g. prefill of rank 33 to 64) stayed uncompiled. Here the overflow is real.
    from engine.warmup import _run_job
    from engine.warmup_plan import Job, Request
    from helpers import write_overflowing_adapter

    path = str(tmp_path / "overflow")
    trigger = write_overflowing_adapter(path, BASE)
    engine = LLMEngine(EngineConfig(model=BASE, max_num_seqs=16, warmup=False), {"overflow": path})
    vocab, length = engine.model_config.vocab_size, engine.max_model_len - 2
    job = Job("prompts over the vocabulary", tuple(Request(length, 1, "overflow") for _ in range(4)))
    # the warm-up's prompt i is (3 + 7 i + 13 j) % vocab: one of these holds the trigger token
    assert any((3 + 7 * i + 13 * j) % vocab == trigger for i in range(4) for j in range(length))
    assert _run_job(engine, job, prefix="first") is not None
    failed = engine.stats.num_non_finite_requests_total
    assert failed >= 1  # the overflow happened, and failed its request
    assert engine.quarantine.names() == []
    assert _run_job(engine, job, prefix="second") is not None  # not refused: it ran, and overflowed again
    assert engine.stats.num_non_finite_requests_total == 2 * failed
