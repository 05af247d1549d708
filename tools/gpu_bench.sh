#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md in two runs of the GPU machine (each well under 10 minutes);
# results and logs under $OUT (the folder that comes back), tables on stdout.
#
#   tools/gpu_bench.sh engine    # GPU tests, a profiled decode step, bench/engine.py, bench/peers.py
#   tools/gpu_bench.sh serving   # bench/serving.py (S1 through tritonserver and engine-direct, CONFIGS); carry .whl
#                                # (filled here by tools/gpu_triton_setup.sh pack)
#   tools/gpu_bench.sh checks    # GPU tests, then tools/gpu_faults.py (engine and launcher killed); carry .whl
#   tools/gpu_bench.sh saturation  # bench/serving.py at 30 and 40 req/s, n = 2000, both paths; carry .whl
#   tools/gpu_bench.sh coldstart # an empty kernel cache: start-up, then 120 s of S1 through tritonserver in
#                                # two windows; then S1 through both paths on the cache it filled; carry .whl
#   tools/gpu_bench.sh warmstart # tools/check_warm_start.py: kernels compiled at start-up and during traffic
#   tools/gpu_bench.sh lora      # GPU tests, eager profiles (LoRA-off batch 32; batch 1 and 64, rank 16 all-linear),
#                                # bench/engine.py at batch 1, 32, 64, 256, bench/kernels.py
#   tools/gpu_bench.sh overlap   # the tests of the LoRA stream and deferred deltas on CUDA (with fp16 fidelity), then
#                                # bench/engine.py --lora-schedule overlap,serial at batch 1 and 64 (BATCHES), prefill
#   tools/gpu_bench.sh upload    # bench/upload.py: a 7B rank-16 all-linear adapter (80 MB) uploaded through
#                                # Triton until its first token (target <= 1 s); carry .whl
#   tools/gpu_bench.sh kernels   # the LoRA kernel tests compiled (every dtype, real shapes), bench/kernels.py
#   tools/gpu_bench.sh sweep     # bench/kernels.py --sweep: lora_fused (then shrink, expand) tile candidates
#   tools/gpu_bench.sh sweepdecode  # bench/kernels.py --sweep-decode: shrink and expand over a tile grid at the
#                                # decode graphs' (and prefill's) shapes, then the rank-bound graph test
#   tools/gpu_bench.sh final     # bench/engine.py at BATCHES (default 1,32,64) with prefill, bench/kernels.py
#                                # --lora-only, then fp16 fidelity and the CUDA LoRA tests
#   tools/gpu_bench.sh pdl       # the LoRA kernel tests (fp16, with the pair launched as the engine does) and the
#                                # LoRA stream's, bench/kernels.py --lora-only (with and without PDL); then, with
#                                # ENGINE=1, bench/engine.py at BATCHES (default 1,64) --pdl on,off
#   tools/gpu_bench.sh trace     # the LoRA kernel tests on CUDA, tools/trace_step.py (kernel and stream timelines of
#                                # decode graphs and prefill steps), bench/engine.py at BATCHES (default 64) with prefill
#
# Each step has its own time limit, so one that hangs does not take the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/multilora-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.

step() {  # step SECONDS NAME COMMAND...: run with a limit, keep the whole log, show its end
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $?"
    grep -v -e '^[IW][0-9]' -e 'Warning' -e '_warn_once' "$OUT/$name.log" | tail -n 40
}

