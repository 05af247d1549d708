"""Fixtures that start real tritonservers (engine.launcher.TritonServer) on free loopback ports.

- ``multilora_server``: the project's model repository with the real engine (skipped until
  ``engine/async_engine.py`` and the demo model exist).
- ``fake_multilora_server``: the same model.py/config.pbtxt with ``tests/e2e/fake_engine.py``
  standing in for ``engine.async_engine`` (tests the Triton glue alone).
- ``llm_server``: both of the above in turn, for the tests of the Triton interface.
Every server is stopped at the end of the session.
"""
from __future__ import annotations

import pytest

from e2e_helpers import (MODEL_REPOSITORY, make_fake_engine_repository, real_engine_missing,
                         start_server)


@pytest.fixture(scope="session")
def fake_multilora_server(tmp_path_factory):
    repository = make_fake_engine_repository(tmp_path_factory.mktemp("fake_repo"))
    server = start_server(repository, log_file=repository / "tritonserver.log")
    server.uses_fake_engine = True
    yield server
    server.stop()


@pytest.fixture(scope="session")
def multilora_server(tmp_path_factory):
    reason = real_engine_missing()
    if reason:
        pytest.skip(reason)
    log_file = tmp_path_factory.mktemp("multilora_log") / "tritonserver.log"
    server = start_server(MODEL_REPOSITORY, ready_timeout=180.0, log_file=log_file)
    server.uses_fake_engine = False
    yield server
    server.stop()


@pytest.fixture(scope="session", params=["fake_engine", "engine"])
def llm_server(request):
    """The multilora model served with the fake engine, then with the real one."""
    name = "fake_multilora_server" if request.param == "fake_engine" else "multilora_server"
    return request.getfixturevalue(name)
