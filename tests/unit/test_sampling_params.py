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
