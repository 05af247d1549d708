"""The actions of the adapter admin model (model ``multilora_adapters``), run in the engine process.

A request is a JSON object:
- ``{"action": "list"}`` -> ``{"adapters": [{"name", "digest", "rank", "target_modules", "tier",
  "bytes", "in_use"}]}`` (tier: gpu, host or disk; digest, rank and target_modules are null for
  a name never read);
- ``{"action": "load", "lora_name": N, "lora_path": P}``: serve the PEFT directory P (under one
  of ``lora_roots``) as N; without ``lora_path``, read N from multi_lora.json or a root (also
  after an unload); with the upload inputs ``adapter_config`` and ``adapter_weights``, register
  the adapter sent;
- ``{"action": "reload", "lora_name": N}``: read N's files again (or take new upload inputs);
  requests admitted before keep the version they got, later ones get the new one;
- ``{"action": "unload", "lora_name": N}``: running requests finish, new ones get NOT_FOUND, and
  the version's pool pages are freed when the last one ends.
Every action but ``list`` needs the admin token (``authorization: Bearer <token>``); with no admin
token configured only ``list`` is answered. ``list`` shows every adapter to the admin token;
with tenants configured another caller sees only its tenant's adapters, and without tenants and
without an admin token anyone may list.

Errors are engine errors, which the admin model maps to Triton codes: a malformed request,
a bad token or a bad adapter INVALID_ARG, an unknown name NOT_FOUND, a name already served
otherwise ALREADY_EXISTS, an action this server does not allow UNSUPPORTED.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from engine.adapter_fleet import adapter_rows, evict_retired
from engine.errors import InvalidRequestError, UnauthorizedError, UnsupportedActionError
from engine.request_checks import check_adapter_name, parse_json
from engine.tenants import TenantRules, admin_token_digests, is_admin

logger = logging.getLogger("multilora")
ACTIONS = ("list", "load", "reload", "unload")
_FIELDS = {"list": set(), "load": {"lora_name", "lora_path"}, "reload": {"lora_name"}, "unload": {"lora_name"}}
Reply = Callable[[dict | None, Exception | None], None]


class AdapterAdmin:
    """Runs admin actions against an AsyncEngine: ``list`` on the engine loop's thread (it reads
    the pool), the others on its adapter loader threads (they read from disk), then frees the
    pool pages of retired versions on the loop. ``reply`` is called once per request, from
    whichever thread finished it."""

    def __init__(self, engine, tenants: TenantRules | None, environ: dict | None = None) -> None:
        self.engine = engine
        self.tenants = tenants
        self.admin_digests = admin_token_digests(tenants, environ)

    def handle(self, text: str, authorization: str | None, adapter_config: bytes | None,
               adapter_weights: bytes | None, reply: Reply) -> None:
        try:
            action, fields, upload = self._parse(text, adapter_config, adapter_weights)
            admin = self._authorize(action, authorization)
            visible = None if admin or self.tenants is None else self.tenants.tenant_for(authorization)
        except Exception as error:
            reply(None, error)
            return
        if action == "list":
            self.engine.call_in_loop(lambda llm: {"adapters": [row for row in adapter_rows(llm)
                                                               if visible is None or visible.allows(row["name"])]},
                                     reply)
            return
        self.engine.run_in_background(lambda: self._mutate(action, fields, upload), self._then_evict(reply))

    def _then_evict(self, reply: Reply) -> Reply:
        def done(result: dict | None, error: Exception | None) -> None:
            if error is None:  # versions retired by this action leave the pool once unused
                self.engine.call_in_loop(evict_retired, lambda _r, _e: None)
            reply(result, error)
        return done

    def _parse(self, text: str, adapter_config: bytes | None,
               adapter_weights: bytes | None) -> tuple[str, dict, tuple[bytes, bytes] | None]:
        request = parse_json(text, "request")
        if not isinstance(request, dict):
            raise InvalidRequestError('request: must be a JSON object such as {"action": "list"}')
        action = request.get("action")
        if action not in ACTIONS:
            raise InvalidRequestError(f"request: action must be one of {', '.join(ACTIONS)}, got {action!r}")
        unknown = set(request) - {"action"} - _FIELDS[action]
        if unknown:
            raise InvalidRequestError(f"request: action {action} takes no {', '.join(sorted(unknown))} (it takes "
                                      f"{', '.join(sorted(_FIELDS[action])) or 'nothing else'})")
        fields = {k: v for k, v in request.items() if k != "action"}
        if action != "list":
            name = fields.get("lora_name")
            if not isinstance(name, str):
                raise InvalidRequestError(f"request: action {action} needs lora_name, a string")
            check_adapter_name(name, "request.lora_name")
        if "lora_path" in fields and not (isinstance(fields["lora_path"], str) and fields["lora_path"]):
            raise InvalidRequestError("request: lora_path must be a non-empty string (a PEFT adapter directory)")
        upload = None
        if (adapter_config is None) != (adapter_weights is None):
            raise InvalidRequestError("an upload needs both inputs adapter_config and adapter_weights")
        if adapter_config is not None:
            if action not in ("load", "reload"):
                raise InvalidRequestError(f"inputs adapter_config and adapter_weights go with action load or "
                                          f"reload, not {action}")
            if "lora_path" in fields:
                raise InvalidRequestError("request: lora_path and the upload inputs exclude each other")
            upload = (adapter_config, adapter_weights)
        return action, fields, upload

    def _authorize(self, action: str, authorization: str | None) -> bool:
        """Whether the caller holds the admin token; raises for an action it may not run."""
        admin = is_admin(authorization, self.admin_digests)
        if action == "list":
            return admin
        if not self.admin_digests:
            raise UnsupportedActionError(
                f"action {action}: this server has no admin token (set the environment variable "
                "MULTILORA_ADMIN_TOKEN when starting it, or admin_token_sha256 in tenants.json); only "
                "action list is available")
        if not admin:
            raise UnauthorizedError(f"action {action} needs the header 'authorization: Bearer <admin token>' "
                                    "with the server's admin token")
        return True

    def _mutate(self, action: str, fields: dict, upload: tuple[bytes, bytes] | None) -> dict[str, Any]:
        result = self._apply(action, fields, upload)
        # a quarantine (engine/quarantine.py) holds for the files that made non-finite logits: a
        # successful load, reload or unload of the name replaces them, and lifts it
        if self.engine.engine.quarantine.clear(fields["lora_name"]):
            logger.info("LoRA adapter '%s': quarantine lifted by %s", fields["lora_name"], action)
        return result

    def _apply(self, action: str, fields: dict, upload: tuple[bytes, bytes] | None) -> dict[str, Any]:
        lora = self.engine.engine.lora
        name = fields["lora_name"]
        start = time.monotonic()
        if action == "unload":
            digest = lora.unload(name)
            logger.info("LoRA adapter '%s' unloaded (digest %s)", name, digest)
            return {"name": name, "digest": digest, "in_use": lora.refs(digest) if digest else 0}
        if action == "reload":
            if upload is not None:
                previous = _digest_of(lora, name)
                packed = lora.upload(name, upload[0], upload[1], replace=True)
            else:
                previous, packed = lora.reload(name)
            return {"name": name, "digest": packed.digest, "previous_digest": previous,
                    "changed": previous != packed.digest, "seconds": round(time.monotonic() - start, 6)}
        if upload is not None:
            packed = lora.upload(name, upload[0], upload[1])
        else:
            packed = lora.load(name, fields.get("lora_path"))
        return {"name": name, "digest": packed.digest, "rank": max(packed.ranks.values(), default=0),
                "target_modules": [m for m, r in packed.ranks.items() if r], "bytes": packed.num_bytes,
                "seconds": round(time.monotonic() - start, 6)}


def _digest_of(lora, name: str) -> str | None:
    for row_name, entry, _packed, _refs in lora.entries():
        if row_name == name and entry is not None:
            return entry.digest
    return None
