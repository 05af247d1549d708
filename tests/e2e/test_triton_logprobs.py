"""Log probabilities through a real tritonserver, as Triton's vLLM backend returns them: inputs
``return_logprobs`` and ``return_cumulative_logprob``, sampling_parameters ``logprobs: k``; outputs
``logprobs`` (a JSON list, one object per token of the response: {"<token id>": {"logprob",
"rank", "decoded_token"}}, or null without sampling_parameters logprobs) and
``cumulative_logprob`` (FP32, the whole output so far).

The server (fixture ``llm_server``) runs the real engine on the embedded demo model: ``upper``
upper-cases the prompt, then EOS.
"""
from __future__ import annotations

import json
import math
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from e2e_helpers import MODEL, generate, metric_value, read_metrics

pytestmark = pytest.mark.e2e

PROMPT = "hello world"
TIMEOUT_S = 60.0


def stream_infer(url: str, sampling: dict | str | None, stream: bool = True, **bool_inputs: bool) -> list:
    """Responses (tritonclient InferResult) of one request through a gRPC stream, FINAL last."""
    inputs = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("lora_name", [1], "BYTES"),
              grpcclient.InferInput("stream", [1], "BOOL")]
    inputs[0].set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))
    inputs[1].set_data_from_numpy(np.array([b"upper"], dtype=np.object_))
    inputs[2].set_data_from_numpy(np.array([stream]))
    if sampling is not None:
        inputs.append(grpcclient.InferInput("sampling_parameters", [1], "BYTES"))
        text = sampling if isinstance(sampling, str) else json.dumps(sampling)
        inputs[-1].set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    for name, value in bool_inputs.items():
        inputs.append(grpcclient.InferInput(name, [1], "BOOL"))
        inputs[-1].set_data_from_numpy(np.array([value]))
    results: queue.Queue = queue.Queue()
    responses = []
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(MODEL, inputs, request_id="lp", enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=TIMEOUT_S)
            if error is not None:
                client.stop_stream()
                raise error
            final = result.get_response().parameters["triton_final_response"].bool_param
            if result.get_response().outputs or not final:
                responses.append(result)
            if final:
                break
        client.stop_stream()
    return responses


def parse_logprobs(result) -> list | None:
    (text,) = result.as_numpy("logprobs")
    return json.loads(text.decode())


def check_positions(positions: list, k: int) -> list[tuple[int, float, str]]:
    """The vLLM layout; returns (token id, logprob, decoded_token) of each rank-1 (sampled, greedy) token."""
    sampled = []
    for entry in positions:
        assert isinstance(entry, dict) and k <= len(entry) <= k + 1, entry
        assert all(isinstance(token_id, str) and token_id.isdigit() for token_id in entry)
        for value in entry.values():
            assert set(value) == {"logprob", "rank", "decoded_token"}
            assert isinstance(value["logprob"], float) and value["logprob"] <= 0
            assert isinstance(value["rank"], int) and value["rank"] >= 1
            assert isinstance(value["decoded_token"], str)
        by_rank = sorted(entry.items(), key=lambda item: item[1]["rank"])
        assert [v["rank"] for _, v in by_rank] == list(range(1, len(entry) + 1))
        assert all(a[1]["logprob"] >= b[1]["logprob"] for a, b in zip(by_rank, by_rank[1:]))
        assert sum(math.exp(v["logprob"]) for v in entry.values()) <= 1 + 1e-5
        token_id, first = next(iter(entry.items()))  # the sampled token first
        assert first["rank"] == 1  # greedy
        sampled.append((int(token_id), first["logprob"], first["decoded_token"]))
    return sampled


def test_streamed_logprobs_per_response_and_cumulative(llm_server):
    responses = stream_infer(llm_server.grpc_url, {"temperature": 0, "max_tokens": 8, "logprobs": 3},
                             return_logprobs=True, return_cumulative_logprob=True, return_num_output_tokens=True)
    assert len(responses) >= 2  # streamed
    total, texts, cumulative = 0.0, [], []
    for result in responses:
        positions = parse_logprobs(result)
        assert len(positions) == int(result.as_numpy("num_output_tokens")[0])  # this response's tokens only
        sampled = check_positions(positions, 3)
        assert [t for t, _, _ in sampled] == result.as_numpy("output_ids").tolist()
        assert "".join(text for _, _, text in sampled) == result.as_numpy("text_output")[0].decode()
        total += sum(lp for _, lp, _ in sampled)
        (value,) = result.as_numpy("cumulative_logprob")
        assert result.as_numpy("cumulative_logprob").dtype == np.float32
        assert value == pytest.approx(total, abs=1e-5)  # the whole output so far
        cumulative.append(float(value))
        texts.append(result.as_numpy("text_output")[0].decode())
    assert "".join(texts) == "HELLO WO"  # max_tokens=8: ends by length
    assert cumulative == sorted(cumulative, reverse=True)


