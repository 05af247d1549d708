"""Tenants: which caller may use which adapters, from an optional ``tenants.json`` next to
engine.json. No torch: the Triton stubs import this.

```json
{"admin_token_sha256": "<hex sha256 of the admin token>",
 "tenants": {"acme": {"token_sha256": "<hex>", "adapters": ["acme-*", "shared"], "weight": 1.0,
                      "base_model": true}}}
```
- A request carries its token in the ``authorization`` header, ``Bearer <token>`` (Triton forwards
  it to the model as a request parameter). Only the token's sha256 is stored.
- ``adapters``: names or ``fnmatch`` patterns (``*``, ``?``, ``[...]``). A request for any other
  adapter is answered exactly as for an unknown one (NOT_FOUND, the same message), so a tenant
  cannot learn which names other tenants use.
- ``base_model`` (default true): whether the tenant may send requests without an adapter.
- ``weight`` (default 1): the tenant's share for fair scheduling (read and checked, not used yet).
- ``admin_token_sha256`` (optional): a token for the adapter admin model, besides the environment
  variable MULTILORA_ADMIN_TOKEN.
Without the file every request is served as before (no token needed).
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass

from engine.errors import UnauthorizedError, adapter_not_found

TENANTS_FILE = "tenants.json"
ADMIN_TOKEN_ENV = "MULTILORA_ADMIN_TOKEN"
AUTHORIZATION = "authorization"  # the forwarded header, a request parameter
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header value, None if absent or malformed."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True)
class Tenant:
    name: str
    token_sha256: str
    adapters: tuple[str, ...]
    weight: float = 1.0
    base_model: bool = True

    def allows(self, lora_name: str | None) -> bool:
        if not lora_name:
            return self.base_model
        return any(fnmatch.fnmatchcase(lora_name, pattern) for pattern in self.adapters)


@dataclass(frozen=True)
class TenantRules:
    tenants: tuple[Tenant, ...]
    admin_token_sha256: str | None = None

    @classmethod
    def from_file(cls, path: str) -> "TenantRules | None":
        """The rules of ``path``, None if there is no such file; ValueError naming what is wrong."""
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                raw = json.load(f)
        except (ValueError, OSError) as error:
            raise ValueError(f"{path}: not readable JSON ({error})") from error
        return cls.from_dict(raw, path)

    @classmethod
    def from_dict(cls, raw: object, source: str = TENANTS_FILE) -> "TenantRules":
        if not isinstance(raw, dict) or not isinstance(raw.get("tenants", {}), dict):
            raise ValueError(f'{source}: expected {{"tenants": {{name: {{"token_sha256", "adapters", '
                             '"weight"}}}}}}')
        unknown = set(raw) - {"tenants", "admin_token_sha256"}
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}")
        admin = raw.get("admin_token_sha256")
        if admin is not None and not (isinstance(admin, str) and _HEX64.match(admin.lower())):
            raise ValueError(f"{source}: admin_token_sha256 must be 64 hex digits (sha256 of the token)")
        tenants, seen = [], set()
        for name, spec in raw.get("tenants", {}).items():
            where = f"{source}: tenant {name!r}"
            if not isinstance(spec, dict):
                raise ValueError(f"{where}: expected an object")
            unknown = set(spec) - {"token_sha256", "adapters", "weight", "base_model"}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
            digest = spec.get("token_sha256")
            if not (isinstance(digest, str) and _HEX64.match(digest.lower())):
                raise ValueError(f"{where}: token_sha256 must be 64 hex digits (sha256 of the token)")
            if digest.lower() in seen:
                raise ValueError(f"{where}: token_sha256 is also another tenant's")
            seen.add(digest.lower())
            adapters = spec.get("adapters", [])
            if not (isinstance(adapters, list) and all(isinstance(a, str) and a for a in adapters)):
                raise ValueError(f"{where}: adapters must be a list of names or glob patterns")
            weight = spec.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise ValueError(f"{where}: weight must be a positive number")
            base_model = spec.get("base_model", True)
            if not isinstance(base_model, bool):
                raise ValueError(f"{where}: base_model must be true or false")
            tenants.append(Tenant(name, digest.lower(), tuple(adapters), float(weight), base_model))
        return cls(tuple(tenants), admin.lower() if admin else None)

    def tenant_for(self, authorization: str | None) -> Tenant:
        """The tenant of a request's ``authorization`` value; UnauthorizedError without a valid one."""
        token = bearer_token(authorization)
        if token is not None:
            digest = token_sha256(token)
            for tenant in self.tenants:
                if hmac.compare_digest(digest, tenant.token_sha256):
                    return tenant
        raise UnauthorizedError("authorization: this server serves tenants; send the header "
                                "'authorization: Bearer <your token>' with a valid token")

    def check(self, authorization: str | None, lora_name: str | None) -> Tenant:
        """Raise unless the request's token may use ``lora_name`` (None: the base model). An adapter
        outside the tenant's list is refused as an unknown one."""
        tenant = self.tenant_for(authorization)
        if not tenant.allows(lora_name):
            if lora_name:
                raise adapter_not_found(lora_name)
            raise UnauthorizedError("lora_name: this token may use only its adapters, not the base model; "
                                    "name one of them in lora_name")
        return tenant


def rules_next_to(engine_json: str) -> TenantRules | None:
    return TenantRules.from_file(os.path.join(os.path.dirname(os.path.abspath(engine_json)), TENANTS_FILE))


def admin_token_digests(rules: TenantRules | None, environ: dict | None = None) -> tuple[str, ...]:
    """The sha256 of each configured admin token: MULTILORA_ADMIN_TOKEN, tenants.json's."""
    environ = os.environ if environ is None else environ
    digests = []
    token = environ.get(ADMIN_TOKEN_ENV)
    if token:
        digests.append(token_sha256(token))
    if rules is not None and rules.admin_token_sha256:
        digests.append(rules.admin_token_sha256)
    return tuple(digests)


def is_admin(authorization: str | None, digests: tuple[str, ...]) -> bool:
    token = bearer_token(authorization)
    if token is None:
        return False
    digest = token_sha256(token)
    return any(hmac.compare_digest(digest, d) for d in digests)


def find_authorization(parameters: dict) -> str | None:
    """The forwarded ``authorization`` header among a request's parameters (HTTP keeps the case
    the client sent; gRPC metadata is lower case)."""
    for key, value in parameters.items():
        if isinstance(key, str) and key.lower() == AUTHORIZATION and isinstance(value, str):
            return value
    return None
