"""Warm start: before the first request, run the engine through the synthetic steps of
engine/warmup_plan.py, so that Triton compiles every kernel binary and the decode graphs are
captured for every set of projection groups now rather than in the request path.

The warm-up runs on scratch bookkeeping (page manager, scheduler, adapter host tier, stats, the
generator of unseeded sampling) that it swaps in and out: afterwards the engine's own objects are
the ones it had, untouched, so no page is used, no warm-up adapter is known or held anywhere, and
no counter counts the warm-up. What stays is what the warm-up is for: compiled kernels, captured
graphs, and the device memory they hold.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.adapters import LORA_MODULES, LoRAAdapter, PackedAdapter, pack_adapter
from engine.engine_stats import EngineStats
from engine.errors import EngineError
from engine.lora_batch import GROUPS
from engine.lora_manager import LoRAManager
from engine.page_manager import PageManager
from engine.quarantine import AdapterQuarantine
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.warmup_plan import AdapterSpec, EngineShape, Job, plan_warmup

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

logger = logging.getLogger("multilora")

MAX_STEPS_PER_JOB = 1000  # a safety net: a job takes a few steps (a chunked prompt a few more)


@dataclass(frozen=True)
class WarmupReport:
    num_jobs: int
    num_skipped: int  # jobs the engine refused (pool or context too small for them)
    num_requests: int
    num_steps: int
    seconds: float


def is_enabled(engine: "LLMEngine") -> bool:
    """engine.json ``warmup``: auto (on CUDA), true or false."""
    if engine.config.warmup == "auto":
        return engine.runner.device.type == "cuda"
    return bool(engine.config.warmup)


def maybe_warm_up(engine: "LLMEngine") -> WarmupReport | None:
    """Warm the engine up if its ``warmup`` argument says so; None if not."""
    return warm_up(engine) if is_enabled(engine) else None


def warm_up(engine: "LLMEngine") -> WarmupReport:
    """Run the warm-up plan on scratch bookkeeping; the engine must be idle (just built)."""
    if engine.has_work() or engine.seqs:
        raise RuntimeError("warm_up: the engine has requests; warm it up before the first one")
    start = time.monotonic()
    plan = plan_warmup(engine_shape(engine))
    num_steps = num_requests = num_skipped = 0
    with _scratch_state(engine, plan.adapters):
        for job in plan.jobs:
            steps = _run_job(engine, job, prefix=f"warmup-{num_requests}")
            if steps is None:
                num_skipped += 1
                logger.debug("warm-up: skipped %s (the engine's limits refuse it)", job.label)
                continue
            num_steps += steps
            num_requests += len(job.requests) + len(job.joiners)
    report = WarmupReport(len(plan.jobs), num_skipped, num_requests, num_steps, time.monotonic() - start)
    logger.info("warm-up: %d steps (%d requests in %d jobs) in %.1f s", report.num_steps, report.num_requests,
                report.num_jobs, report.seconds)
    if num_skipped or plan.num_unreached:
        logger.info("warm-up: %d jobs refused by the engine's limits and %d step shapes out of the warm-up's reach: "
                    "what they compile is compiled on first use", num_skipped, plan.num_unreached)
    return report


def engine_shape(engine: "LLMEngine") -> EngineShape:
    """What the plan needs to know of the engine, as the kernels' launchers will see it."""
    runner, config, model = engine.runner, engine.config, engine.model_config
    on_gpu = runner.device.type == "cuda"
    shapes = model.projection_shapes()
    groups = {g: (shapes[mods[0]][0], len(mods), max(shapes[m][1] for m in mods)) for g, mods in GROUPS.items()}
    graphs = runner.graphs
    sizes = range(1, config.max_num_seqs + 1)
    return EngineShape(
        on_gpu=on_gpu,
        num_sms=torch.cuda.get_device_properties(runner.device).multi_processor_count if on_gpu else 1,
        page_size=runner.page_size, block_size=config.block_size, max_model_len=engine.max_model_len,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        max_lora_rank=config.max_lora_rank, num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
        groups=groups, group_modules=dict(GROUPS),
        graph_buckets=tuple(graphs.buckets) if graphs is not None else (),
        captured=frozenset(graphs.graphs) if graphs is not None else frozenset(),
        eager_decode_sizes=tuple(s for s in sizes if graphs is None or graphs.bucket(s) is None))


