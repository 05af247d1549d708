"""What the warm-up runs: step shapes that reach every kernel binary and decode graph that traffic
can reach, derived from the tile choices of kernels/tiles.py. Plain Python, no torch.

A kernel binary is keyed by its constexprs (all chosen by kernels/tiles.py) and by the class of
its specialized integer arguments; the arguments that vary from step to step are not specialized
(docs/KERNELS.md, compile keys). So a step reaches a new binary only through:
- the LoRA tile class of its token count (``tiles.lora_block_m``) and, per projection group, the
  rank's tile class (BLOCK_R and the tiles of shrink, expand and fused): every pair is run, one
  rank per class;
- decode attention run eagerly (no graphs, or more sequences than the largest bucket), whose
  split count follows the batch size and the longest context.
Decode graphs add captures rather than binaries: one per batch bucket and set of projection
groups the step's adapters touch (any subset of them, as adapters target any modules).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from kernels import tiles

# steps an eager-decode witness's anchor may run past its target context before the joiners decode
DRIFT = 4


@dataclass(frozen=True)
class EngineShape:
    """What the plan depends on: the model's shapes, the engine's limits and the device."""

    on_gpu: bool  # the kernels' GPU tiles (else the interpreter's)
    num_sms: int
    page_size: int  # elements of one pool page per layer
    block_size: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_lora_rank: int
    num_kv_heads: int
    head_dim: int
    # per projection group: (K of its shrink, modules in the group, largest output of a module)
    groups: dict[str, tuple[int, int, int]]
    group_modules: dict[str, tuple[str, ...]]
    graph_buckets: tuple[int, ...] = ()  # empty without decode graphs
    captured: frozenset = frozenset()  # (bucket, groups, rank bound) keys whose graph exists already
    eager_decode_sizes: tuple[int, ...] = ()  # decode batch sizes that run without a graph


@dataclass(frozen=True)
class Request:
    prompt_len: int
    max_tokens: int
    adapter: str | None = None
    sampling: tuple[tuple[str, object], ...] = ()  # SamplingParams arguments beside greedy decoding


@dataclass(frozen=True)
class Job:
    """Requests added together and run until the engine is idle; ``joiners`` are added once every
    one of ``requests`` has its first token (so that they decode beside them)."""

    label: str
    requests: tuple[Request, ...]
    joiners: tuple[Request, ...] = ()


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    modules: tuple[str, ...]


@dataclass
class WarmupPlan:
    adapters: list[AdapterSpec]
    jobs: list[Job]
    # shapes traffic can reach that the engine's limits keep the warm-up from (context or pool)
    num_unreached: int = 0


SAMPLING_VARIANTS = (
    (),  # greedy
    (("temperature", 0.8),),
    (("temperature", 0.8), ("top_k", 5)),
    (("temperature", 0.8), ("top_p", 0.9)),
    (("temperature", 1.0), ("top_k", 20), ("top_p", 0.5), ("seed", 7)),
    (("logprobs", 5),),
    (("temperature", 0.7), ("logprobs", 0), ("seed", 3)),
    (("min_tokens", 2), ("stop_token_ids", (0,)), ("ignore_eos", False)),
)


def token_classes(shape: EngineShape) -> list[int]:
    """One token count of each LoRA tile class a prefill step can have: the smallest (>= 2, so
    that the step is not decode-shaped)."""
    seen, counts = set(), []
    for num_tokens in range(2, shape.max_num_batched_tokens + 1):
        block_m = tiles.lora_block_m(num_tokens, shape.on_gpu)
        if block_m not in seen:
            seen.add(block_m)
            counts.append(num_tokens)
    return counts


def rank_classes(shape: EngineShape) -> list[int]:
    """One rank (the smallest) of each class of LoRA tiles, over every token class and group."""
    block_ms = sorted({tiles.lora_block_m(n, shape.on_gpu) for n in token_classes(shape)} or {tiles.MIN_DOT})
    seen, ranks = set(), []
    for rank in range(1, shape.max_lora_rank + 1):
        key = [tiles.expand_block_r(rank)]
        for block_m in block_ms:
            for k, num_proj, max_n in shape.groups.values():
                shrink = tiles.shrink_tiles(1, k, rank, num_proj, shape.page_size, block_m, shape.num_sms,
                                            shape.on_gpu)
                expand = tiles.expand_tiles(1, max_n, num_proj, shape.page_size, block_m, shape.num_sms,
                                            shape.on_gpu)
                fused = tiles.fused_tiles(1, k, max_n, num_proj, rank, shape.page_size, block_m, shape.num_sms,
                                          shape.on_gpu)
                # split_k, chunks_per_program and max_split are run-time arguments of the kernels,
                # num_programs the fused kernel's grid
                key.append((dataclasses.replace(shrink, split_k=0),
                            dataclasses.replace(expand, chunks_per_program=0),
                            dataclasses.replace(fused, num_programs=0, max_split=0)))
        key = tuple(key)
        if key not in seen:
            seen.add(key)
            ranks.append(rank)
    return ranks


def group_sets(groups) -> list[frozenset[str]]:
    """Every non-empty set of projection groups, smallest first."""
    names = list(groups)
    return [frozenset(c) for n in range(1, len(names) + 1) for c in itertools.combinations(names, n)]


def prompt_lengths(shape: EngineShape, num_tokens: int, min_seqs: int = 1) -> list[int] | None:
    """Prompts of ``num_tokens`` in all, admitted in one step, one of them at least 2 long; None
    if the context or the sequence limit does not allow it."""
    longest = shape.max_model_len - 1  # room for the one sampled token
    num_seqs = max(min_seqs, -(-num_tokens // max(1, longest)))
    if num_seqs > shape.max_num_seqs or num_tokens < num_seqs + 1 or longest < 2:
        return None
    base, extra = divmod(num_tokens, num_seqs)
    lengths = [base + (i < extra) for i in range(num_seqs)]
    return lengths if max(lengths) <= longest else None


def eager_decode_witnesses(shape: EngineShape) -> tuple[list[tuple[int, int]], int]:
    """(batch size, longest context) of one decode step per decode-attention tile choice that an
    eager decode step can have; and how many choices no witness within the limits reaches.

    A witness of several sequences is one long anchor plus short joiners, which decode beside it
    a few steps later: its tiles must not change over those DRIFT steps of the anchor."""
    def choice(num_seqs: int, ctx: int):
        return tiles.decode_attention_tiles(num_seqs, shape.num_kv_heads, ctx, shape.head_dim, shape.num_sms,
                                            shape.on_gpu)

    reachable, witnesses = set(), {}
    for num_seqs in shape.eager_decode_sizes:
        if num_seqs > shape.max_num_batched_tokens:
            continue
        drift = 0 if num_seqs == 1 else DRIFT
        for ctx in range(2, shape.max_model_len):  # a decode step's context is at most max_model_len - 1
            key = choice(num_seqs, ctx)
            reachable.add(key)
            if key in witnesses or ctx - 1 + anchor_tokens(num_seqs) > shape.max_model_len:
                continue
            if all(choice(num_seqs, ctx + d) == key for d in range(1, drift + 1)):
                witnesses[key] = (num_seqs, ctx)
    return sorted(witnesses.values(), key=lambda w: (w[1], w[0])), len(reachable) - len(witnesses)


def anchor_tokens(num_seqs: int) -> int:
    """max_tokens of an eager-decode witness's anchor: alone it decodes once; with joiners it
    decodes until they have decoded beside it."""
    return 2 if num_seqs == 1 else 3 + DRIFT


def plan_warmup(shape: EngineShape) -> WarmupPlan:
    """The adapters and jobs of the warm-up: prefill steps of every token class with and without
    LoRA (every set of projection groups, every rank class), beside decoding sequences and in
    chunks; decode steps of every graph bucket and group set not captured yet; eager decode steps
    of every split choice; one batch of every sampling option."""
    groups = shape.group_modules
    ranks = rank_classes(shape)
    by_groups = {g: AdapterSpec(f"warmup-r{ranks[0]}-{'-'.join(sorted(g))}", ranks[0],
                                tuple(m for name in groups if name in g for m in groups[name]))
                 for g in group_sets(groups)}
    every = by_groups[frozenset(groups)]
    larger = [AdapterSpec(f"warmup-r{r}-all", r, every.modules) for r in ranks[1:]]
    plan = WarmupPlan(list(by_groups.values()) + larger, [])
    _prefill_jobs(shape, plan, every)
    _graph_jobs(shape, plan, by_groups, larger)
    witnesses, unreached = eager_decode_witnesses(shape)
    plan.num_unreached += unreached
    for num_seqs, ctx in witnesses:
        plan.jobs.append(Job(f"eager decode of {num_seqs} sequences at context {ctx}",
                             (Request(ctx - 1, anchor_tokens(num_seqs)),),
                             tuple(Request(1, 2) for _ in range(num_seqs - 1))))
    plan.jobs.append(Job("sampling variants", tuple(Request(3, 3, every.name if i % 2 else None, variant)
                                                    for i, variant in enumerate(SAMPLING_VARIANTS))))
    return plan


def _prefill_jobs(shape: EngineShape, plan: WarmupPlan, every: AdapterSpec) -> None:
    adapters, jobs = plan.adapters, plan.jobs

    def requests(lengths: list[int], names: list[str | None], max_tokens: int = 1) -> tuple[Request, ...]:
        return tuple(Request(n, max_tokens, names[i % len(names)]) for i, n in enumerate(lengths))

    for num_tokens in token_classes(shape):
        lengths = prompt_lengths(shape, num_tokens)
        if lengths is None:
            plan.num_unreached += 1
            continue
        jobs.append(Job(f"prefill {num_tokens} tokens, base model", requests(lengths, [None])))
        for spec in adapters:
            jobs.append(Job(f"prefill {num_tokens} tokens, {spec.name}", requests(lengths, [spec.name])))
        mixed = prompt_lengths(shape, num_tokens, min_seqs=4)
        if mixed is not None:
            jobs.append(Job(f"prefill {num_tokens} tokens, base and 3 adapters",
                            requests(mixed, [None, every.name, adapters[0].name, adapters[-1].name])))
        jobs.append(Job(f"prefill {num_tokens} tokens beside 2 decoding sequences",
                        (Request(2, 4 + DRIFT, every.name), Request(2, 4 + DRIFT)),
                        requests(lengths, [adapters[-1].name])))
    longest = shape.max_model_len - 1
    if longest - 1 > shape.max_num_batched_tokens:  # a prompt prefilled in chunks
        chunked = min(longest - 1, shape.max_num_batched_tokens + max(2, shape.max_num_batched_tokens // 2))
        jobs.append(Job(f"chunked prefill of {chunked} tokens", requests([chunked], [every.name], 2)))


def _graph_jobs(shape: EngineShape, plan: WarmupPlan, by_groups: dict[frozenset, AdapterSpec],
                larger: list[AdapterSpec]) -> None:
    """A decode step per bucket and graph key not captured yet: every group set with the smallest
    rank class (by_groups' adapters), and every group at once with each larger class (``larger``,
    adapters of all groups); other sets at larger ranks are captured when first needed."""
    every = frozenset(shape.group_modules)
    first_adapter = {(frozenset(), 0): None}  # graph key (groups, rank bound) -> the adapter that reaches it
    for lora, spec in [*by_groups.items(), *((every, spec) for spec in larger)]:
        first_adapter.setdefault((lora, tiles.lora_rank_bound(spec.rank, shape.max_lora_rank)), spec.name)
    below = 0
    for bucket in shape.graph_buckets:
        # the largest decode step the bucket serves; none if no larger than the bucket below
        num_seqs = min(bucket, shape.max_num_seqs, shape.max_num_batched_tokens)
        if num_seqs > below:
            for (lora, bound), first in first_adapter.items():
                if (bucket, lora, bound) not in shape.captured:
                    plan.jobs.append(Job(f"decode graph of bucket {bucket} ({num_seqs} sequences), LoRA on "
                                         f"{', '.join(sorted(lora)) or 'none'}" + (f", ranks up to {bound}" if lora else ""),
                                         tuple(Request(1, 2, first if i == 0 else None) for i in range(num_seqs))))
        below = bucket
