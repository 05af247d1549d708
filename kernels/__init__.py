"""Triton kernels of the engine and their pure-torch twins (reference.py).

Entry points (CUDA tensors): lora_fused.lora_fused (the engine's LoRA: one launch per projection
group), lora_shrink.lora_shrink + lora_expand.lora_expand (the same through a z buffer), all with
one lora_meta.LoRAStepMeta built per step; paged_attention.attention. Importing this package
imports no Triton module, so the CPU path (reference.py) and the interpreter tests, which must
set TRITON_INTERPRET before Triton loads, stay free to choose.
"""
