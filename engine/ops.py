"""The op boundary of the model: Triton kernels on CUDA, their pure-torch twins elsewhere.

The engine calls only these. ``Ops(use_kernels=False)`` forces the references on CUDA too
(engine.json ``"kernels": "reference"``), for debugging.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernels import reference, tiles

if TYPE_CHECKING:
    from engine.lora_batch import GroupMeta, LoRABatch
    from engine.model import AttentionMetadata


def to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of host data on ``device`` without waiting for the device: on CUDA through pinned
    memory and an ordered copy, so a step can be queued while the one before still runs (a plain
    ``torch.tensor(..., device=cuda)`` synchronises with the stream)."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


class Ops:
    def __init__(self, use_kernels: bool) -> None:
        self.use_kernels = use_kernels
        self.overlap_lora = True  # LoRA beside the base GEMM on a stream of its own (lora_stream)
        self.defer_lora = True  # LoRA terms added by the op after the projection (LoRABatch.linear)
        # prefill-sized steps: the LoRA term as the base GEMM's addend (linear_plus) rather than added
        # into its output; the kernels only, so the references keep PEFT's rounding (LoRABatch.linear)
        self.lora_into_gemm = use_kernels
        # SMs that a base GEMM beside the LoRA stream leaves free for the LoRA kernels (gemm_beside_lora):
        # None takes tiles.lora_sm_carveout's choice per step size, an int overrides it (bench/engine.py)
        self.lora_sm_carveout: int | None = None
        # the Triton kernels after a kernel of the same stream start while it ends, and an expand right after
        # its shrink while the shrink runs (programmatic dependent launch, kernels/launch.py), where the
        # device has it; off for comparison (bench/engine.py --pdl)
        self.pdl = True
        self._lora_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._elementwise = reference  # the element-wise ops: these twins or kernels.elementwise (same API)
        if use_kernels:  # Triton modules are imported only when used (CPU runs stay Triton-free)
            from kernels import elementwise, lora_expand, lora_fused, lora_meta, lora_shrink, paged_attention
            self._shrink, self._expand = lora_shrink.lora_shrink, lora_expand.lora_expand
            self._fused = lora_fused.lora_fused
            self._attention, self._meta = paged_attention.attention, lora_meta.LoRAStepMeta
            self._elementwise = elementwise

    def _launch(self) -> dict:
        """The kernels' launch options (their twins take none)."""
        return {"pdl": self.pdl} if self.use_kernels else {}

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def linear_plus(x: torch.Tensor, weight: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
        """x W^T + addend in one GEMM, written over the addend [T, N] (which the caller gives up): cuBLAS
        reads it in the epilogue (beta = 1) and rounds the sum once, instead of a second pass over the
        output. Into a new tensor, addmm would first copy the addend there (one more pass)."""
        return torch.addmm(addend, x, weight.t(), out=addend)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """residual + (x + delta), then normalise; returns (normed, new residual). The ``delta`` of
        these three ops is the LoRA term of the projection that made their input, or None."""
        return self._elementwise.fused_add_rms_norm(x, residual, weight, eps, delta, **self._launch())

    def rotary_and_write_kv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_size: int,
                            kv_size: int, num_heads: int, num_kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                            delta: torch.Tensor | None = None) -> torch.Tensor:
        """Rotary on q and k of qkv + delta, k and v into their cache slots; returns rotated q [T, H, D]."""
        return self._elementwise.rotary_and_write_kv(qkv, cos, sin, q_size, kv_size, num_heads, num_kv_heads,
                                                     head_dim, k_cache, v_cache, slot_mapping, delta,
                                                     **self._launch())

    def silu_and_mul(self, gate_up: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """silu(gate) * up of gate_up + delta, [T, 2I] = [gate | up] -> [T, I]."""
        return self._elementwise.silu_and_mul(gate_up, delta, **self._launch())

    def lora_stream(self, device: torch.device) -> "torch.cuda.Stream | None":
        """The stream that LoRA kernels run on beside the base model's GEMM (engine/lora_batch.py):
        one per device, of the highest priority, so that its small kernels are scheduled as SMs
        free up; None without the Triton kernels on CUDA, or with ``overlap_lora`` off."""
        if not (self.use_kernels and self.overlap_lora and device.type == "cuda"):
            return None
        stream = self._lora_streams.get(device)
        if stream is None:
            stream = self._lora_streams[device] = torch.cuda.Stream(device, priority=-1)  # torch's high priority
        return stream

    @contextlib.contextmanager
    def gemm_beside_lora(self, device: torch.device, num_tokens: int):
        """Around a base GEMM of ``num_tokens`` rows that runs beside the LoRA stream (captured in a
        decode graph): cuBLASLt with a target of all SMs but a carveout (``lora_sm_carveout``, else
        tiles.lora_sm_carveout). A cuBLAS GEMM at decode sizes takes nearly every SM with one CTA that
        fills its shared memory and registers, so LoRA programs launched beside it wait for SMs until
        it ends; with SMs carved out they run beside it. A carveout of 0 changes nothing, nor does a
        torch without the (experimental) carveout."""
        carveout = tiles.lora_sm_carveout(num_tokens) if self.lora_sm_carveout is None else self.lora_sm_carveout
        if not carveout or device.type != "cuda" or not hasattr(torch._C, "_set_sm_carveout_experimental"):
            yield
            return
        backend = torch.backends.cuda.preferred_blas_library()
        previous = torch._C._get_sm_carveout_experimental()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        torch._C._set_sm_carveout_experimental(carveout)
        try:
            yield
        finally:
            torch._C._set_sm_carveout_experimental(previous)
            torch.backends.cuda.preferred_blas_library(backend)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, attn: "AttentionMetadata",
                  scale: float, sliding_window: int | None) -> torch.Tensor:
        if self.use_kernels:
            return self._attention(q, k_cache, v_cache, attn.block_tables, attn.seq_lens, attn.query_start_loc,
                                   scale, sliding_window, attn.max_query_len, max_seq_len=attn.max_seq_len,
                                   pdl=self.pdl)
        return reference.paged_attention(q, k_cache, v_cache, attn.block_tables, attn.seq_lens,
                                         attn.query_start_loc, scale, sliding_window)

    def lora_meta(self, token_slots: torch.Tensor, num_slots: int):
        """Per-step metadata of the LoRA kernels (None for the references)."""
        return self._meta.build(token_slots, num_slots) if self.use_kernels else None

    def fuses_lora(self, kernel_meta) -> bool:
        """Whether this step's LoRA runs as one lora_fused launch per projection group (the kernels,
        for the tile classes kernels/tiles.py sends there) rather than lora_shrink + lora_expand."""
        return self.use_kernels and tiles.lora_fused(kernel_meta.block_m)

    def lora_fused(self, x: torch.Tensor, pool: torch.Tensor, layer: int, lora: "LoRABatch", group: "GroupMeta",
                   y: torch.Tensor) -> None:
        """y[t, off_p:off_p+N_p] += scale_p (x[t] A_p^T) B_p^T through the page tables, in one launch
        (z stays on chip). x: [T, K]; y: [T, N_total] the fused projection's output."""
        self._fused(x, pool, layer, lora.token_slots, lora.page_tables, group.ranks, group.a_offsets, group.b_offsets,
                    group.scales, y, group.out_offsets, group.out_sizes, group.max_rank, meta=lora.kernel_meta)

    def lora_shrink(self, x: torch.Tensor, pool: torch.Tensor, layer: int, lora: "LoRABatch", group: "GroupMeta",
                    z: torch.Tensor, z_zeroed: bool = False) -> None:
        """z[t, p, :r] = x[t] A_p^T through the adapters' page tables (BGMV/SGMV shrink).

        x: [T, K]; pool: [P, L, PAGE]; lora: the step's token slots and page tables; group: the
        projection group's tables; z: [T, NPROJ, R_MAX] float32, written; z_zeroed: z holds zeros
        where the shrink writes (left so by lora_expand's zero_after), so no memset first."""
        args = (x, pool, layer, lora.token_slots, lora.page_tables, group.ranks, group.a_offsets, z)
        if self.use_kernels:
            self._shrink(*args, meta=lora.kernel_meta, z_zeroed=z_zeroed)
        else:
            reference.lora_shrink(*args, z_zeroed=z_zeroed)

    def lora_expand(self, z: torch.Tensor, pool: torch.Tensor, layer: int, lora: "LoRABatch", group: "GroupMeta",
                    y: torch.Tensor, accumulate: bool = True, zero_after: torch.Tensor | None = None,
                    after_shrink: bool = False) -> None:
        """y[t, off_p:off_p+N_p] += scale_p z[t, p, :r] B_p^T through the page tables (expand).

        z: [T, NPROJ, R_MAX] float32 from lora_shrink; y: [T, N_total] the fused projection's
        output, added to in place at the group's out_offsets; with ``accumulate`` False, a delta
        buffer that gets scale_p z B_p^T itself (zeros for a module the adapter lacks);
        zero_after: another z buffer, zeroed where this expand reads z (for the next shrink into it);
        after_shrink: the launch just before this one on the current stream is the shrink of z (then the
        kernels may start the expand early: lora_expand's pdl)."""
        args = (z, pool, layer, lora.token_slots, lora.page_tables, group.ranks, group.b_offsets, group.scales, y,
                group.out_offsets, group.out_sizes)
        if self.use_kernels:
            self._expand(*args, meta=lora.kernel_meta, accumulate=accumulate, zero_after=zero_after,
                         pdl=after_shrink and self.pdl)
        else:
            reference.lora_expand(*args, accumulate=accumulate, zero_after=zero_after)
