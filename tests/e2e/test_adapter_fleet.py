"""Adapters as a live fleet, through a real tritonserver: the admin model multilora_adapters (list,
load, reload, unload, upload) reaching the engine of model multilora, tenants with their tokens
in the authorization header, and the adapter metrics a gateway routes on."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from demo.tasks import TASKS
from e2e_helpers import (ROOT, StreamClient, copy_admin_model, copy_model_repository, generate, read_metrics,
                         start_server)

pytestmark = pytest.mark.e2e

DEMO = ROOT / "demo"
ADMIN_TOKEN = "admin-token-for-tests"
TOKENS = {"acme": "acme-token", "beta": "beta-token"}
GREEDY = {"temperature": 0, "max_tokens": 24}
FILES = ("adapter_config.json", "adapter_model.safetensors")


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def put_version(version: str, dest) -> None:
    os.makedirs(dest, exist_ok=True)
    for name in FILES:
        shutil.copy(DEMO / "adapters" / version / name, os.path.join(dest, name + ".tmp"))
        os.replace(os.path.join(dest, name + ".tmp"), os.path.join(dest, name))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    roots = tmp / "roots"
    for name, version in (("acme-upper", "upper"), ("acme-rev", "reverse"), ("beta-rot", "rot13")):
        put_version(version, roots / name)
    repository = copy_model_repository(tmp / "repo", {
        "model": str(DEMO / "base"), "lora_roots": [str(roots)], "max_num_seqs": 4, "max_model_len": 4096})
    copy_admin_model(repository)
    version_dir = repository / "multilora" / "1"
    (version_dir / "multi_lora.json").write_text(json.dumps({"upper": str(DEMO / "adapters" / "upper")}))
    (version_dir / "tenants.json").write_text(json.dumps({"tenants": {
        "acme": {"token_sha256": sha(TOKENS["acme"]), "adapters": ["acme-*", "upper", "up-*"], "weight": 2},
        "beta": {"token_sha256": sha(TOKENS["beta"]), "adapters": ["beta-*"], "base_model": False}}}))
    server = start_server(repository, ready_timeout=180.0, log_file=tmp / "tritonserver.log",
                          env={"MULTILORA_ADMIN_TOKEN": ADMIN_TOKEN})
    server.roots = roots
    yield server
    server.stop()


def admin(server, request: dict, token: str | None = ADMIN_TOKEN, **uploads: bytes):
    """(response JSON, None) or (None, (gRPC status name, message))."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for name, value in (("request", json.dumps(request).encode()), *uploads.items()):
        tensor = grpcclient.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([value], dtype=np.object_))
        inputs.append(tensor)
    try:
        result = client.infer("multilora_adapters", inputs,
                              headers={"authorization": f"Bearer {token}"} if token else None)
    except InferenceServerException as error:
        return None, (error.status().removeprefix("StatusCode."), error.message())
    finally:
        client.close()
    return json.loads(result.as_numpy("response")[0]), None


def ask(server, prompt: str, lora_name: str | None, token: str | None, ids=("q",)):
    """One non-streamed request per id over a gRPC stream with the token's header: {id: text or error}."""
    with StreamClient(server.grpc_url, {"authorization": f"Bearer {token}"} if token else None) as client:
        for rid in ids:
            client.send(rid, text=prompt, lora_name=lora_name, stream=False, sampling=GREEDY,
                        exclude_input_in_output=True)
        got = client.collect(list(ids), timeout=60)
    return {rid: (rs[-1].error if rs[-1].error else "".join(r.text for r in rs)) for rid, rs in got.items()}


def test_both_models_load_under_explicit_model_control(fleet):
    for model in ("multilora", "multilora_adapters"):
        with urllib.request.urlopen(f"{fleet.http_url}/v2/models/{model}/ready") as reply:
            assert reply.status == 200


