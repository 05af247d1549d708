"""Reading PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) and checking them."""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.errors import AdapterLoadError
from engine.adapter_identity import adapter_digest
from engine.safetensors_io import parse_safetensors, read_safetensors

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# |lora_alpha / r| (rsLoRA: lora_alpha / sqrt(r)) beyond it is no trained adapter (PEFT's
# defaults give 1 or 2; published adapters stay below a few hundred), and it scales small
# weights past float16's range.
MAX_ABS_SCALE = 1e4
logger = logging.getLogger("multilora")
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass
class LoRAAdapter:
    """One adapter's weights: per layer and module, A [r, in], B [out, r] and the scale alpha/r."""

    name: str
    path: str
    rank: int  # the largest rank among its modules
    modules: tuple[str, ...]
    # weights[layer][module] = (A, B, scale)
    weights: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]]
    digest: str = ""  # engine.adapter_identity.adapter_digest of what was read ("" without a salt)

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for layer in self.weights for a, b, _ in layer.values())


def load_adapter(name: str, path: str, model: ModelConfig, max_lora_rank: int,
                 root: str | None = None, salt: bytes | None = None,
                 upload: tuple[bytes, bytes] | None = None) -> LoRAAdapter:
    """Load and validate a PEFT adapter directory. Raises AdapterLoadError saying what is wrong.

    ``root``: the adapter root it was found in; the directory and the files read must then
    resolve inside it (no symlink out of it). Messages name the adapter, never ``path``: they go
    to clients, the path goes to the log. ``salt`` (engine.adapter_identity.serving_salt): also
    compute the adapter's digest, from the bytes read. ``upload``: (adapter_config.json bytes,
    adapter_model.safetensors bytes) sent by a client instead of files, checked the same way.
    """
    def fail(message: str) -> AdapterLoadError:
        logger.warning("LoRA adapter '%s' (%s) refused: %s", name, path, message)
        return AdapterLoadError(f"LoRA adapter '{name}': {message}")

    config_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if upload is not None:
        config_text, weights_data = upload
        if weights_data[:4] == b"PK\x03\x04" or weights_data[:1] == b"\x80":
            raise fail("adapter_weights is a pickle file (torch.save / adapter_model.bin); multilora loads "
                       "safetensors only (send adapter_model.safetensors, saved with safe_serialization=True)")
    elif not os.path.isfile(config_path):
        raise fail("adapter_config.json is missing")
    elif not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise fail("only adapter_model.bin (pickle) found; multilora loads safetensors only "
                       "(save the adapter with safe_serialization=True)")
        raise fail("adapter_model.safetensors is missing")
    if root is not None and upload is None:
        for label, file_path in (("the adapter directory", path), ("adapter_config.json", config_path),
                                 ("adapter_model.safetensors", weights_path)):
            if not is_inside(file_path, root):
                logger.warning("LoRA adapter '%s': %s resolves to %s, outside the adapter root %s",
                               name, file_path, os.path.realpath(file_path), root)
                raise fail(f"{label} is a symlink to outside the adapter root (refused unless the engine "
                           "option allow_adapter_symlinks_outside_roots is true)")
    try:
        if upload is not None:
            cfg = json.loads(config_text)
        else:
            with open(config_path) as f:
                cfg = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise fail(f"adapter_config.json is not valid JSON ({type(e).__name__})") from e
    except OSError as e:
        raise fail(f"adapter_config.json cannot be read ({e.strerror or type(e).__name__})") from e
    if not isinstance(cfg, dict):
        raise fail("adapter_config.json must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise fail(f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise fail("DoRA adapters (use_dora) are not supported")
    if cfg.get("modules_to_save"):
        raise fail(f"modules_to_save {cfg['modules_to_save']} is not supported (only LoRA on linear layers)")
    if cfg.get("fan_in_fan_out"):
        raise fail("fan_in_fan_out adapters are not supported")
    default_rank = _rank(cfg.get("r", 8))
    if default_rank is None:
        raise fail(f"r must be an integer >= 1 (the LoRA rank), got {_shown(cfg.get('r'))}")
    if default_rank > max_lora_rank:
        raise fail(f"r={default_rank} exceeds max_lora_rank={max_lora_rank} (raise max_lora_rank in engine.json)")
    try:
        default_alpha = float(cfg.get("lora_alpha", default_rank))
    except (TypeError, ValueError) as e:
        raise fail(f"lora_alpha must be a number, got {cfg.get('lora_alpha')!r}") from e
    use_rslora = bool(cfg.get("use_rslora", False))
    alpha_pattern = cfg.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict):
        raise fail("alpha_pattern must be a JSON object of module patterns and lora_alpha values")
    rank_pattern = cfg.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict):
        raise fail("rank_pattern must be a JSON object of module patterns and ranks")
    for pattern, value in rank_pattern.items():
        if _rank(value) is None:
            raise fail(f"rank_pattern: the rank of {pattern!r} must be an integer >= 1, got {_shown(value)}")
    targets = cfg.get("target_modules")
    target_error = _check_targets(targets)
    if target_error:
        raise fail(target_error)

    shapes = model.projection_shapes()
    raw: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        tensors = parse_safetensors(weights_data) if upload is not None else read_safetensors(weights_path)
    except OSError as e:  # its message holds the path
        raise fail(f"cannot read adapter_model.safetensors ({e.strerror or type(e).__name__})") from e
    except ValueError as e:
        if upload is not None:
            raise fail(f"adapter_weights is not a safetensors file ({e}); multilora loads safetensors only") from e
        raise fail(f"cannot read adapter_model.safetensors ({e})") from e
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise fail(f"tensor {key!r} is not a LoRA A/B weight of "
                       f"{', '.join(LORA_MODULES)} (embed_tokens, lm_head, biases and "
                       "other modules are not supported)")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in shapes:
            raise fail(f"module {module!r} is not supported; supported: {', '.join(LORA_MODULES)}")
        if layer >= model.num_layers:
            raise fail(f"tensor {key!r} names layer {layer}, the base model has {model.num_layers}")
        raw.setdefault((layer, module), {})[which] = tensor
    if not raw:
        raise fail("adapter_model.safetensors holds no LoRA weights")

    weights: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = [{} for _ in range(model.num_layers)]
    max_rank = 0
    for (layer, module), pair in sorted(raw.items()):
        if set(pair) != {"A", "B"}:
            raise fail(f"layer {layer} {module}: lora_A and lora_B must both be present")
        a, b = pair["A"], pair["B"]  # as stored; converted once, when packed
        if not (a.is_floating_point() and b.is_floating_point()):
            raise fail(f"layer {layer} {module}: lora_A / lora_B must be floating point, not {a.dtype} / {b.dtype}")
        n_in, n_out = shapes[module]
        if a.dim() != 2 or b.dim() != 2:
            raise fail(f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} must be matrices")
        rank = a.shape[0]
        if rank < 1:
            raise fail(f"layer {layer} {module}: rank must be >= 1")
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != n_in or tuple(b.shape) != (n_out, rank):
            raise fail(f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                       f"match the base model (expected ({rank}, {n_in}) and ({n_out}, {rank}))")
        if rank > max_lora_rank:
            raise fail(f"rank {rank} exceeds max_lora_rank={max_lora_rank} (raise max_lora_rank in engine.json)")
        module_name = f"model.layers.{layer}.{'self_attn' if module in ATTENTION_MODULES else 'mlp'}.{module}"
        try:
            alpha = _alpha_for(f"model.layers.{layer}.{module}", alpha_pattern, default_alpha)
        except (TypeError, ValueError, re.error) as e:
            raise fail(f"alpha_pattern: {e}") from e
        try:  # PEFT matches the module's name (model.layers.1.self_attn.q_proj); the name without
            # the block is tried too, as alpha_pattern is looked up
            configured, pattern = _pattern_value(module_name, rank_pattern, None)
            if pattern is None:
                configured, pattern = _pattern_value(f"model.layers.{layer}.{module}", rank_pattern, default_rank)
        except re.error as e:
            raise fail(f"rank_pattern: {e}") from e
        if rank != int(configured):
            said = f"rank_pattern {pattern!r} says {configured}" if pattern is not None else f"r={configured}"
            raise fail(f"layer {layer} {module}: lora_A and lora_B have rank {rank}, but adapter_config.json's "
                       f"{said} (PEFT refuses such an adapter; the config and the weights must agree)")
        if not _is_targeted(module_name, targets):
            raise fail(f"layer {layer} {module}: the adapter has weights for it, but adapter_config.json's "
                       f"target_modules {_shown(targets)} does not name it")
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        if not (math.isfinite(scale) and abs(scale) <= MAX_ABS_SCALE):
            formula = "lora_alpha/sqrt(r)" if use_rslora else "lora_alpha/r"
            raise fail(f"layer {layer} {module}: scale {formula} = {alpha:.6g}/{'sqrt(%d)' % rank if use_rslora else rank}"
                       f" = {scale:.6g} is not a finite number of magnitude at most {MAX_ABS_SCALE:g} "
                       "(lora_alpha or r is wrong)")
        weights[layer][module] = (a, b, scale)
        max_rank = max(max_rank, rank)
    modules = tuple(m for m in LORA_MODULES if any(m in layer for layer in weights))
    digest = adapter_digest(cfg, tensors, salt) if salt is not None else ""
    return LoRAAdapter(name=name, path=path, rank=max_rank, modules=modules, weights=weights, digest=digest)


