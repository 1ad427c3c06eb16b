#!/bin/bash
# The device-budget benchmarks on one GPU, in one run of under 10 minutes on an H100 (fp16):
#   1. the latency table of 12 SD-1.x candidates at 512 px, CUDA-graph timing, against each whole
#      candidate measured the same way, with the calibration's leave-one-out and K=5 errors;
#   2. predicted against measured peak memory of whole requests (tiny at 32 px, SD-1.5 shapes at 512
#      and 768 px).
# Writes results/latency_lut_<gpu>_float16_512px.*, results/lut/<gpu>-float16-512px-b1.json and
# results/peak_memory_cuda.{json,md}; each step has its own time limit, so one that runs long does
# not cost the other.
#
#   bash benchmarks/gpu_device_budget.sh            # from the repository root, with .venv set up
set -u
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 330 "$PY" benchmarks/bench_latency_lut.py --device cuda --dtype float16 --resolution 512 || echo "latency table: exit $?"
timeout 200 "$PY" benchmarks/bench_peak_memory.py --device cuda --dtype float16 --cases tiny:32,sd15:512,sd15:768 \
    --out results/peak_memory_cuda || echo "peak memory: exit $?"
