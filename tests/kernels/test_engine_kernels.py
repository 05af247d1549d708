"""The engine with the Triton kernels in place of the references (interpreter on CPU, real on
CUDA): the same greedy tokens as the reference ops, for mixed adapters, prefill and decode."""
import random

import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from helpers import write_adapter, write_checkpoint


@pytest.fixture(scope="module")
def model_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels_engine")
    base = write_checkpoint(str(root / "base"), "llama_gqa", num_hidden_layers=1)
    adapters = {"a": write_adapter(str(root / "a"), base, 4, ["q_proj", "v_proj", "up_proj"], seed=1),
                "b": write_adapter(str(root / "b"), base, 8, ["k_proj", "o_proj", "down_proj", "gate_proj"], seed=2)}
    return base, adapters


def test_kernels_give_the_reference_tokens(model_set):
    base, adapters = model_set
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 259) for _ in range(rng.randrange(2, 20))] for _ in range(5)]
    names = ["a", None, "b", "a", "b"]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    dtype = "float32"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected = LLM(model=base, adapters=adapters, kernels="reference", dtype=dtype, device=device,
                   num_pages=64, block_size=4).generate(prompts, params, lora_names=names)
    for graphs in ("off", "static"):  # static: the padded buffers of the decode graphs
        llm = LLM(model=base, adapters=adapters, kernels="triton", dtype=dtype, device=device, num_pages=64,
                  block_size=4, decode_graphs=graphs, max_num_seqs=8, max_lora_rank=16)
        assert llm.engine.runner.ops.use_kernels
        got = llm.generate(prompts, params, lora_names=names)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected], graphs
