"""Tiny random checkpoints and PEFT adapters, written by the tests themselves."""
from __future__ import annotations

import os

import torch

VOCAB_SIZE = 300  # 256 byte tokens + specials + spare ids


def write_tokenizer(path: str) -> None:
    """A byte-level tokenizer (no merges): every byte is a token; <s> is prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)


def write_checkpoint(path: str, kind: str = "llama", seed: int = 0, std: float = 0.15, **overrides) -> str:
    """A tiny random model of the given kind: 'llama' (MHA), 'llama_gqa', 'qwen2', 'mistral', 'llama3'."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model_type = {"llama": "llama", "llama_gqa": "llama", "llama3": "llama", "qwen2": "qwen2",
                  "mistral": "mistral"}[kind]
    if kind in ("llama_gqa", "qwen2", "mistral"):
        common["num_key_value_heads"] = 2
    if kind == "llama3":
        common.update(num_key_value_heads=2, tie_word_embeddings=True,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                      rope_theta=500000.0)
    if kind == "mistral":
        common["sliding_window"] = None
    common.update(overrides)
    config = AutoConfig.for_model(model_type, **common)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # spread the logits so greedy choices are far from ties
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, std)
            elif "bias" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    write_tokenizer(path)
    return path


def write_adapter(path: str, base_path: str, rank: int, modules: list[str], seed: int,
                  alpha: float | None = None, use_rslora: bool = False) -> str:
    """A PEFT LoRA adapter with random A and B (B is non-zero, unlike a fresh PEFT init)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=modules,
                        lora_dropout=0.0, use_rslora=use_rslora)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
    assert os.path.isfile(os.path.join(path, "adapter_model.safetensors"))
    return path


def write_raw_adapter(path: str, num_layers: int, shapes: dict[str, tuple[int, int]], rank: int,
                      modules: list[str], seed: int, alpha: float | None = None) -> str:
    """A PEFT-format adapter written directly (fast, for thousands of them): the key names and
    adapter_config.json that PEFT's save_pretrained writes."""
    import json

    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for m in modules:
            n_in, n_out = shapes[m]
            block = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.3
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha if alpha is not None else 2 * rank,
                   "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "use_rslora": False}, f)
    return path


def write_overflowing_adapter(path: str, base_path: str, candidate_ids: range = range(5, 100)) -> int:
    """A PEFT adapter that every load check passes and that overflows float32 on one token only.

    Rank 1 on layer 0's q_proj and k_proj: both read one dimension j of the normed embedding and
    write it, times c, into every dimension of attention head 0. A token t's q.k on itself (the
    attention score before its scale) is then about head_dim * (c * x_tj)^2, past float32's
    largest value (Inf, then
    NaN from the softmax) exactly when |x_tj| is above a threshold that only the returned token
    id reaches (j: the dimension where a token of ``candidate_ids``, the demo's printable
    characters by default, stands furthest above all others, specials too). The
    update's largest output for inputs of magnitude 1 is c (about 4e18), within the load bound:
    what gives it away is the input, at run time. Base weights are read from ``base_path``
    (its model.safetensors, Llama layout)."""
    import json

    from safetensors.torch import load_file, save_file

    with open(os.path.join(base_path, "config.json")) as f:
        config = json.load(f)
    w = load_file(os.path.join(base_path, "model.safetensors"))
    embed = w["model.embed_tokens.weight"].double()
    x = embed * torch.rsqrt(embed.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"])
    x = (x * w["model.layers.0.input_layernorm.weight"].double()).abs()  # [V, H]
    candidates = torch.tensor(list(candidate_ids))
    best = x[candidates].max(dim=0)  # per dimension: the candidate furthest out
    tokens = candidates[best.indices]  # [H]
    rest = x.clone()
    rest[tokens, torch.arange(x.shape[1])] = 0
    runner_up = rest.max(dim=0).values  # every other token, specials too
    j = int((best.values / runner_up).argmax())
    token = int(tokens[j])
    threshold = float((best.values[j] * runner_up[j]).sqrt())  # between the two, in ratio
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    limit = float(torch.finfo(torch.float32).max)
    c = (limit / head_dim) ** 0.5 / threshold  # q.k of the trigger on itself: head_dim * (c * x)^2 > limit
    hidden, kv = config["hidden_size"], config["num_key_value_heads"] * head_dim
    prefix = "base_model.model.model.layers.0.self_attn"
    tensors = {}
    for module, n_out in (("q_proj", config["num_attention_heads"] * head_dim), ("k_proj", kv)):
        a = torch.zeros(1, hidden)
        a[0, j] = 1.0
        b = torch.zeros(n_out, 1)
        b[:head_dim, 0] = c
        tensors[f"{prefix}.{module}.lora_A.weight"] = a
        tensors[f"{prefix}.{module}.lora_B.weight"] = b
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj", "k_proj"],
                   "layers_to_transform": [0], "lora_dropout": 0.0, "bias": "none", "use_rslora": False}, f)
    return token
