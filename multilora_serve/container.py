"""``python3 -m multilora_serve.container``: the Docker image's command. It runs the image's own
tritonserver (not the nvidia-pytriton wheel's) on the image's model repository with the
launcher's safe defaults.

- Triton's model-repository, logging and shared-memory APIs need the admin key, over HTTP and
  gRPC: ``MULTILORA_ADMIN_KEY``, else a random key printed at start.
  ``MULTILORA_NO_RESTRICTED_API=1`` leaves them open to every client.
- Inside the container the endpoints bind every interface, as Docker's port publishing needs.
  Which host addresses reach them is ``docker run -p``'s choice: ``-p 127.0.0.1:8000:8000``
  keeps them on the host's loopback, as the launcher's default does.

Arguments after the module's name go to tritonserver as they are.
"""
from __future__ import annotations

import os
import secrets
import sys
from typing import Mapping, Sequence

from multilora_serve.launcher import (ADMIN_KEY_ENV, ADMIN_KEY_HEADER, GRPC_HEADER_PREFIX, HEADER_FORWARD_ARGS,
                                      STUB_TIMEOUT_S, restricted_api_args)

MODEL_REPOSITORY = "/opt/multilora/model_repository"
NO_RESTRICTED_API_ENV = "MULTILORA_NO_RESTRICTED_API"


def tritonserver_argv(environ: Mapping[str, str], extra: Sequence[str] = ()) -> tuple[list[str], str | None]:
    """(the tritonserver command, the admin key or None when the APIs are left open)."""
    argv = ["tritonserver", f"--model-repository={MODEL_REPOSITORY}",
            f"--backend-config=python,stub-timeout-seconds={STUB_TIMEOUT_S}",
            # the authorization header (tenant and adapter-admin tokens) reaches the models
            *HEADER_FORWARD_ARGS,
            # explicit model control: a client with the key can unload the model and load it
            # again (POST /v2/repository/models/multilora/load), e.g. when it answers not-ready
            "--model-control-mode=explicit", "--load-model=multilora", "--load-model=multilora_adapters"]
    key = None
    if environ.get(NO_RESTRICTED_API_ENV, "") not in ("1", "true", "yes"):
        key = environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(24)
        argv += restricted_api_args(key)
    return argv + list(extra), key


def main(argv: Sequence[str] | None = None) -> None:
    command, key = tritonserver_argv(os.environ, sys.argv[1:] if argv is None else argv)
    if key is None:
        print("multilora: Triton's model-repository, logging and shared-memory APIs are open to every client "
              f"({NO_RESTRICTED_API_ENV})", flush=True)
    elif not os.environ.get(ADMIN_KEY_ENV):
        print(f"multilora: Triton's model-repository, logging and shared-memory APIs need the header "
              f"'{ADMIN_KEY_HEADER}: {key}' (gRPC metadata '{GRPC_HEADER_PREFIX}{ADMIN_KEY_HEADER}'); set "
              f"{ADMIN_KEY_ENV} to choose the key", flush=True)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
