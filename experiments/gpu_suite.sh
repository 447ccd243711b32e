#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one go: the kernel tests compiled for the GPU, the
# benchmarks, the testbed recipe and the accuracy tables. Results land in OUT (default
# experiments/results/<device>, named by the benchmarks from the device), logs beside them.
#   bash experiments/gpu_suite.sh [OUT] [STEP ...]
# Results record the checkout's commit; where the checkout is a copy whose git metadata is not
# the commit being run, pass it: LSERVE_GIT_COMMIT=$(git rev-parse HEAD) from the source tree.
# Steps (default: tests prefill decode dense e2e):
#   tests     the kernel tests, compiled (JAX_PLATFORMS=cuda)
#   prefill   one-layer prefill attention against cuDNN (bench_prefill_attention.py)
#   decode    one-layer decode attention against cuDNN (bench_decode_attention.py)
#   probe     device time per call of the decode kernel and top-k over their tuning
#   dense     whole-model dense decode against its floor (bench_dense_decode.py)
#   e2e       the Llama-3-8B shape end to end per policy (bench_e2e.py); reads a DuoAttention
#             pattern: copy ../shared/duo_patterns/<model> into .patterns/ (git ignores it)
#   serving   continuous batching against the wave schedule per policy (bench_serving.py;
#             SERVING_ARGS="--mix B", "--rates 0.05 0.1 --schedules continuous"; same pattern)
#   quantized one layer of decode per KV format and the decode GEMMs bf16 / FP8
#             (bench_quantized.py)
#   precision the Llama-3-8B shape end to end at bf16, KV8 and FP8 weights + KV8, with the
#             capacity at 128K computed and allocated (bench_e2e.py --precision --allocate,
#             e2e_quantized.json; PRECISION_ARGS adds flags)
#   select    page selection of one 8B layer: fixed top-k, anchored, top-p (bench_select.py)
#   identify  DuoAttention gate training on the Llama-3-8B shape, time and memory at 4K / 8K
#             (bench_identify_heads.py; IDENTIFY_ARGS adds flags)
#   fixture   rebuilds the HF parity fixture (needs torch + transformers)
#   testbed   the testbed recipe (experiments/configs/testbed_recipe.toml, about an hour;
#             RECIPE_ARGS="--from STEP --to STEP" runs a part)
#   accuracy  the accuracy configs on the committed testbed (ACCURACY="policies_n20 ..." picks)
#   grids     sweeping accuracy configs as concurrent processes (experiments/run_grid.py;
#             GRIDS="precision_n20 precision_n20_seed1", GRID_ARGS="--minutes 8.5 ..."; on an
#             H100, 21 processes at --memory-fraction 0.04 left 11 parts without rows, 13 at
#             0.065 and 7 at 0.1 all finished: rerun failed parts with --only VALUE ...)
set -uo pipefail
out=${1:-}; shift || true
steps=${*:-tests prefill decode dense e2e}
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
logs=${out:-runs/gpu_suite}
mkdir -p "$logs"
outdir=${out:+--out $out}
pattern=${DUO_PATTERN:-.patterns/Llama-3-8B-Instruct-Gradient-1048k}
for step in $steps; do
  case $step in
    tests) JAX_PLATFORMS=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider \
             ${TESTS:-tests/kernels} 2>&1 | tail -25 ;;
    prefill) timeout ${PREFILL_S:-300} python3 experiments/bench_prefill_attention.py $outdir ;;
    decode) timeout ${DECODE_S:-300} python3 experiments/bench_decode_attention.py $outdir \
              ${DECODE_SHAPES:+--shapes $DECODE_SHAPES} ;;
    probe) timeout ${PROBE_S:-400} python3 experiments/probe_decode_kernels.py $outdir ;;
    dense) timeout ${DENSE_S:-200} python3 experiments/bench_dense_decode.py $outdir \
             ${DENSE_SHAPES:+--shapes $DENSE_SHAPES} ;;
    e2e) timeout ${E2E_S:-540} python3 experiments/bench_e2e.py $outdir --pattern "$pattern" \
           ${E2E_ARGS:-} ;;
    serving) timeout ${SERVING_S:-560} python3 experiments/bench_serving.py $outdir \
               --pattern "$pattern" ${SERVING_ARGS:-} ;;
    quantized) timeout ${QUANTIZED_S:-300} python3 experiments/bench_quantized.py $outdir \
                 ${QUANTIZED_ARGS:-} ;;
    precision) timeout ${PRECISION_S:-540} python3 experiments/bench_e2e.py $outdir \
                 --pattern "$pattern" --name e2e_quantized --policies dense lserve \
                 --decode 1x65536 1x131072 4x65536 --ttft --capacity 131072 --allocate \
                 --precision auto/auto auto/int8 fp8/int8 ${PRECISION_ARGS:-} ;;
    grids) for name in ${GRIDS:-precision_n20 precision_n20_seed1}; do
             python3 experiments/run_grid.py experiments/configs/$name.toml \
               --output-dir "${out:-runs}/accuracy" ${GRID_ARGS:-} &
           done; wait ;;
    select) timeout ${SELECT_S:-200} python3 experiments/bench_select.py $outdir ;;
    identify) timeout ${IDENTIFY_S:-300} python3 experiments/bench_identify_heads.py $outdir \
                --length 4096 8192 ${IDENTIFY_ARGS:-} ;;
    fixture) timeout 90 python3 experiments/make_hf_fixture.py /tmp/hf_tiny_llama \
               && tar -C /tmp -cf "$logs/hf_tiny_llama.tar" hf_tiny_llama ;;
    testbed) python3 experiments/train_testbed.py experiments/configs/testbed_recipe.toml \
               --results "${out:-runs/testbed}/testbed" ${RECIPE_ARGS:-} ;;
    accuracy) for name in ${ACCURACY:-policies_n20 policies_n20_seed1 policies policies_pages16 \
                policies_pages16_r1 paper_reuse_n20 budget_n20 heads page_size reuse \
                reuse_pages16 static_sparsity static_sparsity_n20 budget sink_page sink_page_n20 \
                granularity window_n20 prefill_window_n20}; do
                python3 -m lserve_jax.cli run experiments/configs/$name.toml \
                  --output-dir "${out:-runs}/accuracy"
              done ;;
    *) echo "unknown step $step" ;;
  esac 2>&1 | tee "$logs/$step.log" | grep -v "^WARNING" | tail -40
done
