"""Read and validate one Triton request into the arguments of ``engine.add_request``.

Everything wrong with a request raises ``InvalidRequestError`` naming the input or parameter at
fault (the model answers it with INVALID_ARG). What only the engine can judge (prompt length,
max_tokens against the context, whether an adapter exists) is left to ``add_request``.
``logprobs_json`` writes the ``logprobs`` output in the layout of Triton's vLLM backend.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput
from engine.request_checks import check_adapter_name, check_prompt, parse_json
from engine.sampling_params import SamplingParams
from engine.tenants import find_authorization

# Request parameters that are transport or model-input settings, never sampling parameters
# (used when sampling parameters come from the request parameters, as in the generate endpoint).
_TRANSPORT_PARAMETERS = frozenset({
    "lora_name", "stream", "exclude_input_in_output", "return_finish_reason",
    "return_num_input_tokens", "return_num_output_tokens", "return_logprobs", "return_cumulative_logprob",
    "binary_data_output", "priority",
    "timeout", "sequence_id", "sequence_start", "sequence_end", "headers",
    "authorization",  # the forwarded header with the tenant's token (engine/tenants.py)
})


@dataclass(frozen=True)
class ParsedRequest:
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams
    lora_name: str | None  # None: the base model
    stream: bool = False
    exclude_input_in_output: bool = False
    return_finish_reason: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    return_logprobs: bool = False
    return_cumulative_logprob: bool = False
    # sampling_parameters asked for logprobs; without, the logprobs output is JSON null (as in the
    # vLLM backend) although params.logprobs is 0 when return_cumulative_logprob needs the sum
    has_logprobs: bool = False
    # outputs the client asked for (empty: all). Only these are built: Triton <= 24.12 drops the
    # others in ResponseSender.send without holding the GIL, which crashes the stub under load.
    outputs: frozenset[str] = frozenset()
    authorization: str | None = None  # the forwarded authorization header (tenants)

    def wants(self, output_name: str) -> bool:
        return not self.outputs or output_name in self.outputs

    def logprobs_output(self, output: RequestOutput) -> str:
        """The logprobs output of one response (``logprobs_json``); null without sampling_parameters
        logprobs, whatever the engine computed for return_cumulative_logprob."""
        return logprobs_json(output) if self.has_logprobs else "null"


def parse_request(request: Any) -> ParsedRequest:
    """Validate one ``pb_utils.InferenceRequest``; raises InvalidRequestError."""
    prompt = _string_input(request, "text_input")
    token_ids = _token_ids_input(request)
    check_prompt(prompt, token_ids)
    request_parameters = _request_parameters(request)
    sampling_text = _string_input(request, "sampling_parameters")
    if sampling_text is not None:
        sampling = _json_object(sampling_text, "sampling_parameters")
    else:  # as Triton's vLLM backend: the request parameters are the sampling parameters
        sampling = {k: v for k, v in request_parameters.items()
                    if k.lower() not in _TRANSPORT_PARAMETERS and not k.startswith("triton_")}
    lora_name = _resolve_adapter(_string_input(request, "lora_name"), sampling, request_parameters)
    params = SamplingParams.from_dict(sampling, ignore=("lora_name",))
    has_logprobs = params.logprobs is not None
    return_logprobs = _bool_input(request, "return_logprobs")
    return_cumulative_logprob = _bool_input(request, "return_cumulative_logprob")
    if return_cumulative_logprob and not has_logprobs:  # the sampled tokens' logprobs only
        params = dataclasses.replace(params, logprobs=0)
    elif has_logprobs and not (return_logprobs or return_cumulative_logprob):  # no output would carry them
        params = dataclasses.replace(params, logprobs=None)
    return ParsedRequest(
        prompt=prompt,
        prompt_token_ids=token_ids,
        params=params,
        lora_name=lora_name,
        stream=_bool_input(request, "stream"),
        exclude_input_in_output=_bool_input(request, "exclude_input_in_output"),
        return_finish_reason=_bool_input(request, "return_finish_reason"),
        return_num_input_tokens=_bool_input(request, "return_num_input_tokens"),
        return_num_output_tokens=_bool_input(request, "return_num_output_tokens"),
        return_logprobs=return_logprobs,
        return_cumulative_logprob=return_cumulative_logprob,
        has_logprobs=has_logprobs,
        outputs=frozenset(request.requested_output_names() if hasattr(request, "requested_output_names") else ()),
        authorization=find_authorization(request_parameters),
    )


def _resolve_adapter(tensor_value: str | None, sampling: dict[str, Any],
                     request_parameters: dict[str, Any]) -> str | None:
    """First non-empty of: the lora_name input, sampling_parameters["lora_name"], the request
    parameter lora_name."""
    candidates = (
        (tensor_value, "the lora_name input"),
        (sampling.get("lora_name"), "sampling_parameters.lora_name"),
        (request_parameters.get("lora_name"), "the request parameter lora_name"),
    )
    for value, source in candidates:
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidRequestError(f"lora_name (from {source}) must be a string, got {value!r}")
        name = value.strip()
        if name:  # empty: the base model, unless a later source names an adapter
            check_adapter_name(name, source)
            return name
    return None


def _tensor(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _string_input(request: Any, name: str) -> str | None:
    array = _tensor(request, name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidRequestError(f"input {name} must hold exactly one string, got shape {array.shape}")
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidRequestError(f"input {name} is not valid UTF-8 ({error})") from error
    return str(value)


def _bool_input(request: Any, name: str) -> bool:
    array = _tensor(request, name)
    if array is None:
        return False
    if array.size != 1:
        raise InvalidRequestError(f"input {name} must hold exactly one BOOL, got shape {array.shape}")
    return bool(array.reshape(-1)[0])


def _token_ids_input(request: Any) -> list[int] | None:
    array = _tensor(request, "input_ids")
    if array is None:
        return None
    ids = [int(t) for t in array.reshape(-1)]
    if not ids:
        raise InvalidRequestError("input input_ids must not be empty")
    if min(ids) < 0:
        raise InvalidRequestError(f"input input_ids holds a negative token id ({min(ids)})")
    return ids


def _request_parameters(request: Any) -> dict[str, Any]:
    text = request.parameters()
    if not text:
        return {}
    return _json_object(text, "request parameters")


def _json_object(text: str, what: str) -> dict[str, Any]:
    value = parse_json(text, what)
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def logprobs_json(output: RequestOutput) -> str:
    """The ``logprobs`` output of one response, as Triton's vLLM backend writes it: a JSON list
    with one object per token of this response, ``{"<token id>": {"logprob": float, "rank": int,
    "decoded_token": str}}`` for the sampled token and the most likely ones; ``null`` when the
    request did not ask (no ``logprobs`` in sampling_parameters)."""
    if output.logprobs is None:
        return "null"
    texts = output.token_texts or {}
    return json.dumps([
        {str(token_id): {"logprob": logprob, "rank": ranks[token_id], "decoded_token": texts.get(token_id, "")}
         for token_id, logprob in entry.items()}
        for entry, ranks in zip(output.logprobs, output.logprob_ranks or [])])
