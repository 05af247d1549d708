"""Iteration-level scheduling over the unified page pool: which sequences run this step, how many
tokens each, and which adapters must be copied into the pool first."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

from engine.page_manager import PageManager
from engine.sequence import Sequence, Status

if TYPE_CHECKING:
    from engine.adapters import PackedAdapter


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step (a prefill chunk, or 1 for decode)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class StepPlan:
    batch: list[ScheduledSeq] = field(default_factory=list)
    adapter_loads: list[tuple[str, list[int]]] = field(default_factory=list)  # (name, pages) to fill


class Scheduler:
    """Continuous batching with chunked prefill, adapter residency and preemption by recomputation.

    Each step: every running sequence gets its next token (decode) or next prompt chunk; then
    waiting sequences are admitted in arrival order while the token budget, the sequence limit
    and the pool allow both their KV blocks and, if not resident, their adapter's pages. Space is
    found by evicting idle adapters (LRU) first; when a running sequence still cannot grow, the
    newest running sequence is preempted (its KV freed, recomputed later).
    """

    def __init__(self, pages: PageManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.pages = pages
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.adapter_pool_hits = 0
        self.adapter_pool_misses = 0
        self.adapter_prefetches = 0
        self.loading: set[str] = set()  # adapters being copied into the pool by prefetch

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted), free its KV and unpin its adapter."""
        if seq in self.running:
            self.running.remove(seq)
            if seq.lora is not None:
                self.pages.unpin(seq.lora.key)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pages.free_seq(seq.request_id)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.last_token_pending:
                i += 1  # finishes when that token arrives
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.pages.reserve(self.pages.extra_blocks(seq.request_id, seq.num_computed_tokens + num_new)):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:  # it preempted itself
                break
            self.pages.grow(seq.request_id, seq.num_computed_tokens + num_new)
            plan.batch.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1
        index = 0
        while index < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[index]
            lora = seq.lora
            if lora is not None and lora.key in self.loading:
                index += 1  # its adapter is still being copied in; later requests may pass it
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self.pages.extra_blocks(seq.request_id, seq.num_computed_tokens + num_new)
            load = lora is not None and not self.pages.is_resident(lora.key)
            if lora is not None and not load:
                self.pages.pin(lora.key)  # first, so its own pages do not count as evictable
            if not self.pages.can_reserve(need + (lora.num_pages if load else 0)):
                if lora is not None and not load:
                    self.pages.unpin(lora.key)
                break
            del self.waiting[index]
            if load:
                plan.adapter_loads.append((lora.key, self.pages.add_adapter(lora.key, lora.num_pages)))
                self.pages.pin(lora.key)
                self.adapter_pool_misses += 1
            elif lora is not None:
                self.adapter_pool_hits += 1
            self.pages.grow(seq.request_id, seq.num_computed_tokens + num_new)
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.batch.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return plan

    def plan_prefetch(self, lookahead: int = 32) -> list[tuple[PackedAdapter, list[int]]]:
        """Pages for the adapters of the next waiting requests that are not resident, taken only
        from free pages (never by eviction), leaving one free page per running sequence for its
        next KV block. Each stays pinned until ``finish_loading``."""
        loads = []
        for seq in list(islice(self.waiting, lookahead)):
            lora = seq.lora
            if lora is None or self.pages.is_resident(lora.key):
                continue
            if self.pages.num_free - len(self.running) < lora.num_pages:
                break
            pages = self.pages.add_adapter(lora.key, lora.num_pages)
            self.pages.pin(lora.key)
            self.loading.add(lora.key)
            self.adapter_prefetches += 1
            loads.append((lora, pages))
        return loads

    def finish_loading(self, name: str) -> None:
        self.loading.discard(name)
        self.pages.unpin(name)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if seq.lora is not None:
            self.pages.unpin(seq.lora.key)
        self.pages.free_seq(seq.request_id)
        seq.status = Status.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
