"""Manage the adapters of a running multilora server through its admin model (multilora_adapters).

    python client_examples/adapter_admin.py list
    python client_examples/adapter_admin.py load my-adapter /adapters/my-adapter      # under lora_roots
    python client_examples/adapter_admin.py upload my-adapter ./peft_dir              # sends the files
    python client_examples/adapter_admin.py reload my-adapter
    python client_examples/adapter_admin.py unload my-adapter

The admin token is --token or the environment variable MULTILORA_ADMIN_TOKEN (sent as
``authorization: Bearer <token>``); ``list`` works without one on a server without tenants.
Prints the JSON answer; on an error prints the Triton status and message and exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def bytes_input(name: str, value: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value], dtype=np.object_))
    return tensor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="gRPC address of the server")
    parser.add_argument("--token", default=os.environ.get("MULTILORA_ADMIN_TOKEN"))
    parser.add_argument("action", choices=["list", "load", "upload", "reload", "unload"])
    parser.add_argument("lora_name", nargs="?")
    parser.add_argument("path", nargs="?", help="load: the adapter directory on the server; upload: a local one")
    args = parser.parse_args()
    if args.action != "list" and not args.lora_name:
        parser.error(f"{args.action} needs lora_name")
    request: dict = {"action": "load" if args.action == "upload" else args.action}
    if args.lora_name:
        request["lora_name"] = args.lora_name
    inputs = []
    if args.action == "load" and args.path:
        request["lora_path"] = args.path
    if args.action == "upload":
        if not args.path:
            parser.error("upload needs the local adapter directory")
        with open(os.path.join(args.path, "adapter_config.json"), "rb") as f:
            inputs.append(bytes_input("adapter_config", f.read()))
        with open(os.path.join(args.path, "adapter_model.safetensors"), "rb") as f:
            inputs.append(bytes_input("adapter_weights", f.read()))
    inputs.insert(0, bytes_input("request", json.dumps(request).encode()))
    headers = {"authorization": f"Bearer {args.token}"} if args.token else None
    client = grpcclient.InferenceServerClient(args.url)
    try:
        result = client.infer("multilora_adapters", inputs, headers=headers)
    except InferenceServerException as error:
        print(f"{error.status()}: {error.message()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(json.dumps(json.loads(result.as_numpy("response")[0]), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
