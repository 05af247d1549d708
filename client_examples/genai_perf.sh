#!/usr/bin/env bash
# Profile the multilora model with genai-perf (0.0.16), which talks to it as to Triton's vLLM
# backend: text_input, stream, exclude_input_in_output, and sampling_parameters carrying
# max_tokens/min_tokens as strings; --extra-inputs lora_name:NAME adds the adapter input.
#   client_examples/genai_perf.sh [--url localhost:8001] [--lora upper] [--concurrency 16] [extra args]
# Older genai-perf spells --endpoint-type kserve as --service-kind triton. It drives the
# perf_analyzer found on PATH (see perf_analyzer.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
URL=localhost:8001
LORA=""
CONCURRENCY=16
while [ $# -gt 0 ]; do
  case "$1" in
    --url) URL=$2; shift 2 ;;
    --lora) LORA=$2; shift 2 ;;
    --concurrency) CONCURRENCY=$2; shift 2 ;;
    *) break ;;
  esac
done
args=(profile -m multilora --endpoint-type kserve --backend vllm --url "$URL" --streaming
      --tokenizer "$ROOT/demo/base"
      --synthetic-input-tokens-mean 8 --synthetic-input-tokens-stddev 0
      --output-tokens-mean 32 --output-tokens-mean-deterministic
      --concurrency "$CONCURRENCY" --request-count 200
      --server-metrics-url "http://${URL%:*}:8002/metrics")
[ -n "$LORA" ] && args+=(--extra-inputs "lora_name:$LORA")
exec genai-perf "${args[@]}" "$@"
