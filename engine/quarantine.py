"""Adapters quarantined at run time: one of their requests made non-finite logits (NaN or Inf),
which no load check can rule out for every input. Their later requests are refused with a
message that names the adapter, says why and how to clear it. Requests are checked in their
own threads and adapters quarantined by the engine loop, hence the lock."""
from __future__ import annotations

import threading
import time

from engine.errors import AdapterQuarantinedError

HOW_TO_CLEAR = ("its requests are refused until the adapter is reloaded through the admin model "
                "multilora_adapters ({\"action\": \"reload\"}), the model is reloaded (Triton's model "
                "repository API: POST /v2/repository/models/multilora/load) or the server restarted; fix or "
                "replace the adapter's files first")


class AdapterQuarantine:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reasons: dict[str, str] = {}

    def add(self, name: str, reason: str) -> None:
        """Quarantine ``name``; the first reason is kept."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        with self._lock:
            self._reasons.setdefault(name, f"{reason} ({stamp})")

    def check(self, name: str) -> None:
        """Raise AdapterQuarantinedError if ``name`` is quarantined."""
        with self._lock:
            reason = self._reasons.get(name)
        if reason is not None:
            raise AdapterQuarantinedError(f"LoRA adapter '{name}' is quarantined: {reason}; {HOW_TO_CLEAR}")

    def clear(self, name: str) -> bool:
        """Serve ``name`` again; whether it was quarantined."""
        with self._lock:
            return self._reasons.pop(name, None) is not None

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._reasons)
