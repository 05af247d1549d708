import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams


def test_string_values_are_coerced_as_genai_perf_sends_them():
    p = SamplingParams.from_dict({"max_tokens": "32", "temperature": "0", "top_p": "0.5", "ignore_eos": "true",
                                  "stop": "END", "seed": "7", "lora_name": "x"}, ignore=("lora_name",))
    assert (p.max_tokens, p.temperature, p.top_p, p.ignore_eos, p.stop, p.seed) == (32, 0.0, 0.5, True, ["END"], 7)
    assert p.is_greedy


@pytest.mark.parametrize("values, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"top_k": -3}, "top_k"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"ignore_eos": "maybe"}, "ignore_eos"),
    ({"temprature": 1}, "temprature"),
])
def test_bad_values_name_the_field(values, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams.from_dict(values)


@pytest.mark.parametrize("values, field", [
    ({"seed": 2 ** 63}, "seed"),
    ({"seed": 2 ** 64}, "seed"),  # torch.Generator.manual_seed: "Overflow when unpacking long long"
    ({"seed": "9223372036854775808"}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": True}, "seed"),
    ({"max_tokens": 2 ** 31}, "max_tokens"),
    ({"max_tokens": 1e300}, "max_tokens"),
    ({"max_tokens": float("inf")}, "max_tokens"),
    ({"max_tokens": "1e5"}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 2 ** 40}, "min_tokens"),
    ({"top_k": 2 ** 40}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": "nan"}, "top_p"),
    ({"top_p": float("inf")}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "NaN"}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": -1e-9}, "temperature"),
    ({"stop_token_ids": [2 ** 63]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [1.5]}, "stop_token_ids"),
    ({"stop_token_ids": "[2, true]"}, "stop_token_ids"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": "x" * 1025}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": [None]}, "stop"),
    ({"stop": '["a", 3]'}, "stop"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 2 ** 63}, "logprobs"),
])
def test_numeric_limits_are_invalid_requests_naming_the_field(values, field):
    with pytest.raises(InvalidRequestError, match=rf"^sampling_parameters: {field}\b"):
        SamplingParams.from_dict(values)
    if not any(isinstance(v, str) for v in values.values()):  # the Python API checks the same
        with pytest.raises(InvalidRequestError, match=rf"^sampling_parameters: {field}\b"):
            SamplingParams(**values)


def test_seed_message_gives_the_range():
    with pytest.raises(InvalidRequestError, match=r"seed must be an integer in \[0, 2\^63\)"):
        SamplingParams(seed=2 ** 63)
    assert SamplingParams(seed=2 ** 63 - 1).seed == 2 ** 63 - 1


def test_tiny_temperatures_are_greedy():
    """logits / 1e-39 overflow float32: below MIN_TEMPERATURE (1e-5, as vLLM) sampling is greedy."""
    assert SamplingParams(temperature=1e-39).is_greedy and SamplingParams(temperature=9e-6).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy


def test_limits_at_their_edges_are_accepted():
    p = SamplingParams(max_tokens=2 ** 31 - 1, min_tokens=2 ** 31 - 1, top_k=2 ** 31 - 1, top_p=1e-9,
                       stop=["x" * 1024] * 16, stop_token_ids=list(range(1024)), logprobs=20)
    assert (p.max_tokens, p.top_k, len(p.stop), len(p.stop_token_ids)) == (2 ** 31 - 1, 2 ** 31 - 1, 16, 1024)


def test_numpy_integers_become_python_ints():
    np = pytest.importorskip("numpy")
    p = SamplingParams(max_tokens=np.int64(7), seed=np.uint32(3), stop_token_ids=[np.int32(5)])
    assert (type(p.max_tokens), type(p.seed), type(p.stop_token_ids[0])) == (int, int, int)


def test_deeply_nested_json_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match="sampling_parameters: nested too deeply"):
        SamplingParams.from_dict({"stop": "[" * 10_000 + "]" * 10_000})


def test_huge_values_are_cut_in_messages():
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(max_tokens=10 ** 5000)  # repr() of it raises ValueError
    assert "max_tokens" in str(caught.value) and len(str(caught.value)) < 200
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams.from_dict({"top_k": "x" * 100_000})
    assert "top_k" in str(caught.value) and len(str(caught.value)) < 200


@pytest.mark.parametrize("key", ["max_tokens", "min_tokens", "seed", "top_k", "logprobs", "temperature", "top_p"])
@pytest.mark.parametrize("sign", ["", "-"])
def test_integers_of_more_than_4300_digits_name_their_field(key, sign):
    """Python's int parsing stops at 4300 digits; such a number in the JSON is refused by the
    field's own check, not as JSON that does not parse."""
    from engine.request_checks import parse_json

    values = parse_json(f'{{"{key}": {sign}1{"0" * 5000}}}', "sampling_parameters")
    with pytest.raises(InvalidRequestError, match=rf"^sampling_parameters: {key}") as caught:
        SamplingParams.from_dict(values)
    assert len(str(caught.value)) < 300
