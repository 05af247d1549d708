#!/usr/bin/env python3
"""Many concurrent requests for different adapters in one gRPC stream.

    python client_examples/grpc_many_adapters.py --url localhost:8001 -n 32 --lora upper reverse rot13 ""

Sends ``n`` streamed requests (adapters taken in turn; "" is the base model) on one
ModelStreamInfer stream, then checks that each request ends with exactly one final response
and gets nothing after it. Prints one line per request; exits 1 on any violation.
"""
import argparse
import collections
import json
import queue
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient


def make_inputs(prompt: str, lora: str, max_tokens: int) -> list:
    values = [("text_input", prompt.encode(), "BYTES"), ("lora_name", lora.encode(), "BYTES"),
              ("sampling_parameters", json.dumps({"max_tokens": max_tokens, "temperature": 0}).encode(),
               "BYTES"), ("stream", True, "BOOL")]
    inputs = []
    for name, value, datatype in values:
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES" else bool))
        inputs.append(tensor)
    return inputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="gRPC host:port")
    parser.add_argument("-n", "--num-requests", type=int, default=32)
    parser.add_argument("--lora", nargs="+", default=["", "upper", "reverse", "rot13"])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url)
    client.start_stream(callback=lambda result, error: events.put((time.monotonic(), result, error)))
    adapters = {}
    for i in range(args.num_requests):
        adapters[str(i)] = args.lora[i % len(args.lora)]
        client.async_stream_infer("multilora", make_inputs(f"request {i}", adapters[str(i)],
                                                           args.max_tokens),
                                  request_id=str(i), enable_empty_final_response=True)
    texts, finals = collections.defaultdict(str), collections.Counter()
    late, errors = [], []
    deadline = time.monotonic() + args.timeout
    while sum(finals.values()) + len(errors) < args.num_requests and time.monotonic() < deadline:
        try:
            _, result, error = events.get(timeout=1.0)
        except queue.Empty:
            continue
        if error is not None:  # tritonclient does not say which request an error belongs to
            errors.append(error.message())
            continue
        response = result.get_response()
        if finals[response.id]:
            late.append(response.id)
        text = result.as_numpy("text_output")
        texts[response.id] += text[0].decode() if text is not None and text.size else ""
        finals[response.id] += response.parameters["triton_final_response"].bool_param
    time.sleep(0.5)  # anything sent after a final response would arrive now
    while not events.empty():
        _, result, error = events.get()
        late.append(result.get_response().id if result is not None else error.message())
    client.stop_stream()
    client.close()

    for request_id, lora in adapters.items():
        print(f"{request_id:>4} {lora or '(base)':>10} finals={finals[request_id]} {texts[request_id]!r}")
    bad = [rid for rid in adapters if finals[rid] != 1] if not errors else []
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if bad or late or errors:
        print(f"FAILED: without exactly one final: {bad}; after a final: {late}", file=sys.stderr)
        return 1
    print(f"OK: {args.num_requests} requests over {len(set(adapters.values()))} adapters, "
          "each with exactly one final response")
    return 0


if __name__ == "__main__":
    sys.exit(main())
