"""S-LoRA's synthetic workload (bench/serving_workload.py) and the serving run's summary figures."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench.serving_workload import (RequestRecord, WorkloadRequest, generate_workload,  # noqa: E402
                                    power_law_probs, summarize, window_token_throughputs)

NAMES = [f"a{i}" for i in range(2000)]


def workload(**overrides):
    args = dict(num_adapters=5, alpha=1.0, rate=20.0, cv=1.0, duration_s=500.0, adapter_names=NAMES,
                vocab_size=1000, seed=3)
    args.update(overrides)
    return generate_workload(**args)


def test_power_law_probs():
    probs = power_law_probs(4, 0.5)
    assert probs.sum() == pytest.approx(1.0)
    assert probs.tolist() == pytest.approx([0.5, 0.5 ** 0.5 - 0.5, 0.75 ** 0.5 - 0.5 ** 0.5, 1 - 0.75 ** 0.5])
    assert np.all(np.diff(probs) < 0)  # alpha < 1: the first adapters are the popular ones
    assert power_law_probs(7, 1.0).tolist() == pytest.approx([1 / 7] * 7)


@pytest.mark.parametrize("num_adapters,alpha", [(5, 1.0), (5, 0.3), (100, 0.5)])
def test_adapter_counts_follow_the_power_law(num_adapters, alpha):
    reqs = workload(num_adapters=num_adapters, alpha=alpha)
    counts = np.bincount([int(r.adapter[1:]) for r in reqs], minlength=num_adapters)
    assert len(counts) == num_adapters  # only the first n names are used
    expected = power_law_probs(num_adapters, alpha) * len(reqs)
    # chi-square statistic within a generous bound of its mean (the degrees of freedom)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 3 * num_adapters + 20, (counts, expected)


@pytest.mark.parametrize("cv", [1.0, 0.5, 2.0])
def test_gamma_gaps_mean_and_cv(cv):
    rate = 20.0
    reqs = workload(cv=cv, rate=rate, duration_s=1000.0)
    assert len(reqs) == 20000
    gaps = np.diff([0.0] + [r.arrival_s for r in reqs])
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.07)


def test_lengths_and_prompts_in_range():
    reqs = workload(input_range=(8, 512), output_range=(8, 512))
    inputs = np.array([r.input_len for r in reqs])
    outputs = np.array([r.output_len for r in reqs])
    assert inputs.min() >= 8 and inputs.max() < 512 and outputs.min() >= 8 and outputs.max() < 512
    assert inputs.min() < 20 and inputs.max() > 500  # spread over the whole range
    assert abs(outputs.mean() - 259.5) < 6
    for r in reqs[:50]:
        assert len(r.prompt_ids) == r.input_len
        assert min(r.prompt_ids) >= 3 and max(r.prompt_ids) < 1000


def test_deterministic_by_seed():
    assert workload(seed=7) == workload(seed=7)
    a, b = workload(seed=7), workload(seed=8)
    assert [r.adapter for r in a] != [r.adapter for r in b]
    assert [r.arrival_s for r in a] != [r.arrival_s for r in b]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        workload(num_adapters=3000)
    with pytest.raises(ValueError):
        workload(input_range=(8, 8))
    with pytest.raises(ValueError):
        workload(cv=0)


def _record(sent, chunks, finished=True, output_len=4, input_len=10, error=None):
    req = WorkloadRequest(0, 0.0, "a0", input_len, output_len, (3,) * input_len)
    return RequestRecord(req, sent=sent, chunks=list(chunks), num_responses=len(chunks), finished=finished,
                         error=error)


def test_summary_figures():
    records = [
        # first token after 0.5 s, then 3 tokens coalesced 0.3 s later: ITL 0.1 x 3
        _record(1.0, [(1.5, 1), (1.8, 3)]),
        # first token after 7 s: misses the 6 s SLO
        _record(2.0, [(9.0, 1), (9.2, 1)], finished=False),
        # sent within 6 s of the end: not judged for the SLO
        _record(8.0, [], finished=False),
        _record(3.0, [], finished=False, error="boom"),
    ]
    s = summarize(records, start=0.0, end=10.0)
    assert s["num_finished"] == 1 and s["num_errors"] == 1 and s["first_errors"] == ["boom"]
    assert s["request_throughput"] == pytest.approx(0.1)
    assert s["token_throughput"] == pytest.approx(0.6)  # 6 tokens over 10 s
    assert s["prompt_token_throughput"] == pytest.approx(1.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(3750.0)  # median of 0.5 s and 7 s
    assert s["itl_ms"]["p50"] == pytest.approx(100.0)
    assert s["itl_ms"]["p99"] == pytest.approx(197.0)  # values 100, 100, 100, 200 (interpolated)
    # judged: the two with a first token, and the fourth (no token, but waited 7 s >= 6 s);
    # not the third (no token yet, sent 2 s before the end). Only the first met it.
    assert s["slo_attainment"] == pytest.approx(1 / 3)
    # a request with its first token is judged however late it was sent
    late = summarize([_record(9.5, [(9.6, 1)])], start=0.0, end=10.0)
    assert late["slo_attainment"] == 1.0
    assert s["responses_per_token"] == pytest.approx(4 / 6)


def test_window_token_throughputs():
    records = [_record(0.0, [(1.0, 10), (5.9, 2), (6.0, 6), (11.5, 3)]), _record(1.0, [(2.0, 4), (12.5, 100)])]
    # windows [0, 6), [6, 12), [12, 13): 16 tokens, 9 tokens, none (12.5 is past the end)
    assert window_token_throughputs(records, 0.0, 12.5, 6.0) == pytest.approx([16 / 6, 9 / 6, 0.0])
    assert window_token_throughputs(records, 0.0, 12.0, 6.0) == pytest.approx([16 / 6, 9 / 6])