def test_one_response_when_not_streaming_equals_the_streamed_ones(llm_server):
    sampling = {"temperature": 0, "max_tokens": 32, "logprobs": 2}
    streamed = stream_infer(llm_server.grpc_url, sampling, return_logprobs=True, return_cumulative_logprob=True)
    (whole,) = stream_infer(llm_server.grpc_url, sampling, stream=False, exclude_input_in_output=True,
                            return_logprobs=True, return_cumulative_logprob=True)
    joined = [entry for result in streamed for entry in parse_logprobs(result)]
    assert parse_logprobs(whole) == joined
    sampled = check_positions(joined, 2)
    assert len(sampled) == len(whole.as_numpy("output_ids")) == len("HELLO WORLD") + 1  # and EOS
    assert whole.as_numpy("cumulative_logprob")[0] == streamed[-1].as_numpy("cumulative_logprob")[0]
    assert whole.as_numpy("cumulative_logprob")[0] == pytest.approx(sum(lp for _, lp, _ in sampled), abs=1e-5)


def test_http_generate_with_string_values_as_genai_perf_sends_them(llm_server):
    status, body = generate(llm_server.http_url, {
        "text_input": PROMPT, "lora_name": "upper", "return_logprobs": True, "return_cumulative_logprob": True,
        "sampling_parameters": json.dumps({"temperature": "0", "max_tokens": "6", "logprobs": "4"})})
    assert status == 200, body
    positions = json.loads(body["logprobs"])
    sampled = check_positions(positions, 4)
    assert "".join(text for _, _, text in sampled) == "HELLO "
    assert body["cumulative_logprob"] == pytest.approx(sum(lp for _, lp, _ in sampled), abs=1e-5)


def test_without_sampling_logprobs_the_output_is_null_and_the_sum_still_comes(llm_server):
    responses = stream_infer(llm_server.grpc_url, {"temperature": 0, "max_tokens": 32},
                             return_logprobs=True, return_cumulative_logprob=True)
    assert all(parse_logprobs(result) is None for result in responses)
    with_logprobs = stream_infer(llm_server.grpc_url, {"temperature": 0, "max_tokens": 32, "logprobs": 0},
                                 return_cumulative_logprob=True)
    assert responses[-1].as_numpy("cumulative_logprob")[0] == with_logprobs[-1].as_numpy("cumulative_logprob")[0] < 0


def test_outputs_only_when_asked(llm_server):
    responses = stream_infer(llm_server.grpc_url, {"temperature": 0, "max_tokens": 32, "logprobs": 5})
    assert responses
    assert all(r.as_numpy("logprobs") is None and r.as_numpy("cumulative_logprob") is None for r in responses)
    assert "".join(r.as_numpy("text_output")[0].decode() for r in responses) == "HELLO WORLD"


@pytest.mark.parametrize("value", [21, -1, "many", True])
def test_invalid_logprobs_is_invalid_arg_naming_the_field(llm_server, value):
    before = read_metrics(llm_server.metrics_url)
    with pytest.raises(Exception) as caught:
        stream_infer(llm_server.grpc_url, {"max_tokens": 4, "logprobs": value}, return_logprobs=True)
    assert "logprobs" in str(caught.value), caught.value
    status, reply = generate(llm_server.http_url, {
        "text_input": PROMPT, "return_logprobs": True,
        "sampling_parameters": json.dumps({"max_tokens": 4, "logprobs": value})})
    assert status == 400 and "sampling_parameters" in reply["error"] and "logprobs" in reply["error"], reply
    after = read_metrics(llm_server.metrics_url)
    delta = metric_value(after, "multilora_request_failure_total", reason="invalid_arg") \
        - metric_value(before, "multilora_request_failure_total", reason="invalid_arg")
    assert delta == 2
