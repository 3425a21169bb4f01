#!/usr/bin/env bash
# The GPU checks of issues 5 and 6 in one device call (an H100 with PyTorch, cuda-python, no TensorRT).
#
#   bash benchmarks/gpu_session.sh            # from the repository root; results in $OUT
#
# 1. benchmarks/gpu_check.py   the lean CUDA runtime (buffers, whole-loop graph, fp16 vs CPU reference,
#                              SD 1.5-shaped U-Net step times with and without the graph): CHECK_S seconds
# 2. benchmarks/gpu_fastpath.py ours vs diffusers eager and compiled + CUDA graphs, end to end, same
#                              weights: FAST_S seconds (its own --budget-s)
# Each script writes its files as it goes; each folder is packed into one archive in $OUT as soon as its
# script ends (the device returns at most 8 files), and the printed summaries end the output.
# diffusers is not installed on the device: carry its wheel (the fast-path script skips the diffusers rows
# without it). Once, here: echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps
#   --only-binary=:all: --python-version 3.12 --implementation cp -d .whl diffusers==0.42.1
# then run with carry [".whl"] and timeout_s 600. Both scripts in one call fit 600 s with the defaults
# below (the fast path then gets 360 s, so its last parts may be skipped); for the full budget use two
# calls on the same warm machine: ONLY=check (timeout_s 240), then ONLY=fast FAST_S=440 (timeout_s 500).
set -u
OUT=${OUT:-gpu-session-out}
ONLY=${ONLY:-both}
CHECK_S=${CHECK_S:-180}
FAST_S=${FAST_S:-360}
WORK=/tmp/sdengine-gpu-session
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK/check" "$WORK/fast"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$WORK/check/nvidia-smi.txt" 2>&1

if [ "$ONLY" != fast ]; then
    timeout "$CHECK_S" python3 benchmarks/gpu_check.py --out "$WORK/check" > "$WORK/check/stdout.txt" 2>&1
    echo "gpu_check exit $?" >> "$WORK/check/stdout.txt"
    tar czf "$OUT/gpu-check.tgz" -C "$WORK" check
fi
if [ "$ONLY" != check ]; then
    timeout $((FAST_S + 30)) python3 benchmarks/gpu_fastpath.py --out "$WORK/fast" --budget-s "$FAST_S" \
        > "$WORK/fast/stdout.txt" 2>&1
    echo "gpu_fastpath exit $?" >> "$WORK/fast/stdout.txt"
    tar czf "$OUT/gpu-fastpath.tgz" -C "$WORK" fast
fi

cat "$WORK/check/nvidia-smi.txt" "$WORK"/*/stdout.txt
