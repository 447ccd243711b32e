#!/usr/bin/env bash
# Everything that needs the H200, in one go: kernel tests compiled for the GPU, then the
# benchmarks. Results land in OUT (default experiments/results); logs beside them.
#   bash experiments/gpu_suite.sh [OUT] [STEP ...]
#   steps: fixture tests prefill decode probe dense e2e splits testbed finetune stage5 stage6
#   stage8 stage9 stage10 stage11 gates ablations diagnostics
#   (default: the kernel and speed steps; splits reruns short-context and LServe decode rows
#   with the decode kernel's split floor relaxed below 256 programs (the default), never
#   (MIN_PROGRAMS=1) or below 2048, ~7 min). The testbed recipe is testbed (stages
#   1-2 from scratch, ~9 min), finetune (stages 3-4 on distinct questions, ~11 min), stage5
#   (eval-shaped rows and its DuoAttention pattern, patterns/testbed_stage5, ~7 min), stage6
#   (that pattern's low heads trained to stream in half of the steps, ~7 min), stage8 (eval
#   rows weighted toward two-hop tracking and the edge depths, ~6 min), stage9 (after stage8:
#   stage 8 with the concentration loss, 9b, then 9c, ~10 min; measured with 9b beside a side
#   run, stage 9, so alone 9b runs more steps), stage10 (9c with its streaming heads streaming
#   in 3 steps of 4, ~5 min), stage11 (10 on rows weighted toward two-hop tracking and
#   multi-value, ~7 min, into lserve_jax/assets/testbed) and gates (the committed pattern,
#   ~1 min). ablations runs the accuracy configs on the committed testbed and diagnostics the
#   20-prompt diagnostics, each config as two processes (its largest context, the rest) side
#   by side under a GPU memory budget, merged per config (experiments/run_parallel.py). One
#   H200 merges ~11 of the 13 ablations in a step's 9.5 min, the last configs' 8K parts cut off
#   (timings in the README): under a 10-minute limit per call, run the rest apart, e.g.
#   ABLATIONS="static_sparsity granularity". Pick configs with ABLATIONS=... or DIAGNOSTICS=....
# e2e reads a DuoAttention pattern: copy ../shared/duo_patterns/<model> into .patterns/ (git
# ignores it: it is another project's data) and carry that folder to the device.
set -uo pipefail
out=${1:-experiments/results}; shift || true
steps=${*:-tests prefill decode dense e2e}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
side_by_side() {  # accuracy configs by name, side by side on the GPU, merged per config
  timeout 590 python3 experiments/run_parallel.py $(printf "experiments/configs/%s.toml " "$@") \
    --minutes 9.5
}
for step in $steps; do
  case $step in
    fixture) timeout 90 python3 experiments/make_hf_fixture.py /tmp/hf_tiny_llama \
               && tar -C /tmp -cf "$out/hf_tiny_llama.tar" hf_tiny_llama ;;
    tests) JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider \
             ${TESTS:-tests/kernels} 2>&1 | tail -25 ;;
    prefill) timeout ${PREFILL_S:-300} python3 experiments/bench_prefill_attention.py \
               --out "$out" ;;
    decode) timeout ${DECODE_S:-300} python3 experiments/bench_decode_attention.py \
              --out "$out" --sweep ${DECODE_SHAPES:+--shapes $DECODE_SHAPES} ;;
    probe) timeout ${PROBE_S:-400} python3 experiments/probe_decode_kernels.py --out "$out" ;;
    dense) timeout ${DENSE_S:-200} python3 experiments/bench_dense_decode.py --out "$out" \
             --backends ${DENSE_BACKENDS:-pallas cudnn} ${DENSE_SHAPES:+--shapes $DENSE_SHAPES} ;;
    e2e) timeout ${E2E_S:-540} python3 experiments/bench_e2e.py --out "$out" \
           --pattern ${DUO_PATTERN:-.patterns/Llama-3-8B-Instruct-Gradient-1048k} ;;
    splits) timeout ${SPLITS_S:-540} python3 experiments/bench_e2e.py --out "$out/splits" \
              --policies dense lserve --decode 1x4096 1x262144 4x131072 --ttft \
              --vary MIN_PROGRAMS=1,256,2048 \
              --pattern ${DUO_PATTERN:-.patterns/Llama-3-8B-Instruct-Gradient-1048k} ;;
    testbed) timeout 330 python3 experiments/train_testbed.py experiments/configs/train_testbed.toml \
               && timeout 270 python3 experiments/train_testbed.py \
                    experiments/configs/train_testbed_stage2.toml ;;
    finetune) timeout 330 python3 experiments/train_testbed.py \
                experiments/configs/train_testbed_stage3.toml \
              && timeout 330 python3 experiments/train_testbed.py \
                   experiments/configs/train_testbed_stage4.toml ;;
    stage5) timeout 340 python3 experiments/train_testbed.py \
              experiments/configs/train_testbed_stage5.toml \
            && timeout 120 python3 experiments/train_gates.py --steps 600 --local 64 \
                 --out experiments/patterns/testbed_stage5 --results "$out/stage5_gates" ;;
    stage6) timeout 450 python3 experiments/train_testbed.py \
              experiments/configs/train_testbed_stage6.toml ;;
    stage8) timeout 360 python3 experiments/train_testbed.py \
              experiments/configs/train_testbed_stage8.toml ;;
    stage9) timeout 330 python3 experiments/train_testbed.py \
              experiments/configs/train_testbed_stage9b.toml \
            && timeout 360 python3 experiments/train_testbed.py \
                 experiments/configs/train_testbed_stage9c.toml ;;
    stage10) timeout 330 python3 experiments/train_testbed.py \
               experiments/configs/train_testbed_stage10.toml ;;
    stage11) timeout 440 python3 experiments/train_testbed.py \
               experiments/configs/train_testbed_stage11.toml ;;
    gates) timeout 120 python3 experiments/train_gates.py --steps 400 --length 8192 --local 64 ;;
    ablations) side_by_side ${ABLATIONS:-policies_n20 budget_n20 policies policies_pages16 \
                 policies_pages16_r1 heads page_size reuse reuse_pages16 static_sparsity budget \
                 sink_page granularity} ;;
    diagnostics) side_by_side ${DIAGNOSTICS:-window_n20 prefill_window_n20 sink_page_n20 \
                   static_sparsity_n20 paper_reuse_n20 policies_n20_seed1} ;;
    *) echo "unknown step $step" ;;
  esac 2>&1 | tee "$out/$step.log" | grep -v "^WARNING" | tail -40
done