case "${1:-}" in
    engine)
        step 160 gpu_tests python -m pytest -q -m gpu tests/kernels tests/fidelity/test_gpu_fp16.py -p no:cacheprovider
        step 60 gpu_async_tests python -m pytest -q tests/unit/test_async_scheduling.py -p no:cacheprovider
        step 90 profile32 python tools/profile_step.py --batch 32
        step 90 profile32_lora python tools/profile_step.py --batch 32 --lora mixed
        step 300 engine python bench/engine.py --json "$OUT/bench_engine_h100.json"
        step 120 peers python bench/peers.py --adapters 16 --json "$OUT/bench_peers_h100.json"
        ;;
    kernels)
        step 300 gpu_lora_tests python -m pytest -q tests/kernels/test_lora.py tests/kernels/test_lora_fused.py \
            tests/kernels/test_bench_lora.py -p no:cacheprovider
        step 280 kernels python bench/kernels.py --json "$OUT/bench_kernels_h200.json"
        ;;
    sweep)
        step 580 kernels_sweep python bench/kernels.py --sweep --sweep-only --sweep-seconds 480 \
            --json "$OUT/bench_kernels_sweep_h200.json"
        ;;
    sweepdecode)  # bench/kernels.py --sweep-decode: the decode graphs' (and prefill's) shrink and expand over a tile grid
        step 450 kernels_sweep_decode python bench/kernels.py --sweep-decode --sweep-seconds 420 \
            --json "$OUT/bench_kernels_sweep_decode_h200.json"
        step "${TESTS_LIMIT:-120}" gpu_graph_tests python -m pytest -q tests/unit/test_decode_graphs.py \
            -k largest_rank -p no:cacheprovider -rs
        ;;
    serving)
        tools/gpu_triton_setup.sh install /tmp/multilora-venv > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
        # Triton compiles its kernels on first use, per shape class, into ~/.triton/cache; on a fresh
        # machine that takes minutes of the first path's time. A short engine-direct run fills the
        # cache first (not measured), so both measured paths start from the same warm cache.
        step 150 kernel_cache_warmup /tmp/multilora-venv/bin/python bench/serving.py --paths direct \
            --configs s1:2000:20 --duration 10 --grace 3 --time-budget 140
        export MULTILORA_FAULTHANDLER="$OUT/stub_stacks.txt"
        step 420 serving /tmp/multilora-venv/bin/python bench/serving.py \
            --configs "${CONFIGS:-s1:5:20,s1:2000:20,s1:2000:40}" --duration 25 --grace 6 --time-budget 400 \
            --json "$OUT/bench_serving_h200.json" --server-log "$OUT/tritonserver.log"
        gzip -f "$OUT/tritonserver.log"
        ;;
    checks)
        tools/gpu_triton_setup.sh install /tmp/multilora-venv > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
        step 200 gpu_tests python -m pytest -q -x -m gpu tests/kernels tests/fidelity/test_gpu_fp16.py -p no:cacheprovider
        step 90 gpu_engine_tests python -m pytest -q -x tests/unit/test_async_scheduling.py tests/unit/test_logprobs.py \
            tests/unit/test_decode_graphs.py -p no:cacheprovider
        step 240 faults /tmp/multilora-venv/bin/python tools/gpu_faults.py --json "$OUT/faults_h200.json"
        ;;
    saturation)
        tools/gpu_triton_setup.sh install /tmp/multilora-venv > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
        step 540 saturation /tmp/multilora-venv/bin/python bench/serving.py --configs s1:2000:30,s1:2000:40 \
            --duration 25 --grace 6 --time-budget 520 --json "$OUT/bench_saturation_h200.json"
        ;;
    coldstart)
        # An empty kernel cache: the engine compiles at start-up, then 120 s of S1 n=2000 through
        # tritonserver in 60 s windows; then, on the cache it filled, both paths at 20 req/s.
        tools/gpu_triton_setup.sh install /tmp/multilora-venv > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
        export TRITON_CACHE_DIR=$(mktemp -d)
        step 300 coldstart /tmp/multilora-venv/bin/python bench/serving.py --paths triton --configs s1:2000:20 \
            --no-warmup --duration 120 --grace 3 --window 60 --time-budget 290 --json "$OUT/bench_coldstart_h200.json" \
            --server-log "$OUT/tritonserver_cold.log"
        step 250 serving /tmp/multilora-venv/bin/python bench/serving.py --configs "${CONFIGS:-s1:5:20,s1:2000:20}" \
            --duration 20 --grace 5 --time-budget 240 --json "$OUT/bench_serving_h200.json" \
            --server-log "$OUT/tritonserver.log"
        gzip -f "$OUT"/tritonserver*.log
        ;;
    lora)
        step 200 gpu_tests python -m pytest -q -m gpu tests/kernels tests/fidelity/test_gpu_fp16.py -p no:cacheprovider
        step 80 profile1_lora python tools/profile_step.py --eager --batch 1 --lora mixed --rank 16 --modules all
        step 80 profile32_base python tools/profile_step.py --eager --batch 32
        step 80 profile64_lora python tools/profile_step.py --eager --batch 64 --lora mixed --rank 16 --modules all
        step 260 engine python bench/engine.py --batches "${BATCHES:-1,32,64,256}" --json "$OUT/bench_engine_h200.json"
        [ -n "${KERNELS:-}" ] && step 150 kernels python bench/kernels.py --json "$OUT/bench_kernels_h200.json"
        ;;
    overlap)
        step 240 gpu_tests python -m pytest -q -x tests/unit/test_lora_deferred.py tests/kernels/test_engine_kernels.py \
            tests/fidelity/test_gpu_fp16.py tests/unit/test_decode_graphs.py tests/kernels/test_elementwise.py \
            -p no:cacheprovider -rs -s
        step 320 engine python bench/engine.py --batches "${BATCHES:-1,64}" --lora-schedule overlap,serial \
            --json "$OUT/bench_engine_h200.json"
        ;;
    trace)
        step 150 gpu_lora_tests python -m pytest -q -x tests/kernels/test_engine_kernels.py \
            tests/unit/test_lora_deferred.py "tests/kernels/test_lora.py::test_lora_real_shapes" -k "not bfloat16" \
            -p no:cacheprovider -rs
        step 170 trace python tools/trace_step.py ${CASES:+--cases "$CASES"} --out "$OUT"
        step 240 engine python bench/engine.py --batches "${BATCHES:-64}" --json "$OUT/bench_engine_h200.json"
        ;;
    final)  # the LoRA-kernel issue's figures in one call: bench/engine.py, bench/kernels.py, then fp16 fidelity and
            # the CUDA LoRA tests with the time left (TESTS_LIMIT)
        step 270 engine python bench/engine.py --batches "${BATCHES:-1,32,64}" --json "$OUT/bench_engine_h200.json"
        step 130 kernels python bench/kernels.py --lora-only --json "$OUT/bench_kernels_h200.json"
        step "${TESTS_LIMIT:-180}" gpu_tests python -m pytest -q tests/fidelity/test_gpu_fp16.py \
            tests/unit/test_lora_deferred.py ${FINAL_TESTS:-tests/unit/test_decode_graphs.py} -p no:cacheprovider -rs -s
        ;;
    pdl)  # programmatic dependent launch of the expand: correctness first, then the pair with and without it
        if [ -z "${ENGINE:-}" ]; then
            step "${TESTS_LIMIT:-150}" gpu_lora_tests python -m pytest -q -x tests/kernels/test_lora.py \
                tests/unit/test_lora_deferred.py -k "not bfloat16 and not real_shapes" -p no:cacheprovider -rs
            step 200 kernels python bench/kernels.py --lora-only --json "$OUT/bench_kernels_h200.json"
        else
            step 420 engine python bench/engine.py --batches "${BATCHES:-1,64}" --pdl on,off \
                --json "$OUT/bench_engine_h200.json"
        fi
        ;;
    warmstart)
        step 500 warm_start python tools/check_warm_start.py --compare --json "$OUT/warm_start_h200.json"
        ;;
    upload)
        tools/gpu_triton_setup.sh install /tmp/multilora-venv > "$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
        step 540 upload /tmp/multilora-venv/bin/python bench/upload.py --runs 5 --server-log "$OUT/tritonserver_upload.log"
        ;;
    *)
        echo "usage: $0 engine|serving|checks|saturation|coldstart|warmstart|lora|overlap|upload|kernels|sweep|sweepdecode|pdl|trace|final" >&2
        exit 2
        ;;
esac
