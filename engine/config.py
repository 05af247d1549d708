"""Configuration: the base model's shape (from config.json) and the engine's arguments."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from engine.errors import CheckpointError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family model, read from a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q,k,v (and o for Llama's attention_bias) carry biases
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{path}: no config.json; expected a Hugging Face model directory")
        try:
            with open(config_path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
        return cls.from_dict(raw, source=config_path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise CheckpointError(
                f"{source}: architecture {archs or raw.get('model_type')!r} is not supported; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        family = SUPPORTED_ARCHITECTURES[arch]
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            kv_heads = int(raw.get("num_key_value_heads") or heads)
            head_dim = int(raw.get("head_dim") or hidden // heads)
            rope_theta, rope_scaling = _rope(raw)
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            sliding = raw.get("sliding_window")
            if family == "qwen2" and not raw.get("use_sliding_window", False):
                sliding = None
            config = cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
                o_bias=family != "qwen2" and bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                sliding_window=int(sliding) if sliding else None,
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: missing required key {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: malformed value ({e})") from e
        if heads % kv_heads:
            raise CheckpointError(f"{source}: num_attention_heads {heads} is not a multiple of "
                                  f"num_key_value_heads {kv_heads}")
        return config

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer that LoRA may target."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Rope base and scaling, from the transformers-4 keys or the transformers-5 rope_parameters."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw.get("rope_scaling") or {})
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind not in ("llama3", "linear"):
        raise CheckpointError(f"rope scaling {kind!r} is not supported (supported: default, llama3, linear)")
    scaling["rope_type"] = kind
    return theta, scaling


@dataclass
class EngineConfig:
    """Arguments of the engine (engine.json). Paths are absolute once loaded."""

    model: str
    tokenizer: str | None = None
    load_format: str = "safetensors"  # or "dummy": random weights of the config's shape (benchmarks)
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on CPU; or float32/float16/bfloat16
    device: str = "auto"  # auto: cuda if available
    # auto: Triton kernels on CUDA, pure-torch references on CPU; "reference": the references
    # everywhere (debugging); "triton": the kernels everywhere (on CPU under TRITON_INTERPRET=1)
    kernels: str = "auto"
    # decode steps as CUDA graphs per batch bucket: auto (on CUDA with the kernels), off, or
    # static (the same static buffers run eagerly: the CPU twin, for tests and debugging)
    decode_graphs: str = "auto"
    # Schedule and launch step N+1 before the tokens of step N reach the host: its decode inputs
    # are taken from step N's sampled tokens on the device, and the host work of each step
    # (scheduling, tables, detokenizing, responses) overlaps the GPU's work on the next one.
    async_scheduling: bool = True
    # Before the first request, run synthetic steps that compile every Triton kernel binary and
    # capture every decode graph traffic can reach (engine/warmup.py): auto (on CUDA), true, false.
    warmup: bool | str = "auto"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    # The unified pool: num_pages pages, each one KV block (block_size tokens, all layers) or a
    # piece of an adapter. Fixed by num_pages, else by pool_memory_bytes, else on CUDA from
    # gpu_memory_utilization after weights and the activation peak are measured.
    num_pages: int | None = None
    pool_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_lora_rank: int = 64
    max_host_adapter_bytes: int = 8 << 30  # host-memory tier of adapters (LRU)
    adapter_loader_threads: int = 4  # threads reading adapters from disk off the request path
    lora_roots: list[str] = field(default_factory=list)
    # An adapter found in a lora_root whose directory or files are symlinks resolving outside
    # that root is refused unless this is true (whoever writes a root could otherwise make the
    # server read any of its files as an adapter).
    allow_adapter_symlinks_outside_roots: bool = False
    # Tensor parallelism over the GPUs of a host: this many ranks (rank r on the r-th visible
    # device), each holding 1/N of the heads, MLP columns, vocabulary and of every adapter.
    tensor_parallel_size: int = 1
    # LoRA under tensor parallelism: false (default) shards B of column layers and A of row
    # layers, with no collective of its own; true shards both A and B (S-LoRA's scheme, 1/N of
    # each adapter's bytes per rank) at one all-gather or all-reduce per projection group.
    fully_sharded_loras: bool = False
    max_waiting_requests: int = 4096
    default_max_tokens: int = 16  # when a request sets no max_tokens (clipped to the context left)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("engine config: 'model' (path of the base model directory) is required")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"engine config: load_format {self.load_format!r} must be safetensors or dummy")
        if self.kernels not in ("auto", "reference", "triton"):
            raise ValueError(f"engine config: kernels {self.kernels!r} must be auto, reference or triton")
        if self.decode_graphs not in ("auto", "off", "static"):
            raise ValueError(f"engine config: decode_graphs {self.decode_graphs!r} must be auto, off or static")
        if isinstance(self.warmup, str) and self.warmup.lower() in ("true", "false"):
            self.warmup = self.warmup.lower() == "true"
        if not (self.warmup == "auto" or isinstance(self.warmup, bool)):
            raise ValueError(f"engine config: warmup {self.warmup!r} must be auto, true or false")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"engine config: dtype {self.dtype!r} must be auto, float32, float16 or bfloat16")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_lora_rank",
                     "max_waiting_requests", "default_max_tokens", "adapter_loader_threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"engine config: {name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("engine config: gpu_memory_utilization must be in (0, 1]")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError("engine config: num_pages must be >= 1")
        if self.max_host_adapter_bytes < 0:
            raise ValueError("engine config: max_host_adapter_bytes must be >= 0")
        if isinstance(self.lora_roots, str):
            self.lora_roots = [self.lora_roots]
        flag = self.allow_adapter_symlinks_outside_roots
        if isinstance(flag, str) and flag.lower() in ("true", "false"):
            self.allow_adapter_symlinks_outside_roots = flag.lower() == "true"
        if isinstance(self.fully_sharded_loras, str) and self.fully_sharded_loras.lower() in ("true", "false"):
            self.fully_sharded_loras = self.fully_sharded_loras.lower() == "true"
        if not isinstance(self.fully_sharded_loras, bool):
            raise ValueError(f"engine config: fully_sharded_loras must be true or false, got {self.fully_sharded_loras!r}")
        size = self.tensor_parallel_size
        if isinstance(size, str) and size.strip().isdigit():
            size = self.tensor_parallel_size = int(size)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"engine config: tensor_parallel_size must be an integer >= 1, got {size!r}")
        if not isinstance(self.allow_adapter_symlinks_outside_roots, bool):
            raise ValueError("engine config: allow_adapter_symlinks_outside_roots must be true or false, got "
                             f"{self.allow_adapter_symlinks_outside_roots!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], base_dir: str | None = None) -> "EngineConfig":
        """Build from engine.json content; relative paths are resolved against ``base_dir``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"engine config: unknown key(s) {unknown}; known: {sorted(known)}")
        values = dict(values)
        if base_dir is not None:
            for key in ("model", "tokenizer"):
                if values.get(key):
                    values[key] = os.path.normpath(os.path.join(base_dir, values[key]))
            roots = values.get("lora_roots") or []
            roots = [roots] if isinstance(roots, str) else roots
            values["lora_roots"] = [os.path.normpath(os.path.join(base_dir, r)) for r in roots]
        return cls(**values)

    @classmethod
    def from_json(cls, path: str, overrides: dict[str, Any] | None = None) -> "EngineConfig":
        with open(path) as f:
            values = json.load(f)
        base_dir = os.path.dirname(os.path.abspath(path))
        values.update(overrides or {})
        return cls.from_dict(values, base_dir=base_dir)
