"""Non-finite logits at run time, through one real tritonserver on the demo model: an adapter
that every load check passes and that overflows float32 on one character
(tests/helpers.py write_overflowing_adapter) is asked for in the middle of a batch of requests
on the base model and the demo adapters.

Its request gets one FINAL INVALID_ARG that names the adapter and says it is quarantined; the
others are token-identical to the same batch without it; later requests on the adapter, with
any prompt, are refused with a message that says why and how to clear it. The model stays
READY and the running, waiting and KV-page gauges return to baseline.
"""
from __future__ import annotations

import json
import shutil

import pytest

from e2e_helpers import (MODEL, ROOT, StreamClient, copy_model_repository, metric_value, read_metrics, start_server,
                         wait_for_metric)
from fault_helpers import failure_counts, failure_deltas, is_ready, settled_baseline, wait_for_idle
from helpers import write_overflowing_adapter

pytestmark = pytest.mark.e2e

GREEDY = {"max_tokens": 12, "temperature": 0}
SEEDED = {"max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 11}
ONE = {"max_tokens": 1, "temperature": 0}  # on the overflowing adapter: its outputs are no echoes
# request id: (prompt, adapter, sampling parameters)
BATCH = {"base": ("hello world", None, GREEDY), "upper": ("abc12", "upper", GREEDY),
         "reverse": ("xyz q", "reverse", SEEDED), "overflow_clean": ("abc", "overflow", ONE),
         "rot13": ("pqrs", "rot13", GREEDY), "upper_seeded": ("k9", "upper", SEEDED)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("fault_non_finite")
    lora_root = base / "lora_root"
    lora_root.mkdir()
    token = write_overflowing_adapter(str(lora_root / "overflow"), str(ROOT / "demo" / "base"))
    for name in ("upper", "reverse", "rot13"):
        shutil.copytree(ROOT / "demo" / "adapters" / name, lora_root / name)
    engine_json = json.loads((ROOT / "model_repository" / "multilora" / "1" / "engine.json").read_text())
    engine_json.update(model=str(ROOT / "demo" / "base"), lora_roots=[str(lora_root)], dtype="float32",
                       max_num_seqs=16)
    repository = copy_model_repository(base / "repository", engine_json)
    (repository / "multilora" / "1" / "multi_lora.json").write_text("{}")
    server = start_server(repository, ready_timeout=180.0, log_file=base / "tritonserver.log")
    server.trigger = chr(token - 5 + 32)  # demo ids: printable ASCII chr(32..126) = 5..99
    try:
        server.clean = run_batch(server, BATCH)  # loads every adapter, so the next batch runs as one
        assert all(r.error is None and r.output_ids for r in server.clean.values()), server.clean
        server.baseline = settled_baseline(server.metrics_url)
        yield server
        assert is_ready(server.http_url)
        wait_for_idle(server.metrics_url, server.baseline)
    finally:
        server.stop()


def run_batch(server, batch: dict) -> dict:
    """Every request sent at once on one stream (non-streaming: one response each)."""
    with StreamClient(server.grpc_url) as client:
        for request_id, (prompt, adapter, sampling) in batch.items():
            client.send(request_id, text=prompt, lora_name=adapter, sampling=sampling, stream=False,
                        exclude_input_in_output=True)
        got = client.collect(list(batch), quiet_s=0.1)
    for request_id, responses in got.items():
        assert len(responses) == 1 and responses[0].final, (request_id, responses)
    return {request_id: responses[0] for request_id, responses in got.items()}


def gauge(server, name: str) -> float:
    return metric_value(read_metrics(server.metrics_url), name, model=MODEL)


def test_request_with_non_finite_logits_fails_alone_and_its_adapter_is_quarantined(server):
    before = failure_counts(server.metrics_url)
    non_finite_before = gauge(server, "multilora_non_finite_requests_total")
    batch = dict(BATCH)
    batch["overflow_bad"] = (f"a{server.trigger}c", "overflow", GREEDY)
    got = run_batch(server, batch)
    bad = got.pop("overflow_bad")
    assert bad.error is not None and not bad.output_ids, bad
    for words in ("LoRA adapter 'overflow'", "non-finite logits", "quarantined"):
        assert words in bad.error, (words, bad.error)
    assert str(ROOT) not in bad.error
    assert {k: (r.error, r.output_ids, r.text) for k, r in got.items()} == \
        {k: (r.error, r.output_ids, r.text) for k, r in server.clean.items()}
    assert failure_deltas(before, failure_counts(server.metrics_url)) == {"invalid_arg": 1}
    # the engine's counters reach the metrics with its stats (every 0.1 s)
    wait_for_metric(server.metrics_url, "multilora_non_finite_requests_total", lambda v: v == non_finite_before + 1)
    assert is_ready(server.http_url)
    wait_for_idle(server.metrics_url, server.baseline)

    # the adapter is refused from now on, with a prompt it served before too; the rest is served
    before = failure_counts(server.metrics_url)
    later = run_batch(server, {"again": ("abc", "overflow", ONE), "base_after": BATCH["base"]})
    message = later["again"].error
    assert message is not None and not later["again"].output_ids
    for words in ("LoRA adapter 'overflow' is quarantined", "non-finite logits", "reloaded", "restarted"):
        assert words in message, (words, message)
    assert later["base_after"].output_ids == server.clean["base"].output_ids
    assert failure_deltas(before, failure_counts(server.metrics_url)) == {"invalid_arg": 1}
    wait_for_metric(server.metrics_url, "multilora_adapters_quarantined", lambda v: v == 1)
    wait_for_idle(server.metrics_url, server.baseline)
