"""The Triton model's request parsing (model_repository/multilora/1/multilora_requests.py), with a
stand-in for triton_python_backend_utils: what a client sends becomes InvalidRequestError naming
the input or parameter at fault."""
import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest

from engine.errors import InvalidRequestError

MODULE_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "model_repository", "multilora", "1",
                           "multilora_requests.py")


class FakeTensor:
    def __init__(self, array):
        self.array = array

    def as_numpy(self):
        return self.array


class FakeRequest:
    def __init__(self, inputs, parameters=""):
        self.inputs = {name: np.array([value], dtype=np.object_) if isinstance(value, (str, bytes))
                       else np.asarray(value) for name, value in inputs.items()}
        self._parameters = parameters

    def parameters(self):
        return self._parameters


@pytest.fixture
def requests_module(monkeypatch):
    fake = types.ModuleType("triton_python_backend_utils")
    fake.get_input_tensor_by_name = lambda request, name: (
        FakeTensor(request.inputs[name]) if name in request.inputs else None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("multilora_requests_under_test", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_good_request_parses(requests_module):
    parsed = requests_module.parse_request(FakeRequest(
        {"text_input": "hello", "sampling_parameters": json.dumps({"max_tokens": 4, "seed": 7})}))
    assert (parsed.prompt, parsed.params.max_tokens, parsed.params.seed) == ("hello", 4, 7)


@pytest.mark.parametrize("where", ["sampling_parameters", "request parameters"])
def test_deeply_nested_json_is_an_invalid_request(requests_module, where):
    deep = '{"stop": ' + "[" * 10_000 + "]" * 10_000 + "}"
    inputs = {"text_input": "hello"}
    if where == "sampling_parameters":
        inputs["sampling_parameters"] = deep
    request = FakeRequest(inputs, parameters=deep if where == "request parameters" else "")
    with pytest.raises(InvalidRequestError, match=f"^{where}: nested too deeply$"):
        requests_module.parse_request(request)


@pytest.mark.parametrize("sampling, field", [
    ({"seed": 2 ** 63}, "seed"),
    ({"seed": -1}, "seed"),
    ({"temperature": "nan"}, "temperature"),
    ({"top_p": "NaN"}, "top_p"),
    ({"top_k": 2 ** 40}, "top_k"),
    ({"stop_token_ids": [2 ** 64]}, "stop_token_ids"),
    ({"stop": ["x"] * 17}, "stop"),
])
def test_sampling_parameters_at_their_limits_name_the_field(requests_module, sampling, field):
    request = FakeRequest({"text_input": "hello", "sampling_parameters": json.dumps(sampling)})
    with pytest.raises(InvalidRequestError, match=rf"^sampling_parameters: {field}\b"):
        requests_module.parse_request(request)


def test_json_that_is_not_json_names_the_input(requests_module):
    request = FakeRequest({"text_input": "hello", "sampling_parameters": '{"max_tokens": 8,'})
    with pytest.raises(InvalidRequestError, match="^sampling_parameters is not valid JSON"):
        requests_module.parse_request(request)
