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


def test_prefill_sized_steps_add_the_lora_in_the_base_gemm(model_set):
    """A step of at least tiles.PREFILL_SIZED_TOKENS tokens has its LoRA terms stored first and added by
    the base GEMM (Ops.linear_plus); tokens without an adapter share the step. Same greedy tokens and
    logprobs as adding them in place afterwards and as the reference ops."""
    base, adapters = model_set
    rng = random.Random(3)
    lengths = [200, 150, 120, 90, 60]  # 620 prompt tokens: one prefill-sized step
    prompts = [[1] + [rng.randrange(3, 259) for _ in range(n - 1)] for n in lengths]
    names = ["a", None, "b", "a", "b"]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(model=base, adapters=adapters, dtype="float32", device=device, num_pages=256, block_size=4,
                  max_num_seqs=8, max_num_batched_tokens=1024, decode_graphs="off")
    expected = LLM(kernels="reference", **common).generate(prompts, params, lora_names=names)
    results = {}
    for into_gemm in (True, False):
        llm = LLM(kernels="triton", **common)
        ops = llm.engine.runner.ops
        assert ops.lora_into_gemm  # the default on the kernels
        ops.lora_into_gemm = into_gemm
        calls = []
        plain = ops.linear_plus
        ops.linear_plus = lambda *args: calls.append(args[2].shape) or plain(*args)
        results[into_gemm] = llm.generate(prompts, params, lora_names=names)
        # 1 layer: q,k,v, o, gate,up and down in the prefill step, with the 620 tokens' addends
        assert len(calls) == (4 if into_gemm else 0) and all(shape[0] == sum(lengths) for shape in calls)
    for into_gemm, outs in results.items():
        assert [o.token_ids for o in outs] == [o.token_ids for o in expected], into_gemm
        for mine, ref in zip(outs, expected):
            for got, want in zip(mine.logprobs, ref.logprobs):
                assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-4 for k in got)


def test_prefill_sized_steps_on_the_kernels_at_tp2(model_set):
    """Tensor parallelism (default LoRA mode) on the kernels: a prefill-sized step adds each shard's LoRA
    terms in its base GEMM (Ops.linear_plus on rank 0, both column and row groups) and the decode steps
    after it take the two z buffers in turn; the same greedy tokens and logprobs as TP 1 on the references."""
    base, adapters = model_set
    rng = random.Random(5)
    lengths = [200, 180, 120, 60, 20]  # 580 prompt tokens: one prefill-sized step
    prompts = [[1] + [rng.randrange(3, 259) for _ in range(n - 1)] for n in lengths]
    names = ["b", "a", None, "b", "a"]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=2)
    common = dict(model=base, adapters=adapters, dtype="float32", device="cpu", num_pages=256, block_size=4,
                  max_num_seqs=8, max_num_batched_tokens=1024, decode_graphs="off")
    expected = LLM(kernels="reference", **common).generate(prompts, params, lora_names=names)
    llm = LLM(kernels="triton", tensor_parallel_size=2, **common)
    try:
        ops = llm.engine.runner.ops
        assert ops.use_kernels and ops.lora_into_gemm
        calls = []
        plain = ops.linear_plus
        ops.linear_plus = lambda *args: calls.append(args[2].shape) or plain(*args)
        got = llm.generate(prompts, params, lora_names=names)
    finally:
        llm.engine.runner.close()
    assert len(calls) == 4 and all(shape[0] == sum(lengths) for shape in calls)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    for mine, ref in zip(got, expected):
        for a, b in zip(mine.logprobs, ref.logprobs):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-3 for k in a)
