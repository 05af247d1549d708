"""Upload speed: a PEFT adapter sent through Triton (model multilora_adapters, action load with
adapter_config and adapter_weights) until its first served token (a streamed request to model
multilora naming it, max_tokens 1). Prints one line.

    python bench/upload.py                   # Llama-7B shape (random fp16 weights), rank 16, all linear: 80 MB
    python bench/upload.py --layers 2        # a small smoke run (CPU)

Each run uploads an adapter with other bytes under a new name (nothing is cached), then asks for
one token. The figure is the median over --runs of (upload sent -> first token received); the
upload's own reply time is printed beside it. Target (issue: adapters as a live fleet): at most
1 s on the GPU machine.
"""
from __future__ import annotations

import os
import sys

# Run as a script, Python puts bench/ first on sys.path, where bench/engine.py would shadow the
# engine package: the repository root instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from safetensors.torch import save  # noqa: E402

from bench.common import ALL_LINEAR, LLAMA_7B, device_name, write_model_dir  # noqa: E402

from engine.config import ModelConfig  # noqa: E402
from multilora_serve.launcher import TritonServer  # noqa: E402

TOKEN = "upload-bench-token"


def adapter_files(model: ModelConfig, rank: int, seed: int) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a random fp16 PEFT adapter."""
    gen = torch.Generator().manual_seed(seed)
    shapes = model.projection_shapes()
    tensors = {}
    for layer in range(model.num_layers):
        for m in ALL_LINEAR:
            n_in, n_out = shapes[m]
            block = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, n_in, generator=gen) * 0.01).half()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(n_out, rank, generator=gen) * 0.01).half()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ALL_LINEAR,
              "lora_dropout": 0.0, "bias": "none"}
    return json.dumps(config).encode(), save(tensors)


def bytes_input(name: str, value: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([value], dtype=np.object_))
    return tensor


def first_token(client: grpcclient.InferenceServerClient, name: str) -> None:
    done = []

    def callback(result, error) -> None:
        done.append(error or result)

    client.start_stream(callback=callback)
    try:
        inputs = [bytes_input("text_input", b"hello"), bytes_input("lora_name", name.encode()),
                  bytes_input("sampling_parameters", json.dumps({"max_tokens": 1, "temperature": 0}).encode())]
        stream = grpcclient.InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([True]))
        client.async_stream_infer("multilora", inputs + [stream], request_id=name)
        while not done:
            time.sleep(0.0005)
    finally:
        client.stop_stream()
    if isinstance(done[0], Exception):
        raise RuntimeError(f"the request for {name} failed: {done[0]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than Llama-7B's 32 (smoke runs)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--server-log", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="multilora-upload-")
    shape = dict(LLAMA_7B, **({"num_hidden_layers": args.layers} if args.layers else {}))
    model_dir = write_model_dir(os.path.join(work, "model"), shape)
    model = ModelConfig.from_dir(model_dir)
    files = [adapter_files(model, args.rank, seed) for seed in range(args.runs + 1)]  # +1: a warm-up
    size_mb = len(files[0][1]) / 1e6
    server = TritonServer(http_port=None, grpc_port=None, metrics_port=None, ready_timeout=900, exit_timeout_s=5,
                          engine_args={"model": model_dir, "load_format": "dummy", "dtype": args.dtype,
                                       "max_num_seqs": 8, "lora_roots": []},
                          env={"MULTILORA_ADMIN_TOKEN": TOKEN}, log_file=args.server_log)
    server.start()
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        totals, replies = [], []
        for i, (config, weights) in enumerate(files):
            name = f"upload-{i}"
            request = json.dumps({"action": "load", "lora_name": name}).encode()
            start = time.perf_counter()
            client.infer("multilora_adapters", [bytes_input("request", request), bytes_input("adapter_config", config),
                                                bytes_input("adapter_weights", weights)],
                         headers={"authorization": f"Bearer {TOKEN}"}, client_timeout=600)
            replied = time.perf_counter()
            first_token(client, name)
            if i:  # the first run is a warm-up (kernels for the new adapter shape)
                totals.append(time.perf_counter() - start)
                replies.append(replied - start)
        client.close()
    finally:
        server.stop()
    print(f"upload of a {size_mb:.1f} MB rank-{args.rank} all-linear adapter ({model.num_layers} layers, "
          f"{args.dtype}) through Triton -> first token: median {statistics.median(totals):.3f} s "
          f"(upload reply {statistics.median(replies):.3f} s; runs {', '.join(f'{t:.3f}' for t in totals)}) "
          f"on {device_name()}; target <= 1 s")


if __name__ == "__main__":
    main()