def _rank(value) -> int | None:
    """An adapter_config rank: an integer >= 1 (an integral float too, as JSON may write it); else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if value >= 1 else None


def _shown(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _pattern_value(module_name: str, patterns: dict, default):
    """(value, the pattern that gave it, or None): PEFT's rank_pattern/alpha_pattern lookup, a
    key matching the end of the module's dotted name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value, pattern
    return default, None


def _check_targets(targets) -> str | None:
    """What is wrong with adapter_config.json's target_modules, or None. PEFT writes a list of
    module names (a name matches a module whose dotted name ends with it), a regular expression
    for the whole dotted name, or "all-linear"; absent, the tensors alone decide."""
    if targets is None or targets == "all-linear":
        return None
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            return f"target_modules {_shown(targets)} is not a valid regular expression ({e})"
        return None
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        return (f"target_modules must be a list of module names or a regular expression, got "
                f"{_shown(targets)}")
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in LORA_MODULES]
    if unknown:
        return (f"target_modules {_shown(unknown)}: multilora serves LoRA on {', '.join(LORA_MODULES)} only "
                "(embed_tokens, lm_head and other modules are not supported)")
    return None


def _is_targeted(module_name: str, targets) -> bool:
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def _alpha_for(module_name: str, alpha_pattern: dict[str, float], default: float) -> float:
    # PEFT matches pattern keys against the end of the module's dotted name.
    for pattern, alpha in alpha_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            if isinstance(alpha, bool):
                raise ValueError(f"lora_alpha of {pattern!r} must be a number, got {alpha!r}")
            try:
                return float(alpha)
            except (TypeError, ValueError):
                raise ValueError(f"lora_alpha of {pattern!r} must be a number, got {alpha!r}") from None
    return default


