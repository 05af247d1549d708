"""The engine: requests in, one scheduled step at a time, deltas out. Single-threaded; see async_engine."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import torch
from transformers import AutoTokenizer

from engine.adapter_fleet import evict_retired, fill_gateway_stats
from engine.adapter_identity import base_fingerprint
from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import IncrementalDetokenizer, find_stop
from engine.engine_stats import EngineStats
from engine.errors import AdapterQuarantinedError, InvalidRequestError, NonFiniteLogitsError
from engine.lora_manager import LoRAManager
from engine.model_runner import SampledTokens
from engine.page_manager import PageManager
from engine.request_checks import check_prompt, check_prompt_size
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.quarantine import AdapterQuarantine
from engine.sampler import NON_FINITE, TokenLogprobs
from engine.scheduler import Scheduler
from engine.tp_runner import make_runner
from engine.sequence import Sequence, Status
from engine.warmup import maybe_warm_up

logger = logging.getLogger("multilora")


class LLMEngine:
    """Continuous-batching multi-LoRA engine.

    ``make_sequence`` validates a request (and loads its adapter) in the caller's thread;
    ``add``, ``abort`` and ``step`` belong to the thread that runs the loop.
    """

    def __init__(self, config: EngineConfig, adapters: dict[str, str] | None = None) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        # Two instances: HF tokenizers are not safe across threads ("Already borrowed"); requests
        # are tokenized in the caller's thread, tokens are detokenized in the loop's.
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self.detokenizer_tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        max_len = config.max_model_len or self.model_config.max_position_embeddings
        self.runner = make_runner(config, self.model_config, max_len)
        kv_capacity = self.runner.num_pages * config.block_size
        if kv_capacity < max_len:
            logger.warning("max_model_len %d lowered to the KV cache's %d tokens", max_len, kv_capacity)
            max_len = kv_capacity
        self.max_model_len = max_len
        self.pages = PageManager(self.runner.num_pages, config.block_size)
        self.scheduler = Scheduler(self.pages, config.max_num_seqs, config.max_num_batched_tokens)
        self.lora = LoRAManager(self.model_config, adapters or {}, config.lora_roots, config.max_lora_rank,
                                config.max_host_adapter_bytes, self.runner.page_size, self.runner.dtype,
                                pin_memory=self.runner.device.type == "cuda",
                                allow_symlinks_outside_roots=config.allow_adapter_symlinks_outside_roots,
                                base_fingerprint=base_fingerprint(config.model, self.model_config, config.load_format,
                                                                  config.seed),
                                shard=self.runner.shard_adapter)
        self.quarantine = AdapterQuarantine()  # adapters that made non-finite logits: refused
        self.retired_adapters: set[str] = set()  # versions whose pool pages go once unused (adapter_fleet)
        self.fleet_stats_cache = None
        self.eos_token_ids = self._eos_ids()
        self.seqs: dict[str, Sequence] = {}
        self._prefetching: dict[str, tuple] = {}  # adapter prefetches in flight: name -> (event, staging)
        self._in_flight: SampledTokens | None = None  # a launched step not yet collected
        self.stats = EngineStats(num_pages_total=self.runner.num_pages)
        self.warmup_report = maybe_warm_up(self)  # kernels compiled, graphs captured before any request

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_path = os.path.join(self.config.model, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                eos = json.load(f).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        return tuple(sorted(int(i) for i in ids))

    # --- requests ---------------------------------------------------------------------------
    def make_sequence(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                      params: SamplingParams, lora_name: str | None) -> Sequence:
        """Validate and tokenize a request, and take a reference on its adapter. Thread-safe.

        Every check whose cost grows with the request comes before the work it bounds (a prompt's
        size before tokenizing it), and the adapter is acquired last: a request refused here
        holds no reference."""
        check_prompt(prompt, prompt_token_ids)
        if prompt is not None:
            check_prompt_size(prompt, self.max_model_len)
            ids = self.tokenizer(prompt)["input_ids"]
            source = "text_input"
        else:
            source = "input_ids"
            if len(prompt_token_ids) >= self.max_model_len:
                raise InvalidRequestError(self._too_long(source, len(prompt_token_ids)))
            ids = [int(t) for t in prompt_token_ids]
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"input_ids: token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if not ids:
            raise InvalidRequestError(f"{source}: the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(self._too_long(source, len(ids)))
        vocab = self.model_config.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise InvalidRequestError(
                f"sampling_parameters: stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=min(self.config.default_max_tokens,
                                                                self.max_model_len - len(ids)))
            params.min_tokens = min(params.min_tokens, params.max_tokens)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"sampling_parameters: max_tokens={params.max_tokens} is beyond the context: the prompt has "
                f"{len(ids)} tokens and max_model_len is {self.max_model_len}, so at most "
                f"{self.max_model_len - len(ids)} can be generated")
        if lora_name:
            self.quarantine.check(lora_name)
        lora = self.lora.acquire(lora_name) if lora_name else None
        try:
            return self._new_sequence(request_id, ids, params, lora_name or None, lora)
        except BaseException:
            if lora is not None:  # the sequence never existed for anyone else: its reference goes here
                self.lora.release(lora.key)
            raise

    def _new_sequence(self, request_id: str, ids: list[int], params: SamplingParams, lora_name: str | None,
                      lora) -> Sequence:
        pages_needed = self.pages.blocks_needed(len(ids) + params.max_tokens) + (lora.num_pages if lora else 0)
        if pages_needed > self.pages.num_pages:
            raise InvalidRequestError(
                f"the request needs {pages_needed} pages of KV cache and adapter weights; the pool has "
                f"{self.pages.num_pages}: lower sampling_parameters max_tokens or shorten the prompt")
        seq = Sequence(request_id=request_id, prompt_token_ids=ids, params=params, lora_name=lora_name, lora=lora)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.manual_seed(params.seed)
        seq.detokenizer = IncrementalDetokenizer(self.detokenizer_tokenizer, ids, params.skip_special_tokens)
        return seq

    def _too_long(self, source: str, num_tokens: int) -> str:
        return (f"{source}: the prompt has {num_tokens} tokens; the context holds {self.max_model_len} "
                "(max_model_len), including at least one generated token")

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs:
            self.release(seq)
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now; returns its final delta (finish_reason 'abort'), or None if unknown."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        self._finish(seq)
        return self._delta(seq, flush=True)

    def has_work(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_work()

    # --- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the deltas of one step's tokens.

        With ``async_scheduling`` the step after is scheduled and launched before this one's
        tokens are read back, so the device always has the next step queued while the host
        detokenizes and answers: each call launches one step and returns the deltas of the one
        before (the first call launches two). A sequence that ends at step N (EOS, a stop
        string, an abort) may already be in step N+1: that token is dropped.
        """
        self._poll_prefetches()
        if self._in_flight is None:
            self._in_flight = self._launch()
            if self._in_flight is None:
                self._prefetch()
                return []
        following = self._launch() if self.config.async_scheduling else None
        self._prefetch()
        done, self._in_flight = self._in_flight, following
        outputs = self._collect(done)
        evict_retired(self)
        return outputs

    def _launch(self) -> SampledTokens | None:
        """Schedule a step and queue its work on the device; None if there is nothing to run."""
        plan = self.scheduler.schedule()
        if not plan.batch:
            return None
        adapters = {item.seq.lora.key: item.seq.lora for item in plan.batch if item.seq.lora is not None}
        for name, pages in plan.adapter_loads:
            self.runner.load_adapter(adapters[name], pages)
        sampled = self.runner.run(plan, self.pages, adapters, self.eos_token_ids)
        row = 0
        for item in plan.batch:
            seq = item.seq
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats.prompt_tokens_total += min(item.num_new_tokens,
                                                      seq.num_prompt_tokens - seq.num_computed_tokens)
            samples = item.samples
            seq.num_computed_tokens += item.num_new_tokens
            if samples:
                seq.num_pending += 1
                seq.pending_row = row
                row += 1
        self.stats.steps_total += 1
        return sampled

    def _collect(self, launched: SampledTokens) -> list[RequestOutput]:
        """Wait for a launched step's tokens and turn them into deltas."""
        tokens = launched.get()
        logprobs = launched.get_logprobs()
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        for seq, token, token_logprobs in zip(launched.seqs, tokens, logprobs):
            seq.num_pending -= 1
            if seq.is_finished:  # ended (or aborted) while this step ran
                continue
            if token == NON_FINITE:
                outputs.append(self._fail_non_finite(seq))
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            self._append_token(seq, token, token_logprobs)
            self.stats.generation_tokens_total += 1
            if seq.is_finished:
                self._finish(seq)
            outputs.append(self._delta(seq, flush=seq.is_finished))
        return outputs

    def _fail_non_finite(self, seq: Sequence) -> RequestOutput:
        """End a request whose logits are not finite (the rest of its batch goes on), and
        quarantine its adapter: whatever made them (weights that overflow on some inputs) is
        the adapter's, and would spoil its next requests too."""
        where = f"non-finite logits (NaN or Inf) at output token {len(seq.output_token_ids) + 1}"
        if seq.lora_name:
            self.quarantine.add(seq.lora_name, f"a request on it made {where}")
            logger.warning("request %s on LoRA adapter '%s': %s; the adapter is quarantined",
                           seq.request_id, seq.lora_name, where)
            error: Exception = AdapterQuarantinedError(
                f"LoRA adapter '{seq.lora_name}' made {where} of this request: the request failed and the "
                f"adapter is quarantined (with it the model overflows {str(self.runner.dtype).removeprefix('torch.')}"
                " on this input); its later requests are refused until the model is reloaded or the server "
                "restarted")
        else:
            logger.warning("request %s on the base model: %s", seq.request_id, where)
            error = NonFiniteLogitsError(
                f"the base model made {where} of this request (it overflows "
                f"{str(self.runner.dtype).removeprefix('torch.')} on this input): the request failed")
        self.stats.num_non_finite_requests_total += 1
        seq.finish_reason = "error"
        self._finish(seq)
        out = self._delta(seq, flush=True)
        out.error = error
        return out

    def _prefetch(self) -> None:
        """Start copying the adapters of waiting requests into free pool pages (side stream on CUDA)."""
        for lora, pages in self.scheduler.plan_prefetch():
            handle = self.runner.load_adapter(lora, pages, prefetch=True)
            if handle is None:
                self.scheduler.finish_loading(lora.key)
            else:
                self._prefetching[lora.key] = handle

    def _poll_prefetches(self) -> None:
        for name, (event, _staging) in list(self._prefetching.items()):
            if event.query():
                del self._prefetching[name]
                self.scheduler.finish_loading(name)

    def fail_all(self, error: Exception) -> list[RequestOutput]:
        """End every live request with ``error`` (after an unexpected failure of a step)."""
        outputs = []
        self._in_flight = None
        for seq in list(self.seqs.values()):
            seq.finish_reason = "error"
            self._finish(seq)
            out = self._delta(seq, flush=True)
            out.error = error
            outputs.append(out)
        return outputs

    def get_stats(self) -> EngineStats:
        s = self.stats
        s.num_running, s.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        host = self.lora.snapshot()
        s.num_pages_free = self.pages.num_free
        s.num_kv_blocks_used = self.pages.num_kv_pages
        s.num_adapter_pages_used = self.pages.num_adapter_pages
        s.num_adapters_gpu = self.pages.num_resident_adapters
        s.num_adapters_host = host.num_host
        s.adapter_loads_total, s.adapter_load_seconds_total = host.loads_total, host.load_seconds_total
        s.adapter_hits_total = self.scheduler.adapter_pool_hits
        s.adapter_misses_total = self.scheduler.adapter_pool_misses
        s.adapter_evictions_total = self.pages.num_adapter_evictions
        s.adapter_prefetches_total = self.scheduler.adapter_prefetches
        s.num_preemptions_total = self.scheduler.num_preemptions
        s.num_adapters_quarantined = len(self.quarantine.names())
        fill_gateway_stats(self, s)
        return EngineStats(**vars(s))

    # --- per-sequence bookkeeping -----------------------------------------------------------
    def _append_token(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> None:
        p = seq.params
        seq.output_token_ids.append(token)
        if logprobs is not None:
            seq.output_logprobs.append({token: logprobs.logprob, **dict(zip(logprobs.top_ids, logprobs.top_logprobs))})
            # as vLLM: a sampled token among the most likely takes its rank there
            seq.output_logprob_ranks.append({token: logprobs.rank,
                                             **{t: rank for rank, t in enumerate(logprobs.top_ids, 1)}})
            seq.cumulative_logprob += logprobs.logprob
        num_out = len(seq.output_token_ids)
        new_text = seq.detokenizer.add(token)
        seq.output_text += new_text
        may_stop = num_out >= p.min_tokens
        if may_stop and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
            seq.finish_reason = "stop"
        elif may_stop and p.stop and new_text:
            at = find_stop(seq.output_text, p.stop, len(seq.output_text) - len(new_text))
            if at != -1:
                seq.output_text = seq.output_text[:at]
                seq.finish_reason = "stop"
        if seq.finish_reason is None and (num_out >= p.max_tokens
                                          or seq.num_prompt_tokens + num_out >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.status = Status.FINISHED

    def _delta(self, seq: Sequence, flush: bool) -> RequestOutput:
        # hold back text that may turn out to be the start of a stop string
        holdback = 0 if flush or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
        end = max(seq.num_sent_chars, len(seq.output_text) - holdback)
        out = RequestOutput(
            request_id=seq.request_id,
            text=seq.output_text[seq.num_sent_chars:end],
            token_ids=seq.output_token_ids[seq.num_sent_tokens:],
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=len(seq.output_token_ids),
        )
        if seq.params.logprobs is not None:
            out.logprobs = seq.output_logprobs[seq.num_sent_tokens:]
            out.logprob_ranks = seq.output_logprob_ranks[seq.num_sent_tokens:]
            out.token_texts = {t: _token_text(seq, t) for entry in out.logprobs for t in entry}
            out.cumulative_logprob = seq.cumulative_logprob
        seq.num_sent_chars, seq.num_sent_tokens = end, len(seq.output_token_ids)
        return out

    def _finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.scheduler.remove(seq)
        self.seqs.pop(seq.request_id, None)
        self.release(seq)

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's adapter reference (once)."""
        if seq.lora is not None and not seq.lora_released:
            self.lora.release(seq.lora.key)
            seq.lora_released = True


def _token_text(seq: Sequence, token_id: int) -> str:
    """The text of one token alone (vLLM's decoded_token), remembered per request."""
    text = seq.token_texts.get(token_id)
    if text is None:
        text = seq.token_texts[token_id] = seq.detokenizer.decode([token_id], False)
    return text
