"""``python -m core_with_faults``: engine.core_server whose engine step number
MULTILORA_TEST_FAIL_AT_STEP raises, for the tests of what a failed step does to the process."""
import os
import sys

from engine import core_server, llm_engine

FAIL_AT_STEP = int(os.environ["MULTILORA_TEST_FAIL_AT_STEP"])
_step = llm_engine.LLMEngine.step


def _failing_step(self):
    if self.stats.steps_total >= FAIL_AT_STEP:
        raise RuntimeError("injected step failure")
    return _step(self)


llm_engine.LLMEngine.step = _failing_step
sys.exit(core_server.main())
