"""On 2 or 4 GPUs (NCCL): the engine in fp16 with the Triton kernels at tensor-parallel shapes,
both LoRA modes, against HF Transformers + PEFT in float32 by teacher-forced top-1 agreement,
next to the engine at TP = 1 as the yardstick. Skipped with fewer than 2 GPUs."""
import random

import pytest
import torch

from test_gpu_fp16 import NEW_TOKENS, agreement, model_set, peft_model  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


@pytest.mark.parametrize("size", [2, 4])
def test_tensor_parallel_fp16_agrees_with_float32_peft(model_set, size):
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    if torch.cuda.device_count() < size:
        pytest.skip(f"needs {size} GPUs")
    base, adapters = model_set
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 259) for _ in range(rng.randrange(8, 64))] for _ in range(12)]
    names = [[None, "r8", "r16"][i % 3] for i in range(len(prompts))]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = {}
    for label, tp, fully_sharded in (("tp1", 1, False), ("default", size, False), ("fully sharded", size, True)):
        llm = LLM(model=base, adapters=adapters, dtype="float16", device="cuda", num_pages=512,
                  tensor_parallel_size=tp, fully_sharded_loras=fully_sharded)
        results[label] = [o.token_ids for o in llm.generate(prompts, params, lora_names=names)]
        llm.engine.runner.close()
        del llm
        torch.cuda.empty_cache()
    fp32 = peft_model(base, adapters, torch.float32)
    scores = {label: agreement(fp32, prompts, names, out) for label, out in results.items()}
    print(f"TP {size}: top-1 agreement with float32 HF+PEFT (teacher-forced):", scores)
    assert scores["default"] >= scores["tp1"] - 0.02 and scores["fully sharded"] >= scores["tp1"] - 0.02
