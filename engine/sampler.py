"""Turning logits into tokens: greedy, temperature, top-k, top-p, per-request seeds."""
from __future__ import annotations

import torch

from engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...],
           default_generator: torch.Generator) -> torch.Tensor:
    """logits: [N, V] float32, one row per sequence that samples this step -> [N] int64 token ids,
    on the logits' device; nothing here waits for the device.

    Each seeded request draws from its own generator, so its tokens do not depend on what
    else shares the batch. Before min_tokens are out, EOS and stop_token_ids are masked.
    """
    cloned = False
    for row, seq in enumerate(seqs):
        p = seq.params
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
    return tokens


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