def is_inside(path: str, root: str) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or below it."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real_root


@dataclass
class PackedAdapter:
    """An adapter laid out for the page pool: one virtual array per layer, cut into pages.

    data: [L, num_pages * page_size] in the serving dtype. For each module m of LORA_MODULES:
    ranks[m] (0 if absent), a_offsets[m] (A [r, in] row-major), b_offsets[m] (B^T [r, out]
    row-major), scales[m]. Layers where a module is absent or has a smaller rank hold zeros there.
    """

    name: str
    data: torch.Tensor
    num_pages: int
    ranks: dict[str, int]
    a_offsets: dict[str, int]
    b_offsets: dict[str, int]
    scales: dict[str, float]
    digest: str = ""  # of the files it was packed from ("" for one made in memory)

    @property
    def num_bytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def key(self) -> str:
        """What the GPU pool and the host tier know it by: its digest, else its name."""
        return self.digest or self.name


def read_adapter(name: str, path: str, model: ModelConfig, max_lora_rank: int, page_size: int, dtype: torch.dtype,
                 pin_memory: bool = False, root: str | None = None, salt: bytes | None = None,
                 upload: tuple[bytes, bytes] | None = None) -> PackedAdapter:
    """load_adapter, then pack_adapter: a checked adapter ready for the pool."""
    return pack_adapter(load_adapter(name, path, model, max_lora_rank, root, salt, upload), model, page_size, dtype,
                        pin_memory)


