"""Triton Python-backend model "multilora_adapters": glue between admin requests and the engine of
model "multilora" (or the model named by the config parameter ``engine_model``).

Each request is one JSON ``request`` (plus, for an upload, ``adapter_config`` and
``adapter_weights``) and gets one JSON ``response``. The actions run in the engine process
(engine/adapter_admin.py), which this stub reaches over the engine's admin socket
(engine/core_admin.py): the engine belongs to the other model's stub, so this one only forwards.
The forwarded ``authorization`` header travels with the request; the engine checks it.
While the engine model is not loaded every request gets UNAVAILABLE.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from engine.admin_client import call, not_running
from engine.core_admin import admin_address
from engine.core_wire import AdminRequest
from engine.errors import EngineError, InvalidRequestError, triton_code, triton_error
from engine.tenants import find_authorization

DEFAULT_ENGINE_MODEL = "multilora"
DEFAULT_TIMEOUT_S = 600.0  # an action reads adapters from disk; a 7B adapter takes a second or two


def _parameter(model_config: dict[str, Any], key: str) -> str | None:
    return model_config.get("parameters", {}).get(key, {}).get("string_value") or None


def _bytes_input(request: Any, name: str, required: bool = False) -> bytes | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise InvalidRequestError(f"input {name} is required")
        return None
    array = tensor.as_numpy()
    if array.size != 1:
        raise InvalidRequestError(f"input {name} must hold exactly one element, got shape {array.shape}")
    value = array.reshape(-1)[0]
    return value if isinstance(value, bytes) else str(value).encode()


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        self._engine_model = _parameter(model_config, "engine_model") or DEFAULT_ENGINE_MODEL
        self._timeout = float(_parameter(model_config, "admin_timeout_s") or DEFAULT_TIMEOUT_S)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._answer(request) for request in requests]

    def _answer(self, request: Any) -> Any:
        try:
            text = _bytes_input(request, "request", required=True)
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InvalidRequestError(f"input request is not valid UTF-8 ({error})") from error
            parameters = json.loads(request.parameters() or "{}")
            message = AdminRequest(text, find_authorization(parameters),
                                   _bytes_input(request, "adapter_config"), _bytes_input(request, "adapter_weights"))
            reply = call(self._address(), message, self._engine_model, self._timeout, self._engine_ready)
            if reply.error is not None:
                raise reply.error
            response = np.array([reply.response.encode()], dtype=np.object_)
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("response", response)])
        except Exception as error:
            code, _ = triton_code(error)
            if isinstance(error, EngineError):
                text = str(error)
            else:
                pb_utils.Logger.log_error(f"[multilora] admin request failed: {error!r}")
                text = "internal error in the admin model (see the server's log)"
            return pb_utils.InferenceResponse(error=triton_error(pb_utils, text, code))

    def _engine_ready(self) -> bool:
        try:
            return bool(pb_utils.is_model_ready(self._engine_model))
        except Exception:
            return False

    def _address(self) -> str:
        if not self._engine_ready():
            raise not_running(self._engine_model)
        try:
            return admin_address(os.getppid(), self._engine_model)
        except (OSError, RuntimeError):
            raise not_running(self._engine_model) from None
