#!/usr/bin/env bash
# Load-test the multilora model with perf_analyzer: gRPC streaming, asynchronous, requests taken
# in turn from perf_analyzer_input.json (base model and three adapters).
#   client_examples/perf_analyzer.sh [--url localhost:8001] [--concurrency 16] [extra perf_analyzer args]
# perf_analyzer: PyPI `perf-analyzer` (needs glibc >= 2.38), or on older systems the binary inside
# the tritonclient==2.51.0 wheel (tritonclient-2.51.0.data/data/bin/perf_analyzer) with links
# libb64.so.0d and libcudart.so.12 to the libraries of nvidia-pytriton on LD_LIBRARY_PATH.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
URL=localhost:8001
CONCURRENCY=16
PERF_ANALYZER=${PERF_ANALYZER:-perf_analyzer}
while [ $# -gt 0 ]; do
  case "$1" in
    --url) URL=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    *) break ;;
  esac
done
command -v "$PERF_ANALYZER" >/dev/null || { echo "perf_analyzer not found (set PERF_ANALYZER)" >&2; exit 127; }
exec "$PERF_ANALYZER" -m multilora -u "$URL" -i grpc --streaming --async \
  --input-data "$HERE/perf_analyzer_input.json" \
  --concurrency-range "$CONCURRENCY" \
  --measurement-interval 10000 --stability-percentage 25 "$@"