def pack_adapter(adapter: LoRAAdapter, model: ModelConfig, page_size: int, dtype: torch.dtype,
                 pin_memory: bool = False) -> PackedAdapter:
    """Raises AdapterLoadError if a weight is NaN or Inf, or becomes Inf in ``dtype``, or if the
    weight update it makes, scale * B @ A, can output values beyond what serving in ``dtype``
    holds (``_update_overflow``; checked once, on the packed buffer: a few passes over the bytes
    instead of small ops per tensor)."""
    shapes = model.projection_shapes()
    ranks, a_offsets, b_offsets, scales = {}, {}, {}, {}
    offset = 0
    for m in LORA_MODULES:
        present = [layer[m] for layer in adapter.weights if m in layer]
        ranks[m] = max((a.shape[0] for a, _, _ in present), default=0)
        if not ranks[m]:
            continue
        n_in, n_out = shapes[m]
        scales[m] = present[0][2]
        a_offsets[m] = offset
        offset += ranks[m] * n_in
        b_offsets[m] = offset
        offset += ranks[m] * n_out
    num_pages = max(1, -(-offset // page_size))
    data = torch.zeros(model.num_layers, num_pages * page_size, dtype=dtype, pin_memory=pin_memory)
    for m, r in ranks.items():
        if r:
            _pack_module(data, adapter.weights, m, r, shapes[m], a_offsets[m], b_offsets[m], scales[m])
    def fail(message: str) -> AdapterLoadError:
        logger.warning("LoRA adapter '%s' (%s) refused: %s", adapter.name, adapter.path, message)
        return AdapterLoadError(f"LoRA adapter '{adapter.name}': {message}")

    if not _all_finite(data):
        raise fail(_non_finite(adapter, dtype))
    packed = PackedAdapter(adapter.name, data, num_pages, ranks, a_offsets, b_offsets, scales, adapter.digest)
    overflow = _update_overflow(packed, shapes)
    if overflow:
        raise fail(overflow)
    return packed


def _pack_module(data: torch.Tensor, weights: list[dict], module: str, rank: int, shape: tuple[int, int],
                 a_off: int, b_off: int, scale: float) -> None:
    """Write one module's A and B^T of every layer into ``data`` [L, ...].

    A few grouped copies when every layer has the module at the same rank, scale and dtype (one
    torch call per tensor would take and give back the GIL hundreds of times per adapter, which
    stalls the engine's thread while loader threads run); else layer by layer."""
    n_in, n_out = shape
    per_layer = [layer.get(module) for layer in weights]
    a_dest = data[:, a_off:a_off + rank * n_in].view(len(weights), rank, n_in)
    b_dest = data[:, b_off:b_off + rank * n_out].view(len(weights), rank, n_out)
    if all(w is not None and w[0].shape[0] == rank and w[2] == scale and w[0].dtype == per_layer[0][0].dtype
           and w[1].dtype == per_layer[0][1].dtype for w in per_layer):
        a_dest.copy_(torch.stack([w[0] for w in per_layer]))
        b_dest.copy_(torch.stack([w[1] for w in per_layer]).transpose(1, 2))
        return
    for layer, w in enumerate(per_layer):
        if w is None:
            continue
        a, b, layer_scale = w
        r = a.shape[0]
        if layer_scale != scale:  # a layer-specific alpha: fold the ratio into B
            b = b.float() * (layer_scale / scale)
        a_dest[layer, :r] = a
        b_dest[layer, :r] = b.t()


# exponent bits of IEEE formats: all ones = Inf or NaN
_EXPONENT = {torch.float16: (torch.int16, 0x7C00), torch.bfloat16: (torch.int16, 0x7F80),
             torch.float32: (torch.int32, 0x7F800000)}


def _all_finite(data: torch.Tensor) -> bool:
    """torch.isfinite(data).all(), on the bits: half-precision math is slow on CPUs."""
    if data.dtype not in _EXPONENT:
        return bool(torch.isfinite(data).all())
    int_type, mask = _EXPONENT[data.dtype]
    # masked values are at most ``mask``, which they reach only for Inf or NaN; max() is one fast pass
    return data.numel() == 0 or int((data.view(int_type) & mask).max()) != mask


def serving_limit(dtype: torch.dtype) -> float:
    """The largest activation the residual stream can carry when serving in ``dtype``: the
    dtype's largest value, and at most the square root of float32's, since RMSNorm squares its
    input in float32 (1.8e19: for float32 and bfloat16 that is the tighter bound)."""
    return min(torch.finfo(dtype).max, math.sqrt(torch.finfo(torch.float32).max))


def _update_overflow(packed: PackedAdapter, shapes: dict[str, tuple[int, int]]) -> str | None:
    """Which layer and module has a weight update scale * B @ A whose output, for an input of
    entries in [-1, 1] (hidden states after RMSNorm are of that order), can go beyond
    ``serving_limit``, or None. That output is at most the update's largest row sum of
    magnitudes, ||scale * B @ A||_inf; a bound on an element alone misses an update of finite
    entries that sums past the limit over the input's width, or overflows the norm after it.

    ||B @ A||_inf <= ||B||_inf * ||A||_inf: two reductions per module over every layer at once.
    Only a layer whose bound is over is multiplied out (float32), so the check is exact and costs
    a matmul only for an adapter near the limit."""
    data = packed.data
    limit = serving_limit(data.dtype)
    num_layers = data.shape[0]
    for m, r in packed.ranks.items():
        if not r:
            continue
        n_in, n_out = shapes[m]
        a = data[:, packed.a_offsets[m]:packed.a_offsets[m] + r * n_in].view(num_layers, r, n_in)
        b_t = data[:, packed.b_offsets[m]:packed.b_offsets[m] + r * n_out].view(num_layers, r, n_out)
        a_norm = a.float().abs().sum(dim=2).amax(dim=1).double()  # [L]: max over ranks of sum over inputs
        b_norm = b_t.float().abs().sum(dim=1).amax(dim=1).double()  # [L]: max over outputs of sum over ranks
        bound = (abs(packed.scales[m]) * a_norm * b_norm).tolist()
        for layer in (i for i, value in enumerate(bound) if not value <= limit):
            update = b_t[layer].float().t() @ a[layer].float()  # [n_out, n_in]
            largest = abs(packed.scales[m]) * update.abs().sum(dim=1).max().item()
            if not largest <= limit:  # NaN too: Inf * 0 in the float32 product
                dtype = str(data.dtype).removeprefix("torch.")
                return (f"layer {layer} {m}: scale * lora_B @ lora_A gives outputs up to {largest:.3g} for inputs "
                        f"of magnitude 1, beyond {limit:.3g}, the largest activation {dtype} serving holds "
                        "(lora_alpha, lora_A and lora_B are too large together; rescale them)")
    return None


def _non_finite(adapter: LoRAAdapter, dtype: torch.dtype) -> str:
    """Which weight is NaN or Inf, or overflows ``dtype`` (the slow search, after a failed check)."""
    for layer, modules in enumerate(adapter.weights):
        for module, (a, b, _) in modules.items():
            for label, t in (("lora_A", a), ("lora_B", b)):
                if not torch.isfinite(t).all():
                    return f"layer {layer} {module} {label}: weights contain NaN or Inf"
                if not torch.isfinite(t.to(dtype)).all():
                    return (f"layer {layer} {module} {label}: weights up to {t.abs().max().item():.3g} overflow "
                            f"{str(dtype).removeprefix('torch.')} (serve with dtype float32 or bfloat16, or rescale)")
    return "weights contain NaN or Inf"
