"""Start Triton Inference Server on the multilora model repository (``multilora-serve``).

Kept apart from ``engine/``: it imports neither torch nor the engine, so starting a server stays
cheap. See ``multilora_serve.launcher``.
"""
