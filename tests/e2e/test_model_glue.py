"""model.py start-up: an engine that cannot start fails the model loudly."""
from __future__ import annotations

import pytest

from e2e_helpers import copy_model_repository, start_server
from multilora_serve.launcher import TritonServerError

pytestmark = pytest.mark.e2e


def test_engine_that_cannot_start_fails_the_model(tmp_path):
    repository = copy_model_repository(tmp_path, {"model": str(tmp_path / "no_such_model")})
    with pytest.raises(TritonServerError) as caught:
        start_server(repository)
    assert "no_such_model" in str(caught.value) and "config.json" in str(caught.value)