def _run_job(engine: "LLMEngine", job: Job, prefix: str) -> int | None:
    """Add the job's requests, step until the engine is idle; the number of steps, or None if the
    engine refuses a request (then none of the job runs)."""
    seqs = _make_sequences(engine, job.requests, prefix)
    if seqs is None:
        return None
    for seq in seqs:
        engine.add(seq)
    waiting_first_token = {seq.request_id for seq in seqs}
    joiners = job.joiners
    steps = 0
    while engine.has_work():
        outputs = engine.step()
        steps += 1
        # a synthetic adapter whose numbers overflowed (non-finite logits: its request failed and
        # the adapter was quarantined) must still serve the jobs after this one, or the shapes only
        # they reach stay uncompiled; the scratch quarantine holds warm-up adapters only
        for name in engine.quarantine.names():
            engine.quarantine.clear(name)
        if joiners:
            waiting_first_token -= {out.request_id for out in outputs if out.token_ids or out.finished}
            if not waiting_first_token:
                more = _make_sequences(engine, joiners, f"{prefix}-joiner")
                for seq in more or ():
                    engine.add(seq)
                joiners = ()
        if steps == MAX_STEPS_PER_JOB:
            logger.warning("warm-up: %s did not end after %d steps; aborted", job.label, steps)
            for request_id in list(engine.seqs):
                engine.abort(request_id)
        elif steps > MAX_STEPS_PER_JOB + 8:
            raise RuntimeError(f"warm-up: {job.label} did not end after its requests were aborted")
    return steps


def _make_sequences(engine: "LLMEngine", requests, prefix: str) -> list | None:
    vocab = engine.model_config.vocab_size
    seqs = []
    try:
        for i, req in enumerate(requests):
            params = SamplingParams(**{"temperature": 0.0, "max_tokens": req.max_tokens, "ignore_eos": True,
                                       **dict(req.sampling)})
            prompt = [(3 + 7 * i + 13 * j) % vocab for j in range(req.prompt_len)]
            seqs.append(engine.make_sequence(f"{prefix}-{i}", None, prompt, params, req.adapter))
    except EngineError as error:
        logger.debug("warm-up: request refused: %s", error)
        for seq in seqs:
            engine.release(seq)
        return None
    return seqs


def _synthetic_adapter(spec: AdapterSpec, engine: "LLMEngine", seed: int) -> PackedAdapter:
    """Random small weights (the same in every layer: the kernels see only shapes), packed for the pool."""
    gen = torch.Generator().manual_seed(seed)
    shapes = engine.model_config.projection_shapes()
    layer = {}
    for module in spec.modules:
        n_in, n_out = shapes[module]
        layer[module] = (torch.randn(spec.rank, n_in, generator=gen) * 0.01,
                         torch.randn(n_out, spec.rank, generator=gen) * 0.01, 2.0)
    modules = tuple(m for m in LORA_MODULES if m in layer)
    adapter = LoRAAdapter(spec.name, "<warm-up>", spec.rank, modules, [layer] * engine.model_config.num_layers)
    lora = engine.lora
    return pack_adapter(adapter, engine.model_config, lora.page_size, lora.dtype, lora.pin_memory)


@contextlib.contextmanager
def _scratch_state(engine: "LLMEngine", adapters: list[AdapterSpec]):
    """The engine with fresh bookkeeping of the same limits and the warm-up's adapters in its host
    tier; its own bookkeeping back afterwards, whatever happened."""
    runner = engine.runner
    saved = {name: getattr(engine, name)
             for name in ("pages", "scheduler", "lora", "stats", "seqs", "_prefetching", "quarantine")}
    saved_generator = runner.generator
    own_lora = engine.lora
    engine.pages = PageManager(saved["pages"].num_pages, saved["pages"].block_size)
    engine.scheduler = Scheduler(engine.pages, saved["scheduler"].max_num_seqs,
                                 saved["scheduler"].max_num_batched_tokens)
    # no budget: an adapter the host tier drops before its first use would make its jobs fail
    engine.lora = LoRAManager(own_lora.model, {}, [], own_lora.max_lora_rank, 1 << 62, own_lora.page_size,
                              own_lora.dtype, own_lora.pin_memory, shard=runner.shard_adapter)
    engine.stats = EngineStats(num_pages_total=engine.pages.num_pages)
    engine.quarantine = AdapterQuarantine()  # whatever the synthetic steps give, serving starts clean
    engine.seqs = {}
    engine._prefetching = {}
    runner.generator = torch.Generator(device=runner.device)
    runner.generator.manual_seed(0)
    try:
        for seed, spec in enumerate(adapters):
            engine.lora.register(spec.name, _synthetic_adapter(spec, engine, seed))
        yield
    finally:
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)  # prefetch copies into scratch pages are done
        for name, value in saved.items():
            setattr(engine, name, value)
        runner.generator = saved_generator