def test_list_load_reload_unload_with_the_admin_token(fleet):
    listed, error = admin(fleet, {"action": "list"})
    assert error is None and [row["name"] for row in listed["adapters"]] == ["upper"]
    assert listed["adapters"][0]["tier"] == "disk" and listed["adapters"][0]["digest"] is None
    put_version("upper", fleet.roots / "acme-new")
    loaded, error = admin(fleet, {"action": "load", "lora_name": "acme-new", "lora_path": str(fleet.roots / "acme-new")})
    assert error is None and len(loaded["digest"]) == 64 and loaded["rank"] > 0
    assert ask(fleet, "hello", "acme-new", TOKENS["acme"]) == {"q": "HELLO"}
    rows = {row["name"]: row for row in admin(fleet, {"action": "list"})[0]["adapters"]}
    assert rows["acme-new"]["tier"] == "gpu" and rows["acme-new"]["digest"] == loaded["digest"]
    assert rows["acme-new"]["in_use"] == 0 and rows["acme-new"]["target_modules"]
    put_version("reverse", fleet.roots / "acme-new")
    reloaded, error = admin(fleet, {"action": "reload", "lora_name": "acme-new"})
    assert error is None and reloaded["changed"] and reloaded["previous_digest"] == loaded["digest"]
    assert ask(fleet, "hello", "acme-new", TOKENS["acme"]) == {"q": "olleh"}
    unloaded, error = admin(fleet, {"action": "unload", "lora_name": "acme-new"})
    assert error is None and unloaded == {"name": "acme-new", "digest": reloaded["digest"], "in_use": 0}
    assert ask(fleet, "hello", "acme-new", TOKENS["acme"]) == {"q": "LoRA adapter 'acme-new' is not known"}
    # errors: each with its code and a message that says what to fix
    cases = [
        ({"action": "load", "lora_name": "x", "lora_path": str(DEMO / "adapters" / "upper")}, "INVALID_ARGUMENT",
         "lora_path must lie under one of the server's lora_roots folders"),
        ({"action": "unload", "lora_name": "nope"}, "NOT_FOUND", "LoRA adapter 'nope' is not known"),
        ({"action": "load", "lora_name": "upper", "lora_path": str(fleet.roots / "acme-upper")}, "ALREADY_EXISTS",
         "already served from another path"),
        ({"action": "fly"}, "INVALID_ARGUMENT", "action must be one of list, load, reload, unload"),
        ({"action": "load", "lora_name": "../x"}, "INVALID_ARGUMENT", "not a plain adapter name"),
        ({"action": "unload", "lora_name": "a", "lora_path": "/"}, "INVALID_ARGUMENT", "takes no lora_path"),
    ]
    for request, status, message in cases:
        result, error = admin(fleet, request)
        assert result is None and error[0] == status and message in error[1], (request, error)
        assert str(fleet.roots) not in error[1]


def test_admin_actions_need_the_admin_token(fleet):
    for token in (None, "wrong", TOKENS["acme"]):
        result, error = admin(fleet, {"action": "unload", "lora_name": "upper"}, token=token)
        assert result is None and error[0] == "INVALID_ARGUMENT" and "admin token" in error[1]
    assert ask(fleet, "abc", "upper", TOKENS["acme"]) == {"q": "ABC"}  # still served


def test_upload_over_the_wire_is_served(fleet):
    config = (DEMO / "adapters" / "rot13" / FILES[0]).read_bytes()
    weights = (DEMO / "adapters" / "rot13" / FILES[1]).read_bytes()
    start = time.monotonic()
    loaded, error = admin(fleet, {"action": "load", "lora_name": "up-rot"}, adapter_config=config, adapter_weights=weights)
    assert error is None and ask(fleet, "hello", "up-rot", TOKENS["acme"]) == {"q": "uryyb"}
    assert time.monotonic() - start < 30
    result, error = admin(fleet, {"action": "load", "lora_name": "up-bad"}, adapter_config=config,
                          adapter_weights=b"\x80\x04\x95 pickle")
    assert result is None and error[0] == "INVALID_ARGUMENT" and "safetensors only" in error[1]
    result, error = admin(fleet, {"action": "load", "lora_name": "up-half"}, adapter_config=config)
    assert error[0] == "INVALID_ARGUMENT" and "both inputs adapter_config and adapter_weights" in error[1]


