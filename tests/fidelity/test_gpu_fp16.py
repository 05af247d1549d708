"""On the GPU: the engine in fp16 with the Triton kernels against HF Transformers + PEFT in
float32, by teacher-forced top-1 agreement over long greedy decodes, next to HF + PEFT's own
fp16 agreement as the yardstick of what fp16 allows."""
import random

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def model_set(tmp_path_factory):
    from helpers import write_adapter, write_checkpoint
    root = tmp_path_factory.mktemp("gpu_fp16")
    base = write_checkpoint(str(root / "base"), "llama_gqa", std=0.08, hidden_size=256, intermediate_size=512,
                            num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4)
    adapters = {"r8": write_adapter(str(root / "r8"), base, 8, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=1),
                "r16": write_adapter(str(root / "r16"), base, 16, ["q_proj", "v_proj", "gate_proj", "up_proj",
                                                                   "down_proj"], seed=2)}
    return base, adapters


def peft_model(base, adapters, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).cuda()
    peft = PeftModel.from_pretrained(model, adapters["r8"], adapter_name="r8")
    peft.load_adapter(adapters["r16"], adapter_name="r16")
    return peft.eval()


def agreement(reference, prompts, names, outputs) -> float:
    """Share of generated tokens that are the float32 reference's top-1 after the same prefix."""
    agree = total = 0
    for prompt, name, tokens in zip(prompts, names, outputs):
        forced = torch.tensor([prompt + tokens], device="cuda")
        with torch.no_grad():
            logits = reference(forced, adapter_names=[name or "__base__"]).logits[0, len(prompt) - 1:-1]
        agree += sum(int(a == b) for a, b in zip(logits.argmax(-1).tolist(), tokens))
        total += len(tokens)
    return agree / total


def test_fp16_kernels_agree_with_float32_peft(model_set):
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    base, adapters = model_set
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 259) for _ in range(rng.randrange(8, 64))] for _ in range(12)]
    names = [[None, "r8", "r16"][i % 3] for i in range(len(prompts))]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = {}
    for label, kernels, graphs in (("triton", "triton", "auto"), ("eager", "triton", "off"),
                                   ("reference", "reference", "off")):
        llm = LLM(model=base, adapters=adapters, dtype="float16", device="cuda", num_pages=512, kernels=kernels,
                  decode_graphs=graphs)
        assert (llm.engine.runner.graphs is not None) == (graphs == "auto")
        results[label] = [o.token_ids for o in llm.generate(prompts, params, lora_names=names)]
    fp16 = peft_model(base, adapters, torch.float16)
    hf16 = []
    for prompt, name in zip(prompts, names):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            out = fp16.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                                adapter_names=[name or "__base__"])
        hf16.append(out[0, len(prompt):].tolist())
    del fp16
    fp32 = peft_model(base, adapters, torch.float32)
    scores = {"engine fp16 kernels + CUDA graphs": agreement(fp32, prompts, names, results["triton"]),
              "engine fp16 kernels, eager": agreement(fp32, prompts, names, results["eager"]),
              "engine fp16 reference ops": agreement(fp32, prompts, names, results["reference"]),
              "HF+PEFT fp16": agreement(fp32, prompts, names, hf16)}
    print("top-1 agreement with float32 HF+PEFT (teacher-forced):", scores)
    floor = min(0.98, scores["HF+PEFT fp16"] - 0.02)
    assert scores["engine fp16 kernels + CUDA graphs"] >= floor and scores["engine fp16 kernels, eager"] >= floor
