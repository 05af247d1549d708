"""The multilora model through a real tritonserver: every client path, many adapters in one
stream, cancellation, bad input, metrics.

The server (fixture ``llm_server``) runs the real engine on the embedded demo model.

Demo model: the base model echoes the prompt, ``upper`` upper-cases it, ``reverse`` reverses
it, ``rot13`` rotates its letters; then EOS.
"""
from __future__ import annotations

import codecs
import json
import queue
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from e2e_helpers import (MODEL, ROOT, StreamClient, generate, metric_value, read_metrics,
                         wait_for_metric)

pytestmark = pytest.mark.e2e

PROMPT = "hello world"
EXPECTED = {"": "hello world", "upper": "HELLO WORLD", "reverse": "dlrow olleh",
            "rot13": "uryyb jbeyq"}
SAMPLING = {"max_tokens": 32, "temperature": 0}
TIMEOUT_S = 60.0


def expected_for(adapter: str, prompt: str) -> str:
    return {"": prompt, "upper": prompt.upper(), "reverse": prompt[::-1],
            "rot13": codecs.encode(prompt, "rot13")}[adapter]


def only_final_last(responses) -> None:
    """Exactly one FINAL response, and it is the last one."""
    finals = [i for i, r in enumerate(responses) if r.final]
    assert finals == [len(responses) - 1], [(r.final, r.error, r.text) for r in responses]


def assert_idle(server) -> None:
    """No request running or waiting, and the engine's KV blocks back to what it keeps idle."""
    wait_for_metric(server.metrics_url, "multilora_num_requests_running", lambda v: v == 0)
    wait_for_metric(server.metrics_url, "multilora_num_requests_waiting", lambda v: v == 0)


