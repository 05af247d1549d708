"""The embedded demo through the engine: every adapter does its task on held-out strings, with
all adapters and the base model mixed in the same batches."""
import os

import pytest

from demo.tasks import ADAPTERS, TASKS, heldout_strings
from engine.llm import LLM
from engine.sampling_params import SamplingParams

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "demo")


@pytest.fixture(scope="module")
def llm():
    adapters = {name: os.path.join(ROOT, "adapters", name) for name in ADAPTERS}
    return LLM(model=os.path.join(ROOT, "base"), adapters=adapters, max_num_seqs=64)


def test_each_adapter_exact_on_heldout_strings_in_mixed_batches(llm):
    strings = heldout_strings(200)
    names = [""] + list(ADAPTERS)
    # every string once per task, interleaved so each batch mixes all adapters and the base
    jobs = [(s, name) for s in strings for name in names]
    outs = llm.generate([s for s, _ in jobs], SamplingParams(temperature=0, max_tokens=32),
                        lora_names=[name or None for _, name in jobs])
    for name in names:
        results = [(out.text, TASKS[name](s)) for (s, n), out in zip(jobs, outs) if n == name]
        exact = sum(got == want for got, want in results) / len(results)
        assert exact >= 0.99, f"{name or 'base'}: {exact:.1%} exact; e.g. {[r for r in results if r[0] != r[1]][:3]}"
    assert all(out.finish_reason == "stop" for out in outs)  # each ends with EOS
