"""Errors the engine raises for a request. The Triton model maps each to a Triton error code."""


class EngineError(Exception):
    """Base class of request errors raised by the engine."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (bad parameter, prompt too long, ...). Triton: INVALID_ARG."""


class AdapterNotFoundError(EngineError, LookupError):
    """The request names an adapter the engine does not know. Triton: NOT_FOUND."""


def adapter_not_found(name: str) -> AdapterNotFoundError:
    """The one message for an adapter that is not served to the caller (unknown, unloaded, or
    not allowed to its tenant): it names no other adapter and no path, so a tenant cannot tell an
    adapter of another tenant from one that does not exist."""
    return AdapterNotFoundError(f"LoRA adapter '{name}' is not known")


class AdapterLoadError(EngineError, ValueError):
    """An adapter exists but its files are unusable (bad shapes, rank too large, pickle, NaN...).

    Triton: INVALID_ARG (the adapter named by the request cannot be served).
    """


class EngineOverloadedError(EngineError):
    """The waiting queue is full. Triton: UNAVAILABLE."""


class RequestAbortedError(EngineError):
    """The request was aborted before it finished. Triton: CANCELLED."""


class CheckpointError(ValueError):
    """A base-model checkpoint is malformed or of an unsupported architecture."""


class EngineUnavailableError(EngineError):
    """The engine is not running (its process died, or the model is being unloaded). Triton:
    UNAVAILABLE."""


class AdapterQuarantinedError(AdapterLoadError):
    """An adapter whose request made non-finite logits (NaN or Inf) at run time: that request
    failed, and the adapter's later requests are refused until the model is reloaded. Triton:
    INVALID_ARG (the adapter named by the request cannot be served)."""


class NonFiniteLogitsError(EngineError):
    """The base model's logits for a request are not finite (NaN or Inf): the request failed, the
    others of its batch did not. Triton: INTERNAL (nothing in the request is wrong)."""
class AdapterExistsError(EngineError):
    """An admin load names an adapter already served with other files or weights. Triton:
    ALREADY_EXISTS."""


class UnauthorizedError(InvalidRequestError):
    """A request without the token its action or adapter needs. Triton: INVALID_ARG."""


class UnsupportedActionError(EngineError):
    """An admin action this server does not allow (no admin token configured). Triton: UNSUPPORTED."""


def triton_code(error: BaseException) -> tuple[str, str]:
    """(Triton error code name, metrics reason) of an engine or validation error: the one mapping
    that the Triton models share."""
    if isinstance(error, AdapterNotFoundError):
        return "NOT_FOUND", "not_found"
    if isinstance(error, (InvalidRequestError, AdapterLoadError)):
        return "INVALID_ARG", "invalid_arg"
    if isinstance(error, (EngineOverloadedError, EngineUnavailableError)):
        return "UNAVAILABLE", "unavailable"
    if isinstance(error, RequestAbortedError):
        return "CANCELLED", "cancelled"
    if isinstance(error, AdapterExistsError):
        return "ALREADY_EXISTS", "already_exists"
    if isinstance(error, UnsupportedActionError):
        return "UNSUPPORTED", "unsupported"
    return "INTERNAL", "internal"


def triton_error(pb_utils, message: str, code_name: str):
    """pb_utils.TritonError(message) with the code named (Triton >= 23.x); the message alone on older
    servers. ``pb_utils`` is the stub's triton_python_backend_utils, passed in: the engine does not
    import Triton."""
    code = getattr(pb_utils.TritonError, code_name, None)
    if code is not None:
        try:
            return pb_utils.TritonError(message, code)
        except TypeError:
            pass
    return pb_utils.TritonError(message)