def prompt_token_ids(server, text: str) -> list[int]:
    """Token ids the engine makes of ``text``."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "demo" / "base"))
    return list(tokenizer(text)["input_ids"])


def test_model_config_is_decoupled_and_vllm_compatible(llm_server):
    with urllib.request.urlopen(f"{llm_server.http_url}/v2/models/{MODEL}/config") as reply:
        config = json.loads(reply.read())
    assert config["model_transaction_policy"]["decoupled"] is True
    assert config["max_batch_size"] == 0
    inputs = {i["name"]: (i["data_type"], i["dims"], i.get("optional")) for i in config["input"]}
    assert inputs["text_input"] == ("TYPE_STRING", [1], True)
    assert inputs["input_ids"] == ("TYPE_INT32", [-1], True)
    assert inputs["lora_name"] == ("TYPE_STRING", [1], True)
    for name in ("stream", "exclude_input_in_output", "return_finish_reason",
                 "return_num_input_tokens", "return_num_output_tokens", "return_logprobs",
                 "return_cumulative_logprob"):
        assert inputs[name] == ("TYPE_BOOL", [1], True)
    outputs = {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]}
    assert outputs == {"text_output": ("TYPE_STRING", [-1]), "output_ids": ("TYPE_INT32", [-1]),
                       "finish_reason": ("TYPE_STRING", [-1]),
                       "num_input_tokens": ("TYPE_UINT32", [1]),
                       "num_output_tokens": ("TYPE_UINT32", [-1]),
                       "logprobs": ("TYPE_STRING", [-1]), "cumulative_logprob": ("TYPE_FP32", [-1])}


@pytest.mark.parametrize("adapter", list(EXPECTED))
def test_grpc_stream_per_adapter(llm_server, adapter):
    with StreamClient(llm_server.grpc_url) as client:
        client.send("s", text=PROMPT, lora_name=adapter, sampling=SAMPLING,
                    return_finish_reason=True, return_num_output_tokens=True)
        responses = client.collect(["s"], timeout=TIMEOUT_S)["s"]
    only_final_last(responses)
    assert all(r.error is None for r in responses)
    assert "".join(r.text for r in responses) == EXPECTED[adapter]
    assert responses[-1].outputs["finish_reason"] == ["stop"]
    assert all(r.outputs["finish_reason"] == [""] for r in responses[:-1])
    for r in responses:  # num_output_tokens counts the tokens of each response
        assert r.outputs["num_output_tokens"] == [len(r.output_ids)]


@pytest.mark.parametrize("adapter", list(EXPECTED))
def test_grpc_non_streaming_per_adapter(llm_server, adapter):
    with StreamClient(llm_server.grpc_url) as client:
        client.send("x", text=PROMPT, lora_name=adapter, stream=False, sampling=SAMPLING,
                    exclude_input_in_output=True, return_num_input_tokens=True,
                    return_num_output_tokens=True, return_finish_reason=True)
        client.send("p", text=PROMPT, lora_name=adapter, stream=False, sampling=SAMPLING)
        got = client.collect(["x", "p"], timeout=TIMEOUT_S)
    (excluded,), (prepended,) = got["x"], got["p"]  # exactly one response each
    assert excluded.final and prepended.final
    assert excluded.text == EXPECTED[adapter]
    assert prepended.text == PROMPT + EXPECTED[adapter]  # exclude_input_in_output defaults to false
    assert excluded.outputs["finish_reason"] == ["stop"]
    assert excluded.outputs["num_output_tokens"] == [len(excluded.output_ids)]
    assert excluded.outputs["num_input_tokens"][0] >= len(PROMPT.split())
    assert prepended.output_ids == excluded.output_ids


@pytest.mark.parametrize("adapter", list(EXPECTED))
def test_http_generate_per_adapter(llm_server, adapter):
    status, body = generate(llm_server.http_url, {
        "text_input": PROMPT, "lora_name": adapter, "sampling_parameters": json.dumps(SAMPLING),
        "exclude_input_in_output": True, "return_finish_reason": True})
    assert status == 200, body
    assert body["text_output"] == EXPECTED[adapter]
    assert body["finish_reason"] == "stop"
    # vLLM-backend style: sampling parameters as request parameters, prompt prepended by default
    status, body = generate(llm_server.http_url, {
        "text_input": PROMPT, "parameters": {"lora_name": adapter, **SAMPLING}})
    assert status == 200, body
    assert body["text_output"] == PROMPT + EXPECTED[adapter]


@pytest.mark.parametrize("adapter", list(EXPECTED))
def test_http_generate_stream_per_adapter(llm_server, adapter):
    status, events = generate(llm_server.http_url, {
        "text_input": PROMPT, "lora_name": adapter, "stream": True,
        "sampling_parameters": json.dumps(SAMPLING)}, stream=True)
    assert status == 200, events
    assert events and all("error" not in e for e in events)
    assert "".join(e["text_output"] for e in events) == EXPECTED[adapter]


def test_input_ids_give_the_same_answer_as_text(llm_server):
    ids = prompt_token_ids(llm_server, PROMPT)
    with StreamClient(llm_server.grpc_url) as client:
        client.send("ids", input_ids=ids, lora_name="upper", stream=False, sampling=SAMPLING,
                    return_num_input_tokens=True)
        client.send("text", text=PROMPT, lora_name="upper", stream=False, sampling=SAMPLING,
                    exclude_input_in_output=True, return_num_input_tokens=True)
        got = client.collect(["ids", "text"], timeout=TIMEOUT_S)
    (by_ids,), (by_text,) = got["ids"], got["text"]
    assert by_ids.text == by_text.text == EXPECTED["upper"]  # no prompt text to prepend
    assert by_ids.output_ids == by_text.output_ids
    assert by_ids.outputs["num_input_tokens"] == [len(ids)] == by_text.outputs["num_input_tokens"]


def test_adapter_resolution_order(llm_server):
    """lora_name input, then sampling_parameters.lora_name, then the request parameter."""
    with StreamClient(llm_server.grpc_url) as client:
        client.send("tensor", text=PROMPT, lora_name="upper", stream=False,
                    sampling={**SAMPLING, "lora_name": "reverse"}, parameters={"lora_name": "rot13"},
                    exclude_input_in_output=True)
        client.send("sampling", text=PROMPT, stream=False, sampling={**SAMPLING, "lora_name": "reverse"},
                    parameters={"lora_name": "rot13"}, exclude_input_in_output=True)
        client.send("parameter", text=PROMPT, stream=False, sampling=SAMPLING,
                    parameters={"lora_name": "rot13"}, exclude_input_in_output=True)
        client.send("empty", text=PROMPT, lora_name="  ", stream=False, sampling=SAMPLING,
                    exclude_input_in_output=True)
        got = client.collect(["tensor", "sampling", "parameter", "empty"], timeout=TIMEOUT_S)
    assert got["tensor"][0].text == EXPECTED["upper"]
    assert got["sampling"][0].text == EXPECTED["reverse"]
    assert got["parameter"][0].text == EXPECTED["rot13"]
    assert got["empty"][0].text == EXPECTED[""]


def test_string_valued_sampling_parameters_as_genai_perf_sends_them(llm_server):
    status, body = generate(llm_server.http_url, {
        "text_input": PROMPT, "lora_name": "reverse", "exclude_input_in_output": True,
        "sampling_parameters": json.dumps({"max_tokens": "32", "temperature": "0",
                                           "ignore_eos": "false"})})
    assert status == 200, body
    assert body["text_output"] == EXPECTED["reverse"]


def test_32_concurrent_requests_over_all_adapters_in_one_stream(llm_server):
    adapters = list(EXPECTED)
    prompts = {f"r{i}": (adapters[i % 4], f"req {i} {'abcdefgh'[i % 8] * (1 + i % 5)}")
               for i in range(32)}
    with StreamClient(llm_server.grpc_url) as client:
        for request_id, (adapter, prompt) in prompts.items():
            client.send(request_id, text=prompt, lora_name=adapter, sampling=SAMPLING,
                        stream=int(request_id[1:]) % 3 != 0, exclude_input_in_output=True)
        got = client.collect(list(prompts), timeout=120.0, quiet_s=0.5)
    assert set(got) == set(prompts)  # nothing for unknown ids
    for request_id, (adapter, prompt) in prompts.items():
        responses = got[request_id]
        only_final_last(responses)
        assert all(r.error is None for r in responses), responses[-1].error
        if int(request_id[1:]) % 3 == 0:
            assert len(responses) == 1
        assert "".join(r.text for r in responses) == expected_for(adapter, prompt), request_id
    assert_idle(llm_server)


def test_cancellation_mid_stream_frees_the_kv_blocks(llm_server):
    assert_idle(llm_server)
    metrics = read_metrics(llm_server.metrics_url)
    blocks_idle = metric_value(metrics, "multilora_kv_blocks_used", model=MODEL)
    cancelled_before = metric_value(metrics, "multilora_request_failure_total", reason="cancelled")
    success_before = metric_value(metrics, "multilora_request_success_total")
    num_requests = 4
    for max_tokens in (4096, 2048, 1024, 512, 256, 128, 64):  # the longest the context allows
        results: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(llm_server.grpc_url)
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for i in range(num_requests):
            text = grpcclient.InferInput("text_input", [1], "BYTES")
            text.set_data_from_numpy(np.array([b"abc"], dtype=np.object_))
            lora = grpcclient.InferInput("lora_name", [1], "BYTES")
            lora.set_data_from_numpy(np.array([list(EXPECTED)[i].encode()], dtype=np.object_))
            stream = grpcclient.InferInput("stream", [1], "BOOL")
            stream.set_data_from_numpy(np.array([True]))
            params = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
            params.set_data_from_numpy(np.array([json.dumps(
                {"max_tokens": max_tokens, "ignore_eos": True}).encode()], dtype=np.object_))
            client.async_stream_infer(MODEL, [text, lora, stream, params], request_id=str(i))
        result, error = results.get(timeout=TIMEOUT_S)
        if error is None:
            break  # tokens are streaming: cancel mid-stream
        assert "max_tokens" in error.message() or "max_model_len" in error.message(), error
        client.stop_stream()
        client.close()
    else:
        pytest.fail("no max_tokens >= 64 was accepted")
    wait_for_metric(llm_server.metrics_url, "multilora_kv_blocks_used", lambda v: v > blocks_idle)
    client.stop_stream(cancel_requests=True)
    client.close()
    assert_idle(llm_server)
    wait_for_metric(llm_server.metrics_url, "multilora_kv_blocks_used", lambda v: v == blocks_idle)
    metrics = read_metrics(llm_server.metrics_url)
    cancelled = metric_value(metrics, "multilora_request_failure_total", reason="cancelled") \
        - cancelled_before
    succeeded = metric_value(metrics, "multilora_request_success_total") - success_before
    assert cancelled >= 1 and cancelled + succeeded == num_requests
    # still serving
    status, body = generate(llm_server.http_url, {
        "text_input": PROMPT, "lora_name": "rot13", "exclude_input_in_output": True,
        "sampling_parameters": json.dumps(SAMPLING)})
    assert (status, body["text_output"]) == (200, EXPECTED["rot13"])


BAD_INPUTS = {
    # name: (send() arguments, metrics reason of the Triton code, words the message must hold)
    "unknown_adapter": (dict(lora_name="no_such_adapter"), "not_found", ["no_such_adapter"]),
    "malformed_json": (dict(sampling='{"max_tokens": 8,'), "invalid_arg", ["sampling_parameters"]),
    "not_an_object": (dict(sampling="[1, 2]"), "invalid_arg", ["sampling_parameters"]),
    "unknown_key": (dict(sampling={"max_tokens": 8, "bogus_key": 1}), "invalid_arg", ["bogus_key"]),
    "negative_temperature": (dict(sampling={"temperature": -0.5}), "invalid_arg", ["temperature"]),
    "top_p_zero": (dict(sampling={"top_p": 0}), "invalid_arg", ["top_p"]),
    "top_p_above_one": (dict(sampling={"top_p": 1.5}), "invalid_arg", ["top_p"]),
    "max_tokens_zero": (dict(sampling={"max_tokens": 0}), "invalid_arg", ["max_tokens"]),
    "max_tokens_not_int": (dict(sampling={"max_tokens": "many"}), "invalid_arg", ["max_tokens"]),
    "max_tokens_beyond_context": (dict(sampling={"max_tokens": 10_000_000}), "invalid_arg",
                                  ["max_tokens"]),
    "prompt_longer_than_context": (dict(text="a" * 40_000, sampling={"max_tokens": 1}),
                                   "invalid_arg", ["prompt"]),
    "both_inputs": (dict(input_ids=[1, 2, 3]), "invalid_arg", ["text_input", "input_ids"]),
    "neither_input": (dict(text=None), "invalid_arg", ["text_input", "input_ids"]),
    "adapter_with_slash": (dict(lora_name="adapters/upper"), "invalid_arg", ["lora_name"]),
    "adapter_with_dotdot": (dict(lora_name="..upper"), "invalid_arg", ["lora_name"]),
    "adapter_path_in_sampling": (dict(sampling={"lora_name": "../upper"}), "invalid_arg",
                                 ["lora_name"]),
    "adapter_not_a_string": (dict(sampling={"lora_name": 7}), "invalid_arg", ["lora_name"]),
    # at their limits (each was INTERNAL, pad tokens or unbounded work once)
    "seed_beyond_int64": (dict(sampling={"max_tokens": 4, "seed": 2 ** 64}), "invalid_arg", ["seed"]),
    "temperature_nan": (dict(sampling={"max_tokens": 4, "temperature": "nan"}), "invalid_arg", ["temperature"]),
    "top_p_nan": (dict(sampling={"max_tokens": 4, "top_p": "nan"}), "invalid_arg", ["top_p"]),
    "stop_token_id_beyond_vocabulary": (dict(sampling={"max_tokens": 4, "min_tokens": 2, "stop_token_ids": [10 ** 6]}),
                                        "invalid_arg", ["stop_token_ids"]),
    "too_many_stop_strings": (dict(sampling={"max_tokens": 4, "stop": [str(i) for i in range(17)]}), "invalid_arg",
                              ["stop"]),
    "nested_too_deeply": (dict(sampling='{"stop": ' + "[" * 10_000 + "]" * 10_000 + "}"), "invalid_arg",
                          ["sampling_parameters", "nested too deeply"]),
    "one_mib_prompt": (dict(text="a" * (1 << 20), sampling={"max_tokens": 1}), "invalid_arg", ["text_input"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(llm_server, case):
    arguments, reason, words = BAD_INPUTS[case]
    arguments = {"text": PROMPT, **arguments}
    before = read_metrics(llm_server.metrics_url)
    with StreamClient(llm_server.grpc_url) as client:
        client.send("bad", stream=True, **arguments)
        client.send("good", text=PROMPT, lora_name="upper", stream=False, sampling=SAMPLING,
                    exclude_input_in_output=True)
        got = client.collect(["bad", "good"], timeout=TIMEOUT_S)
    (bad,) = got["bad"]  # exactly one response: the error, flagged FINAL
    assert bad.final and bad.error, bad
    for word in words:
        assert word in bad.error.lower() or word in bad.error, bad.error
    # the same through /generate (HTTP answers every model error with 400)
    body = {"text_input": arguments["text"]} if arguments["text"] is not None else {}
    if arguments.get("lora_name") is not None:
        body["lora_name"] = arguments["lora_name"]
    if arguments.get("input_ids") is not None:
        body["input_ids"] = arguments["input_ids"]
    if arguments.get("sampling") is not None:
        sampling = arguments["sampling"]
        body["sampling_parameters"] = sampling if isinstance(sampling, str) else json.dumps(sampling)
    status, reply = generate(llm_server.http_url, body)
    assert status == 400, reply
    assert words[0] in reply["error"] or words[0] in reply["error"].lower(), reply
    # the Triton error code, read back through the model's reason-labelled failure counter
    after = read_metrics(llm_server.metrics_url)
    for label in ("not_found", "invalid_arg", "unavailable", "cancelled", "internal"):
        delta = metric_value(after, "multilora_request_failure_total", reason=label) \
            - metric_value(before, "multilora_request_failure_total", reason=label)
        assert delta == (2 if label == reason else 0), (label, delta)
    # the model stays ready and keeps answering
    assert got["good"][0].text == EXPECTED["upper"]
    with urllib.request.urlopen(f"{llm_server.http_url}/v2/models/{MODEL}/ready") as reply:
        assert reply.status == 200


def test_metrics_move_by_exact_amounts(llm_server):
    assert_idle(llm_server)
    before = read_metrics(llm_server.metrics_url)
    with StreamClient(llm_server.grpc_url) as client:
        for adapter in EXPECTED:
            client.send(adapter or "base", text=PROMPT, lora_name=adapter, stream=adapter != "",
                        sampling=SAMPLING, return_num_input_tokens=True)
        client.send("missing", text=PROMPT, lora_name="no_such_adapter")
        client.send("bad_json", text=PROMPT, sampling="{")
        got = client.collect(["base", "upper", "reverse", "rot13", "missing", "bad_json"],
                             timeout=TIMEOUT_S)
    good = [got[k] for k in ("base", "upper", "reverse", "rot13")]
    prompt_tokens = sum(rs[0].outputs["num_input_tokens"][0] for rs in good)
    generated = sum(len(r.output_ids) for rs in good for r in rs)
    after = read_metrics(llm_server.metrics_url)  # counters are written before each FINAL

    def delta(name, **labels):
        return metric_value(after, name, model=MODEL, **labels) \
            - metric_value(before, name, model=MODEL, **labels)

    assert delta("multilora_request_success_total") == 4
    assert delta("multilora_request_failure_total") == 2
    assert delta("multilora_request_failure_total", reason="not_found") == 1
    assert delta("multilora_request_failure_total", reason="invalid_arg") == 1
    assert delta("multilora_prompt_tokens_total") == prompt_tokens > 0
    assert delta("multilora_generation_tokens_total") == generated > 0
    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:generation_tokens_total") == generated
    assert delta("multilora_time_to_first_token_seconds_count") == 4
    # one inter-token latency per streaming request that got more than one response with tokens
    streamed = [rs for k, rs in got.items() if k in ("upper", "reverse", "rot13")]
    assert all(sum(1 for r in rs if r.output_ids) > 1 for rs in streamed)
    assert delta("multilora_inter_token_latency_seconds_count") == len(streamed) == 3
    # engine counters come with the 0.1 s stats refresh: each step gives a request one token at most
    longest = max(sum(len(r.output_ids) for r in rs) for rs in good)
    steps_before = metric_value(before, "multilora_engine_steps_total", model=MODEL)
    wait_for_metric(llm_server.metrics_url, "multilora_engine_steps_total", lambda v: v - steps_before >= longest)
    # gauges from the engine's stats, under both names
    assert_idle(llm_server)
    idle = read_metrics(llm_server.metrics_url)
    assert metric_value(idle, "vllm:num_requests_running", model=MODEL) == 0
    assert metric_value(idle, "multilora_kv_blocks_total", model=MODEL) > 0
    assert metric_value(idle, "multilora_adapters_loaded", model=MODEL) >= 3
    assert metric_value(idle, "multilora_adapter_loads_total", model=MODEL) >= 3
    usage = metric_value(idle, "multilora_kv_cache_usage_perc", model=MODEL)
    assert usage == metric_value(idle, "vllm:gpu_cache_usage_perc", model=MODEL)
    assert 0 <= usage <= 1


def test_time_to_first_token_is_observed_while_streaming(llm_server):
    before = metric_value(read_metrics(llm_server.metrics_url),
                          "multilora_time_to_first_token_seconds_count", model=MODEL)
    with StreamClient(llm_server.grpc_url) as client:
        client.send("t", text=PROMPT, lora_name="upper", sampling=SAMPLING)
        client.collect(["t"], timeout=TIMEOUT_S)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = metric_value(read_metrics(llm_server.metrics_url),
                             "multilora_time_to_first_token_seconds_count", model=MODEL)
        if after == before + 1:
            return
        time.sleep(0.05)
    pytest.fail("multilora_time_to_first_token_seconds_count did not move by 1")


def test_engine_args_override_engine_json(llm_server):
    """The launcher's --engine-arg max_model_len=4096 reached the engine (the demo model says 64)."""
    with StreamClient(llm_server.grpc_url) as client:
        client.send("long", text="hello", sampling={"max_tokens": 4096})
        client.send("fits", text="hello", sampling={"max_tokens": 100, "ignore_eos": True}, stream=False)
        got = client.collect(["long", "fits"], timeout=TIMEOUT_S)
    assert "max_model_len is 4096" in got["long"][0].error
    assert len(got["fits"][0].output_ids) == 100