def test_tenants_are_refused_without_their_token_and_see_no_other_names(fleet):
    """Every request with a missing or wrong token, or for an adapter outside the tenant's list,
    is refused; an adapter of another tenant is answered exactly as an unknown one."""
    refused = {
        "no token": ask(fleet, "hello", "acme-upper", None),
        "wrong token": ask(fleet, "hello", "acme-upper", "not-a-token"),
        "not bearer": ask(fleet, "hello", None, None),
    }
    for what, got in refused.items():
        assert got == {"q": "authorization: this server serves tenants; send the header 'authorization: Bearer "
                            "<your token>' with a valid token"}, what
    other = ask(fleet, "hello", "beta-rot", TOKENS["acme"], ids=("a", "b"))
    unknown = ask(fleet, "hello", "acme-nothing", TOKENS["acme"])
    assert other == {"a": "LoRA adapter 'beta-rot' is not known", "b": "LoRA adapter 'beta-rot' is not known"}
    assert unknown == {"q": "LoRA adapter 'acme-nothing' is not known"}
    assert ask(fleet, "hello", "acme-upper", TOKENS["acme"]) == {"q": "HELLO"}
    assert ask(fleet, "hello", "beta-rot", TOKENS["beta"]) == {"q": "uryyb"}
    assert ask(fleet, "hello", None, TOKENS["acme"]) == {"q": "hello"}  # the base model: open to acme
    assert "base model" in ask(fleet, "hello", None, TOKENS["beta"])["q"]  # beta: adapters only
    # HTTP generate: Triton 2.51 forwards no header there (upstream issue 8790), so the token
    # goes in the body's parameters; a header alone is refused like no token
    body = {"text_input": "hi", "lora_name": "acme-upper", "parameters": {"max_tokens": 8, "temperature": 0}}
    status, reply = generate(fleet.http_url, body, headers={"Authorization": f"Bearer {TOKENS['acme']}"})
    assert status == 400 and "valid token" in reply["error"]
    body["parameters"]["authorization"] = f"Bearer {TOKENS['acme']}"
    status, reply = generate(fleet.http_url, body)
    assert status == 200 and reply["text_output"].endswith("HI"), reply
    body["parameters"]["authorization"] = f"Bearer {TOKENS['beta']}"
    status, reply = generate(fleet.http_url, body)
    assert status == 400 and reply["error"] == "LoRA adapter 'acme-upper' is not known"
    # a tenant's list shows only its adapters; no message names another tenant's
    listed, error = admin(fleet, {"action": "list"}, token=TOKENS["beta"])
    assert error is None and {row["name"] for row in listed["adapters"]} <= {"beta-rot"}
    texts = json.dumps([refused, other, unknown, listed])
    assert "acme-upper" not in json.dumps(listed) and "beta-rot" not in json.dumps([refused, unknown])
    assert str(fleet.roots) not in texts


LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def prometheus_series(metrics_url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The series of one metric, labels parsed as Prometheus text writes them (values may hold commas)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    series = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            series.append(({k: v.replace('\\"', '"') for k, v in LABEL.findall(head)}, float(value)))
    return series


def lora_info(metrics_url: str) -> dict[str, object]:
    """vllm:lora_requests_info read as the gateway reads it: the series with the largest value,
    its adapter labels split on commas."""
    series = prometheus_series(metrics_url, "vllm:lora_requests_info")
    labels, _ = max(series, key=lambda s: s[1])
    split = lambda text: {name for name in text.split(",") if name}  # noqa: E731
    return {"max_lora": int(labels["max_lora"]), "running": split(labels["running_lora_adapters"]),
            "waiting": split(labels["waiting_lora_adapters"])}


def affinity_score(info: dict, adapter: str) -> float:
    """The LoRA affinity scorer's tiers: adapter active; room to load one; adapter queued; none."""
    if adapter in info["running"]:
        return 1.0
    if len(info["running"]) + len(info["waiting"]) < info["max_lora"]:
        return 0.8
    if adapter in info["waiting"]:
        return 0.6
    return 0.0


def test_gateway_reads_running_and_waiting_adapters_and_scores_three_tiers(fleet):
    """4 long requests of three adapters fill the 4 sequence slots (max_lora 4); one of a fourth
    adapter waits. The gateway's parse of vllm:lora_requests_info gives running {acme-upper,
    acme-rev, upper}, waiting {acme-wait}: no room for another adapter (3 + 1 = max_lora), so its
    scorer ranks a running adapter 1.0, the waiting one 0.6 and an absent one 0.0."""
    put_version("reverse", fleet.roots / "acme-wait")
    idle = lora_info(fleet.metrics_url)
    assert idle["max_lora"] == 4 and affinity_score(idle, "anything") == 0.8  # room for any adapter
    long = {"temperature": 0, "max_tokens": 3000, "ignore_eos": True}
    with StreamClient(fleet.grpc_url, {"authorization": f"Bearer {TOKENS['acme']}"}) as client:
        for i, name in enumerate(("acme-upper", "acme-upper", "acme-rev", "upper")):
            client.send(f"run{i}", text="hello", lora_name=name, sampling=long)
        time.sleep(1.0)
        client.send("wait", text="hello", lora_name="acme-wait", sampling=long)
        deadline = time.monotonic() + 30
        while True:
            info = lora_info(fleet.metrics_url)
            if info["waiting"] == {"acme-wait"} or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        metrics = read_metrics(fleet.metrics_url)
        client.close()
    assert info == {"max_lora": 4, "running": {"acme-upper", "acme-rev", "upper"}, "waiting": {"acme-wait"}}
    assert [affinity_score(info, a) for a in ("acme-rev", "acme-wait", "beta-rot")] == [1.0, 0.6, 0.0]
    current = [s for s in prometheus_series(fleet.metrics_url, "vllm:lora_requests_info") if s[1] > 0]
    assert len(current) == 1  # earlier states read 0
    loaded = [labels for labels, value in prometheus_series(fleet.metrics_url, "vllm:lora_adapter_loaded")
              if value == 1]
    assert {(s["adapter_name"], s["level"]) for s in loaded} >= {("acme-upper", "gpu"), ("upper", "gpu"),
                                                              ("acme-rev", "gpu")}
    assert all(len(s["digest"]) == 64 for s in loaded)
    shared = {s["adapter_name"]: s["digest"] for s in loaded}
    assert shared["acme-upper"] == shared["upper"]  # the same bytes: one version in the pool
    usage = metrics["vllm:kv_cache_usage_perc"][0][1]
    assert usage == metrics["vllm:gpu_cache_usage_perc"][0][1] and 0 < usage <= 1


def test_churn_through_triton_leaves_no_reference_and_no_wrong_output(fleet):
    """Admin loads, unloads and reloads of four names under streaming traffic for them: every
    answer is the name's task output or 'not known' while it is unloaded; afterwards nothing is
    in use and the KV pool is empty."""
    names = {f"acme-c{i}": v for i, v in enumerate(("upper", "reverse", "rot13", "upper"))}
    for name, version in names.items():
        put_version(version, fleet.roots / name)
    rng = random.Random(3)
    stop = threading.Event()
    ops = {"load": 0, "unload": 0, "reload": 0}

    def churn() -> None:
        while not stop.is_set():
            name = rng.choice(sorted(names))
            op = rng.choice(sorted(ops))
            request = {"action": op, "lora_name": name}
            if op == "load":
                request["lora_path"] = str(fleet.roots / name)
            result, error = admin(fleet, request)
            assert error is None or error[0] == "NOT_FOUND", error
            ops[op] += 1

    thread = threading.Thread(target=churn)
    thread.start()
    wrong, served, refused = [], 0, 0
    try:
        with StreamClient(fleet.grpc_url, {"authorization": f"Bearer {TOKENS['acme']}"}) as client:
            for round_ in range(6):
                batch = [(f"c{round_}-{i}", rng.choice(sorted(names)), rng.choice(["ab", "hello", "x1 y"]))
                         for i in range(20)]
                for rid, name, prompt in batch:
                    client.send(rid, text=prompt, lora_name=name, stream=True, sampling=GREEDY)
                got = client.collect([rid for rid, _, _ in batch], timeout=120)
                for rid, name, prompt in batch:
                    responses = got[rid]
                    if responses[-1].error:
                        refused += 1
                        if responses[-1].error != f"LoRA adapter '{name}' is not known":
                            wrong.append((rid, responses[-1].error))
                    else:
                        served += 1
                        text = "".join(r.text for r in responses)
                        if text != TASKS[names[name]](prompt):
                            wrong.append((rid, name, prompt, text))
    finally:
        stop.set()
        thread.join()
    assert not wrong and served > 20 and min(ops.values()) > 3, (wrong, served, refused, ops)
    rows = admin(fleet, {"action": "list"})[0]["adapters"]
    assert all(row["in_use"] == 0 for row in rows)
    deadline = time.monotonic() + 10
    while read_metrics(fleet.metrics_url)["multilora_kv_blocks_used"][0][1] != 0:
        assert time.monotonic() < deadline, "KV pages still in use after the churn"
        time.sleep(0.1)


def test_admin_requests_while_multilora_is_not_loaded_are_unavailable(fleet):
    def repository(action: str) -> int:
        request = urllib.request.Request(f"{fleet.http_url}/v2/repository/models/multilora/{action}", data=b"{}",
                                         method="POST", headers=fleet.admin_headers)
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status

    assert repository("unload") == 200
    deadline = time.monotonic() + 30
    while True:
        result, error = admin(fleet, {"action": "list"})
        if error is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert result is None and error[0] == "UNAVAILABLE" and "model 'multilora' is not loaded" in error[1]
    assert repository("load") == 200
    listed, error = admin(fleet, {"action": "list"})
    assert error is None and "upper" in [row["name"] for row in listed["adapters"]]
