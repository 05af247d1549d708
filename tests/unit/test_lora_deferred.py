"""A projection's LoRA term deferred to the op after it (LoRABatch.linear: a delta buffer that
rotary, residual add + RMSNorm and SiLU-and-mul add) gives what adding it into the projection's
output in place gives: on the reference ops the same bits, since both round the same sum once.
On CUDA the Triton kernels with decode graphs run the LoRA on its own stream beside the base
GEMM (Ops.lora_stream); there the float32 tokens must equal those of the serial, in-place path."""
import random

import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from helpers import write_adapter, write_checkpoint


@pytest.fixture(scope="module")
def model_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("deferred")
    base = write_checkpoint(str(root / "base"), "llama_gqa", num_hidden_layers=2)
    adapters = {"a": write_adapter(str(root / "a"), base, 4, ["q_proj", "v_proj", "up_proj", "down_proj"], seed=1),
                "b": write_adapter(str(root / "b"), base, 8, ["k_proj", "o_proj", "gate_proj"], seed=2)}
    return base, adapters


def generate(base, adapters, dtype, defer, names, prompts, device="cpu"):
    kernels = "triton" if device == "cuda" else "reference"
    llm = LLM(model=base, adapters=adapters, kernels=kernels, dtype=dtype, device=device, num_pages=64,
              block_size=4, max_num_seqs=8, decode_graphs="off" if device == "cpu" else "auto")
    ops = llm.engine.runner.ops
    ops.defer_lora = ops.overlap_lora = defer
    if llm.engine.runner.graphs is not None:  # captured at start-up with the defaults
        llm.engine.runner.graphs.recapture_lazily()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts, params, lora_names=names)
    return [(o.token_ids, o.logprobs) for o in outs]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_deferred_lora_equals_in_place(model_set, dtype):
    base, adapters = model_set
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 259) for _ in range(rng.randrange(2, 12))] for _ in range(4)]
    names = ["a", None, "b", "a"]
    deferred = generate(base, adapters, dtype, True, names, prompts)
    assert deferred == generate(base, adapters, dtype, False, names, prompts)
    # the adapters change what they touch, so a delta left out would show
    assert deferred != generate(base, adapters, dtype, True, [None] * 4, prompts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_stream_gives_the_serial_tokens(model_set):
    base, adapters = model_set
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(3, 259) for _ in range(rng.randrange(2, 12))] for _ in range(6)]
    names = ["a", None, "b", "a", "b", "b"]
    overlapped = generate(base, adapters, "float32", True, names, prompts, "cuda")
    serial = generate(base, adapters, "float32", False, names, prompts, "cuda")
    assert [t for t, _ in overlapped] == [t for t, _ in serial]
    for (_, a), (_, b) in zip(overlapped, serial):
        for pa, pb in zip(a, b):
            assert pa.keys() == pb.keys() and all(abs(pa[k] - pb[k]) < 1e-4 for k in pa)
