#!/usr/bin/env python3
"""Stream a generation from the multilora model over gRPC, printing text as it arrives.

    python client_examples/grpc_stream.py --url localhost:8001 --lora upper "hello world"

Uses tritonclient's bidirectional stream (ModelStreamInfer): one response per batch of new
tokens, the last one flagged final (``triton_final_response``).
"""
import argparse
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def tensor(name, value, datatype):
    array = np.array([value.encode() if isinstance(value, str) else value],
                     dtype=np.object_ if datatype == "BYTES" else None)
    result = grpcclient.InferInput(name, [1], datatype)
    result.set_data_from_numpy(array)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="hello world")
    parser.add_argument("--url", default="localhost:8001", help="gRPC host:port")
    parser.add_argument("--lora", default="", help="adapter name (empty: the base model)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per response")
    args = parser.parse_args()

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    inputs = [
        tensor("text_input", args.prompt, "BYTES"),
        tensor("lora_name", args.lora, "BYTES"),
        tensor("stream", True, "BOOL"),
        tensor("sampling_parameters", json.dumps(sampling), "BYTES"),
        tensor("return_finish_reason", True, "BOOL"),
    ]
    client.async_stream_infer("multilora", inputs, request_id="1",
                              enable_empty_final_response=True)
    code = 0
    try:
        while True:
            result, error = responses.get(timeout=args.timeout)
            if error is not None:  # the model sends errors as the final response
                print(f"\nerror: {error.message()}", file=sys.stderr)
                code = 1
                break
            text = result.as_numpy("text_output")
            if text is not None and text.size:
                print(text[0].decode(), end="", flush=True)
            if result.get_response().parameters["triton_final_response"].bool_param:
                reason = result.as_numpy("finish_reason")
                print(f"\n[finish_reason: {reason[0].decode() if reason is not None else '?'}]")
                break
    finally:  # also on an error here (a closed stdout, a timeout): an open stream keeps the model loaded
        client.stop_stream()
        client.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
