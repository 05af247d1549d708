# multilora on the NVIDIA Triton Inference Server container (GPU).
#
#   docker build -t multilora .
#   docker run --gpus all --shm-size=1g -p 127.0.0.1:8000:8000 -p 127.0.0.1:8001:8001 \
#       -p 127.0.0.1:8002:8002 -e MULTILORA_ADMIN_KEY=... \
#       -v multilora-triton-cache:/var/cache/multilora/triton multilora
#
# As the launcher does by default, the command restricts Triton's model-repository, logging and
# shared-memory APIs to clients sending the header multilora-admin-key (MULTILORA_ADMIN_KEY, else a
# random key printed at start; MULTILORA_NO_RESTRICTED_API=1 opens them), and the ports above are
# published on the host's loopback only: drop 127.0.0.1: to publish them on every interface, and
# put a proxy with TLS and a body-size limit in front (docs/serving.md).
#
# The volume keeps Triton's compiled kernels (TRITON_CACHE_DIR): the engine compiles every kernel it
# will use at start-up, which takes minutes on an empty cache and seconds on a kept one.
#
# then e.g. `python client_examples/grpc_stream.py --url localhost:8001`.
# Serve other weights by mounting a model repository over /opt/multilora/model_repository, or
# editing model_repository/multilora/1/engine.json and multi_lora.json before building.
#
# 24.12 is the first release on Ubuntu 24.04 with Python 3.12 (the project needs Python >= 3.11;
# 24.10 still has Python 3.10). Its Triton (2.53) is newer than the 24.10 (2.51) of the
# nvidia-pytriton wheel used without Docker; model.py uses nothing newer than 24.10.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.12-py3
FROM ${TRITON_IMAGE}

# torch wheels carry their own CUDA runtime; 12.8 runs on any R525+ driver (minor-version
# compatibility), which the 24.12 image also needs.
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/multilora

# The Python backend stub runs the image's python3, so everything goes into its site-packages.
RUN python3 -m pip install --index-url ${TORCH_INDEX_URL} "torch==${TORCH_VERSION}"

COPY pyproject.toml ./
COPY engine ./engine
COPY kernels ./kernels
COPY multilora_serve ./multilora_serve
# numpy < 2 works with every Python backend stub (older ones break on numpy 2).
RUN python3 -m pip install \
        "numpy==1.26.4" \
        "triton==3.6.0" \
        "transformers==5.17.0" \
        "safetensors==0.8.0" \
        -e . \
    && python3 -c "import engine, kernels, multilora_serve, torch, transformers; print('torch', torch.__version__)"

COPY model_repository ./model_repository
COPY demo ./demo

ENV TRITON_CACHE_DIR=/var/cache/multilora/triton
VOLUME /var/cache/multilora/triton

EXPOSE 8000 8001 8002
# multilora_serve/container.py: the image's tritonserver on /opt/multilora/model_repository, with a
# stub timeout for a 7B model's start, explicit model control (multilora and its adapter admin model
# multilora_adapters), the authorization header forwarded to the models (tenant and admin tokens)
# and the administrative APIs restricted (`docker run IMAGE python3 -m multilora_serve.container ARGS`
# passes ARGS to tritonserver).
CMD ["python3", "-m", "multilora_serve.container"]
