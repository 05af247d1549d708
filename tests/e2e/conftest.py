"""Fixture starting a real tritonserver (multilora_serve.launcher.TritonServer) on free loopback ports with
the project's model repository and the real engine on the embedded demo model; stopped at the end
of the session."""
from __future__ import annotations

import pytest

from e2e_helpers import MODEL_REPOSITORY, start_server

# The demo model's context is 64 tokens: too short for a request to still be streaming when a
# cancellation arrives, or for enough tokens to show coalescing. Its rotary tables are built for
# max_model_len, so a longer context only makes ignore_eos generations past 64 tokens
# meaningless, which those tests do not read. This also exercises --engine-arg overrides
# (MULTILORA_ENGINE_ARGS) end to end.
REAL_ENGINE_ARGS = {"max_model_len": 4096}


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory):
    log_file = tmp_path_factory.mktemp("multilora_log") / "tritonserver.log"
    server = start_server(MODEL_REPOSITORY, ready_timeout=180.0, log_file=log_file,
                          engine_args=REAL_ENGINE_ARGS)
    yield server
    server.stop()
