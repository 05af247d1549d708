"""The admin actions (engine/adapter_admin.py) on a real engine of the demo model, and the tenant
rules (engine/tenants.py): tokens, refusals, and the Triton code of every error."""
import hashlib
import json
import os
import threading

import pytest

from engine.adapter_admin import AdapterAdmin
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.errors import (AdapterExistsError, AdapterLoadError, AdapterNotFoundError, EngineOverloadedError,
                           EngineUnavailableError, InvalidRequestError, RequestAbortedError, UnauthorizedError,
                           UnsupportedActionError, triton_code)
from engine.tenants import TenantRules, bearer_token, find_authorization

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "demo")
TOKEN = "the-admin-token"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def engine():
    engine = AsyncEngine(EngineConfig(model=os.path.join(DEMO, "base"), lora_roots=[os.path.join(DEMO, "adapters")]),
                         {"upper": os.path.join(DEMO, "adapters", "upper")})
    engine.start()
    yield engine
    engine.shutdown()


def call(admin: AdapterAdmin, request, token: str | None = TOKEN, config=None, weights=None):
    done = threading.Event()
    answer = []

    def reply(result, error):
        answer.append((result, error))
        done.set()

    text = request if isinstance(request, str) else json.dumps(request)
    admin.handle(text, f"Bearer {token}" if token else None, config, weights, reply)
    assert done.wait(30)
    return answer[0]


def test_without_an_admin_token_only_list_is_answered(engine):
    admin = AdapterAdmin(engine, None, environ={})
    result, error = call(admin, {"action": "list"}, token=None)
    assert error is None and [row["name"] for row in result["adapters"]] == ["upper"]
    result, error = call(admin, {"action": "load", "lora_name": "reverse"}, token="anything")
    assert isinstance(error, UnsupportedActionError) and triton_code(error)[0] == "UNSUPPORTED"
    assert "MULTILORA_ADMIN_TOKEN" in str(error) and "only action list" in str(error)


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
def test_admin_actions_need_the_admin_token(engine, token):
    admin = AdapterAdmin(engine, None, environ={"MULTILORA_ADMIN_TOKEN": TOKEN})
    result, error = call(admin, {"action": "unload", "lora_name": "upper"}, token=token)
    assert result is None and isinstance(error, UnauthorizedError) and triton_code(error)[0] == "INVALID_ARG"
    assert str(error) == ("action unload needs the header 'authorization: Bearer <admin token>' with the "
                          "server's admin token")


def test_the_admin_token_may_come_from_tenants_json(engine):
    rules = TenantRules.from_dict({"admin_token_sha256": sha("from-file"), "tenants": {}})
    admin = AdapterAdmin(engine, rules, environ={})
    result, error = call(admin, {"action": "load", "lora_name": "reverse"}, token="from-file")
    assert error is None and result["name"] == "reverse" and len(result["digest"]) == 64
    result, error = call(admin, {"action": "list"}, token="from-file")
    rows = {row["name"]: row for row in result["adapters"]}
    assert rows["reverse"]["tier"] == "host" and rows["reverse"]["digest"] == call(
        admin, {"action": "reload", "lora_name": "reverse"}, token="from-file")[0]["digest"]


@pytest.mark.parametrize("request_text, message", [
    ("{not json", "request is not valid JSON"),
    ("[1, 2]", "request: must be a JSON object"),
    ('{"action": "fly"}', "action must be one of list, load, reload, unload, got 'fly'"),
    ('{"action": "load"}', "action load needs lora_name, a string"),
    ('{"action": "unload", "lora_name": 7}', "action unload needs lora_name, a string"),
    ('{"action": "load", "lora_name": "a/b"}', "not a plain adapter name"),
    ('{"action": "list", "lora_name": "x"}', "action list takes no lora_name"),
    ('{"action": "load", "lora_name": "x", "lora_path": ""}', "lora_path must be a non-empty string"),
    ("[" * 100000, "nested too deeply"),
])
def test_malformed_requests_say_what_to_fix(engine, request_text, message):
    admin = AdapterAdmin(engine, None, environ={"MULTILORA_ADMIN_TOKEN": TOKEN})
    result, error = call(admin, request_text)
    assert result is None and isinstance(error, InvalidRequestError) and message in str(error)


def test_upload_inputs_go_together_and_with_load_or_reload(engine):
    admin = AdapterAdmin(engine, None, environ={"MULTILORA_ADMIN_TOKEN": TOKEN})
    config = open(os.path.join(DEMO, "adapters", "rot13", "adapter_config.json"), "rb").read()
    weights = open(os.path.join(DEMO, "adapters", "rot13", "adapter_model.safetensors"), "rb").read()
    assert "both inputs" in str(call(admin, {"action": "load", "lora_name": "u"}, config=config)[1])
    assert "go with action load or reload" in str(call(admin, {"action": "unload", "lora_name": "u"},
                                                       config=config, weights=weights)[1])
    assert "exclude each other" in str(call(admin, {"action": "load", "lora_name": "u", "lora_path": "/x"},
                                            config=config, weights=weights)[1])
    result, error = call(admin, {"action": "load", "lora_name": "u"}, config=config, weights=weights)
    assert error is None and result["target_modules"] == ["gate_proj", "up_proj", "down_proj"]
    again, error = call(admin, {"action": "reload", "lora_name": "u"}, config=config, weights=weights)
    assert error is None and not again["changed"] and again["digest"] == result["digest"]
    other = open(os.path.join(DEMO, "adapters", "upper", "adapter_model.safetensors"), "rb").read()
    other_config = open(os.path.join(DEMO, "adapters", "upper", "adapter_config.json"), "rb").read()
    _, error = call(admin, {"action": "load", "lora_name": "u"}, config=other_config, weights=other)
    assert isinstance(error, AdapterExistsError) and triton_code(error)[0] == "ALREADY_EXISTS"
    replaced, error = call(admin, {"action": "reload", "lora_name": "u"}, config=other_config, weights=other)
    assert error is None and replaced["changed"] and replaced["previous_digest"] == result["digest"]


