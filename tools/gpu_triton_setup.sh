#!/usr/bin/env bash
# Triton Inference Server for the GPU machine (no network, numpy 2 in its image), in two steps.
#
#   tools/gpu_triton_setup.sh pack            # here (dev machine): fill .whl/ (about 47 MB)
#   tools/gpu_triton_setup.sh install V       # there: make the venv V; then run V/bin/python ...
#
# Why (docs/../TOOLCHAIN.md, "The GPU machine in practice"): the Python backend's stub needs
# numpy < 2 while the image has numpy 2.x, and the stub takes its packages from the venv of the
# first python3 on PATH (our launcher puts sys.prefix/bin first). So V is a venv without pip
# whose site-packages hold numpy 1.26.4, tritonclient, python-rapidjson, pyzmq, msgspec and the server files as
# a package `pytriton` (only what multilora_serve.launcher uses:
# tritonserver/{bin,backends,caches}, the 3.12 backend stub, nvidia_pytriton.libs without the
# Python 3.13 library), plus a .pth that appends the image's site-packages (torch,
# transformers, grpcio, protobuf, ... stay visible, after V's numpy). The nvidia-pytriton wheel
# itself (55 MB) does not fit in the 64 MiB a run may carry together with the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=${WHL:-.whl}
PYVER=${PYVER:-3.12}  # the GPU machine's Python (the stub links that version's libpython)
ARCHIVE=$WHL/pytriton-server-py${PYVER/./}.tar.xz

pack() {
    mkdir -p "$WHL"
    local site
    site=$(.venv/bin/python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("pytriton").submodule_search_locations[0]).parent)')
    if [ ! -f "$ARCHIVE" ]; then
        local tmp
        tmp=$(mktemp -d)
        mkdir -p "$tmp/pytriton/tritonserver/python_backend_stubs"
        # multilora_serve.launcher only needs find_spec("pytriton")
        : > "$tmp/pytriton/__init__.py"
        cp -a "$site/pytriton/tritonserver/bin" "$site/pytriton/tritonserver/backends" \
              "$site/pytriton/tritonserver/caches" "$tmp/pytriton/tritonserver/"
        rm -rf "$tmp/pytriton/tritonserver/backends/python/__pycache__"
        cp -a "$site/pytriton/tritonserver/python_backend_stubs/$PYVER" \
              "$tmp/pytriton/tritonserver/python_backend_stubs/"
        mkdir "$tmp/nvidia_pytriton.libs"
        find "$site/nvidia_pytriton.libs" -maxdepth 1 -type f ! -name 'libpython3-*' \
            -exec cp -a {} "$tmp/nvidia_pytriton.libs/" \;
        tar -C "$tmp" -cf - pytriton nvidia_pytriton.libs | xz -9 -T0 > "$ARCHIVE"
        rm -rf "$tmp"
    fi
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 \
        -d "$WHL" numpy==1.26.4 python-rapidjson==1.25 tritonclient==2.73.0 ml-dtypes==0.5.4 \
        pyzmq==27.3.0 msgspec==0.23.0
    du -ch "$WHL"/*
}

install() {
    local venv=${1:?usage: $0 install VENV_DIR}
    local image_python=${PYTHON:-python3}
    local image_site
    image_site=$("$image_python" -c 'import numpy, os; print(os.path.dirname(os.path.dirname(numpy.__file__)))')
    "$image_python" -m venv --without-pip "$venv"
    local site
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    "$image_python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHL"/numpy-*.whl "$WHL"/python_rapidjson-*.whl "$WHL"/tritonclient-*.whl "$WHL"/ml_dtypes-*.whl \
        "$WHL"/pyzmq-*.whl "$WHL"/msgspec-*.whl
    "$image_python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$ARCHIVE" "$site"
    # The image's packages, after V's own, less those built for numpy 2 that nothing here needs:
    # with numpy 1.26 first, `from transformers import AutoTokenizer` failed on the GPU machine
    # (transformers imports scikit-learn when it is installed, which imports the image's SciPy,
    # which needs numpy >= 2). A folder of symbolic links to the rest; addsitedir also runs the
    # .pth files found there.
    local shadow="$venv/image-site-packages" entry name
    mkdir -p "$shadow"
    for entry in "$image_site"/*; do
        name=$(basename "$entry")
        case "$name" in
            numpy|numpy-*|numpy.libs|ml_dtypes|ml_dtypes-*|scipy|scipy-*|scipy.libs|sklearn|scikit_learn*|\
            pandas|pandas-*|pandas.libs|pyarrow|pyarrow-*|numba|numba-*|numba_cuda*|llvmlite*|\
            matplotlib|matplotlib-*|matplotlib.libs|mpl_toolkits|h5py|h5py-*|h5py.libs|skimage|scikit_image*|\
            statsmodels|statsmodels-*|xarray|xarray-*|cupy|cupy_*|cupyx|cupy_backends|jax|jax-*|jaxlib|jaxlib-*|\
            jax_cuda*|tensorstore|tensorstore-*|cv2|opencv_*) continue ;;
        esac
        ln -sfn "$entry" "$shadow/$name"
    done
    echo "import site; site.addsitedir('$(cd "$shadow" && pwd)')" > "$site/zz_image_site_packages.pth"
    # The project itself, importable from the stub (it ignores PYTHONPATH but honours .pth files).
    pwd > "$site/multilora_repo.pth"
    # MULTILORA_FAULTHANDLER=1: Python tracebacks of every thread when a process of V (the stub
    # included, whose interpreter ignores PYTHONFAULTHANDLER) dies of SIGSEGV/SIGABRT/SIGBUS.
    echo "import os, faulthandler; os.environ.get('MULTILORA_FAULTHANDLER') and faulthandler.enable()" \
        > "$site/multilora_faulthandler.pth"
    "$venv/bin/python" - <<'PY'
import sys, traceback
import numpy
import tritonclient.grpc.aio  # noqa: F401
from multilora_serve.launcher import tritonserver_binary
import torch
print(f"venv {sys.prefix}: numpy {numpy.__version__}, torch {torch.__version__} cuda={torch.cuda.is_available()}, "
      f"tritonserver {tritonserver_binary()}")
assert numpy.__version__.startswith("1."), numpy.__file__
try:
    from transformers import AutoTokenizer  # noqa: F401  (what the engine imports)
    import engine.async_engine  # noqa: F401
    import engine.core_client  # noqa: F401  (pyzmq, msgspec: the engine process's IPC)
except Exception as error:  # the cause chain names the package that broke
    traceback.print_exception(error)
    sys.exit(1)
PY
}

case "${1:-}" in
    pack) pack ;;
    install) shift; install "$@" ;;
    *) echo "usage: $0 pack | install VENV_DIR" >&2; exit 2 ;;
esac
