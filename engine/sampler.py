"""Turning logits into tokens: greedy, temperature, top-k, top-p, per-request seeds; and the
log probabilities of those tokens for the requests that ask (sampling_parameters logprobs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from engine.ops import to_device
from engine.sequence import Sequence

# The token of a row whose logits hold NaN or Inf, on its way to the host (never fed back).
NON_FINITE = -1


@dataclass
class StepLogprobs:
    """Log probabilities of one step's sampled tokens, for the rows whose requests asked.

    values and ids: [R, 1 + K] (K: the most top tokens any of these rows asked for). Column 0 is
    the sampled token: its logprob in ``values``, its rank in the vocabulary in ``ids`` (1 = most
    likely; ties counted against it, as vLLM does). Columns 1.. are the K most likely tokens, most
    likely first: their logprobs in ``values``, their token ids in ``ids``.
    """

    rows: list[int]  # rows of the step's sampled tokens
    values: torch.Tensor  # [R, 1 + K] float32
    ids: torch.Tensor  # [R, 1 + K] int64


class TokenLogprobs(NamedTuple):
    """One sampled token's log probabilities, on the host."""

    logprob: float
    rank: int  # in the vocabulary, 1 = most likely
    top_ids: list[int]  # the request's k most likely tokens, most likely first
    top_logprobs: list[float]


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...],
           default_generator: torch.Generator) -> tuple[torch.Tensor, StepLogprobs | None]:
    """logits: [N, V] float32, one row per sequence that samples this step -> [N] int64 token ids,
    on the logits' device, and their log probabilities for the requests that ask (None when no
    request of the step asks: such a step does no extra work); nothing here waits for the device.

    Each seeded request draws from its own generator, so its tokens do not depend on what
    else shares the batch. Before min_tokens are out, EOS and stop_token_ids are masked.
    """
    raw = logits
    cloned = False
    logprob_rows: list[int] = []
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.logprobs is not None:
            logprob_rows.append(row)
        if seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            if banned:
                if not cloned:  # the caller's logits stay as they are (a graph's output buffer)
                    logits, cloned = logits.clone(), True
                logits[row, banned] = float("-inf")
    tokens = logits.argmax(dim=-1)
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.is_greedy:
            continue
        tokens[row] = _sample_row(logits[row], p.temperature, p.top_k, p.top_p,
                                  seq.generator or default_generator)
    if not logprob_rows:
        return tokens, None
    num_top = min(max(seqs[row].params.logprobs for row in logprob_rows), logits.shape[-1])
    values, ids = compute_logprobs(raw, tokens, to_device(logprob_rows, torch.int64, logits.device), num_top)
    return tokens, StepLogprobs(logprob_rows, values, ids)


def mark_non_finite(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits: [N, V]; tokens: [N] -> tokens with NON_FINITE where a row of ``logits`` holds NaN,
    +Inf or -Inf. One fused reduction over the logits (aminmax: a row's min and max are finite
    exactly when all of it is; NaN propagates into both) and three ops on [N]; it travels to the
    host with the tokens, so it costs no synchronization of its own."""
    low, high = torch.aminmax(logits, dim=-1)
    return torch.where(torch.isfinite(low) & torch.isfinite(high), tokens, NON_FINITE)


def compute_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor,
                     num_top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [N, V] float32, the model's raw logits (vLLM's "raw_logprobs": before temperature,
    top-k, top-p and the min_tokens mask); tokens: [N] int64, sampled; rows: [R] int64 on the
    device -> values, ids [R, 1 + num_top] laid out as ``StepLogprobs`` says."""
    logprobs = torch.log_softmax(logits.index_select(0, rows), dim=-1)  # [R, V]
    sampled = logprobs.gather(1, tokens.index_select(0, rows)[:, None])  # [R, 1]
    rank = (logprobs >= sampled).sum(dim=-1, keepdim=True)  # [R, 1]
    top = logprobs.topk(num_top, dim=-1)  # [R, num_top] each, most likely first
    return torch.cat([sampled, top.values], dim=1), torch.cat([rank, top.indices], dim=1)


def _sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator) -> torch.Tensor:
    # logits: [V]
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[0]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(0)
        drop = cumulative - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    # Gumbel-style draw: a fixed number of random numbers per step, whatever the distribution
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax()