def test_a_tenant_lists_only_its_adapters(engine):
    rules = TenantRules.from_dict({"tenants": {"t": {"token_sha256": sha("t-token"), "adapters": ["upp*"]}}})
    admin = AdapterAdmin(engine, rules, environ={"MULTILORA_ADMIN_TOKEN": TOKEN})
    result, error = call(admin, {"action": "list"}, token="t-token")
    assert error is None and [row["name"] for row in result["adapters"]] == ["upper"]
    result, error = call(admin, {"action": "list"}, token=None)
    assert result is None and isinstance(error, UnauthorizedError)
    result, error = call(admin, {"action": "list"}, token=TOKEN)
    assert "upper" in [row["name"] for row in result["adapters"]] and len(result["adapters"]) > 1


def test_tenant_rules_check_tokens_and_patterns():
    rules = TenantRules.from_dict({"tenants": {
        "a": {"token_sha256": sha("a"), "adapters": ["a-*", "shared"], "weight": 2},
        "b": {"token_sha256": sha("b").upper(), "adapters": ["b-[0-9]"], "base_model": False}}})
    assert rules.check("Bearer a", "a-x").name == "a" and rules.check("bearer  a ", "shared").weight == 2.0
    assert rules.check("Bearer a", None).name == "a" and rules.check("Bearer b", "b-1").name == "b"
    for authorization in (None, "", "a", "Basic a", "Bearer", "Bearer wrong"):
        with pytest.raises(UnauthorizedError, match="valid token"):
            rules.check(authorization, "a-x")
    for authorization, name in (("Bearer a", "b-1"), ("Bearer b", "a-x"), ("Bearer b", "b-10")):
        with pytest.raises(AdapterNotFoundError) as caught:
            rules.check(authorization, name)
        assert str(caught.value) == f"LoRA adapter '{name}' is not known"  # as an unknown adapter
    with pytest.raises(UnauthorizedError, match="not the base model"):
        rules.check("Bearer b", None)
    assert bearer_token("Bearer  tok ") == "tok" and bearer_token("Token tok") is None
    assert find_authorization({"Authorization": "Bearer x", "lora_name": "y"}) == "Bearer x"
    assert find_authorization({"authorization": 5}) is None


@pytest.mark.parametrize("raw, message", [
    ([], "expected"),
    ({"tenants": {"a": {"token_sha256": "12"}}}, "token_sha256 must be 64 hex digits"),
    ({"tenants": {"a": {"token_sha256": sha("x"), "adapters": "a-*"}}}, "adapters must be a list"),
    ({"tenants": {"a": {"token_sha256": sha("x"), "weight": 0}}}, "weight must be a positive number"),
    ({"tenants": {"a": {"token_sha256": sha("x"), "color": 1}}}, "unknown keys"),
    ({"tenants": {"a": {"token_sha256": sha("x")}, "b": {"token_sha256": sha("x")}}}, "also another tenant's"),
    ({"tenants": {}, "admin_token_sha256": "nothex"}, "admin_token_sha256 must be 64 hex digits"),
    ({"tenant": {}}, "unknown keys"),
])
def test_a_malformed_tenants_json_names_what_is_wrong(raw, message):
    with pytest.raises(ValueError, match=message):
        TenantRules.from_dict(raw)


def test_every_error_has_its_triton_code():
    cases = {AdapterNotFoundError: "NOT_FOUND", InvalidRequestError: "INVALID_ARG", AdapterLoadError: "INVALID_ARG",
             UnauthorizedError: "INVALID_ARG", EngineOverloadedError: "UNAVAILABLE",
             EngineUnavailableError: "UNAVAILABLE", RequestAbortedError: "CANCELLED",
             AdapterExistsError: "ALREADY_EXISTS", UnsupportedActionError: "UNSUPPORTED", RuntimeError: "INTERNAL"}
    assert {cls: triton_code(cls("x"))[0] for cls in cases} == cases


def test_a_reload_lifts_the_adapters_quarantine(engine):
    """A quarantine (non-finite logits, tests/unit/test_non_finite_logits.py) holds for the files
    that made it: reloading the name through the admin model serves it again; a failed action
    leaves it quarantined."""
    admin = AdapterAdmin(engine, None, environ={"MULTILORA_ADMIN_TOKEN": TOKEN})
    quarantine = engine.engine.quarantine
    quarantine.add("upper", "a request on it made non-finite logits")
    with pytest.raises(AdapterLoadError, match="'upper' is quarantined.*multilora_adapters"):
        quarantine.check("upper")
    result, error = call(admin, {"action": "reload", "lora_name": "upper"}, token="wrong")
    assert isinstance(error, UnauthorizedError) and quarantine.names() == ["upper"]
    result, error = call(admin, {"action": "reload", "lora_name": "upper"})
    assert error is None and result["name"] == "upper"
    assert quarantine.names() == []
    quarantine.check("upper")  # served again
