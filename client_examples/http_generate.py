#!/usr/bin/env python3
"""Generate with the multilora model over HTTP, through Triton's generate endpoints.

    python client_examples/http_generate.py --url localhost:8000 --lora reverse "hello world"
    python client_examples/http_generate.py --stream "hello world"     # /generate_stream (SSE)

The model is decoupled; Triton 24.10's HTTP /infer endpoint refuses decoupled models (501), so
HTTP clients use /v2/models/multilora/generate (one JSON answer) or /generate_stream (one
server-sent event per response). Only the standard library is needed.
"""
import argparse
import json
import sys
import urllib.error
import urllib.request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="hello world")
    parser.add_argument("--url", default="localhost:8000", help="HTTP host:port")
    parser.add_argument("--lora", default="", help="adapter name (empty: the base model)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--stream", action="store_true", help="use /generate_stream")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()

    base = args.url if args.url.startswith("http") else f"http://{args.url}"
    body = {
        "text_input": args.prompt,
        "lora_name": args.lora,
        "stream": args.stream,
        "sampling_parameters": json.dumps({"max_tokens": args.max_tokens,
                                           "temperature": args.temperature}),
        "exclude_input_in_output": True,
        "return_finish_reason": True,
        "return_num_input_tokens": True,
    }
    endpoint = "generate_stream" if args.stream else "generate"
    request = urllib.request.Request(f"{base}/v2/models/multilora/{endpoint}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as reply:
            if not args.stream:
                answer = json.loads(reply.read())
                print(answer["text_output"])
                print(f"[finish_reason: {answer['finish_reason']}, "
                      f"prompt tokens: {answer['num_input_tokens']}]")
                return 0
            for line in reply:  # server-sent events: "data: {...}"
                if line.startswith(b"data: "):
                    event = json.loads(line[len(b"data: "):])
                    if "error" in event:
                        print(f"\nerror: {event['error']}", file=sys.stderr)
                        return 1
                    print(event["text_output"], end="", flush=True)
            print()
            return 0
    except urllib.error.HTTPError as error:  # model errors come back as 400 {"error": ...}
        print(f"error {error.code}: {error.read().decode()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