def test_many_long_streams_deliver_every_token_once(llm_server):
    """48 streams of 200 tokens over all adapters: every token arrives once, in responses that are
    never empty, each stream ends with exactly one FINAL. (Whether several tokens share a response
    depends on the engine outrunning the response path, which the CPU engine does not; the GPU
    serving benchmark counts responses per token.)"""
    num_requests, max_tokens = 48, 200
    with StreamClient(llm_server.grpc_url) as client:
        ids = [str(i) for i in range(num_requests)]
        for request_id in ids:
            client.send(request_id, text="abc", lora_name=list(EXPECTED)[int(request_id) % 4],
                        sampling={"max_tokens": max_tokens, "ignore_eos": True})
        got = client.collect(ids, timeout=240)
    for responses in got.values():
        only_final_last(responses)
        assert sum(len(r.output_ids) for r in responses) == max_tokens
        assert all(r.output_ids for r in responses)  # no empty deltas
    assert_idle(llm_server)


def test_only_the_requested_outputs_come_back(llm_server):
    """A client asking for output_ids alone (as bench/serving.py does) gets exactly that output,
    with the same tokens as a client asking for everything, and every stream ends once."""
    lora = list(EXPECTED)[1]
    ids = [f"o{i}" for i in range(24)]
    with StreamClient(llm_server.grpc_url) as client:
        client.send("all", text="abcdef", lora_name=lora, sampling=SAMPLING, return_finish_reason=True)
        for request_id in ids:
            client.send(request_id, text="abcdef", lora_name=lora, sampling=SAMPLING, return_finish_reason=True,
                        requested_outputs=("output_ids",))
        got = client.collect(["all", *ids], timeout=120)
    reference = got["all"]
    assert any("text_output" in r.outputs for r in reference)
    expected_ids = [t for r in reference for t in r.output_ids]
    assert expected_ids
    for request_id in ids:
        responses = got[request_id]
        only_final_last(responses)
        assert all(set(r.outputs) <= {"output_ids"} for r in responses), responses[0].outputs
        assert [t for r in responses for t in r.output_ids] == expected_ids
    assert_idle(llm_server)


def test_finish_reason_length_and_prompt_prepended(llm_server):
    with StreamClient(llm_server.grpc_url) as client:
        client.send("n", text="hello", stream=False, sampling={"max_tokens": 2, "temperature": 0},
                    return_finish_reason=True, return_num_output_tokens=True)
        (reply,) = client.collect(["n"], timeout=TIMEOUT_S)["n"]
    assert reply.text == "hellohe"  # the prompt, then the generated text (echo, cut at 2 tokens)
    assert reply.outputs["finish_reason"] == ["length"]
    assert reply.outputs["num_output_tokens"] == [2]
