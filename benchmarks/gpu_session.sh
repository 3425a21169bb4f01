#!/usr/bin/env bash
# The GPU checks and measurements of issues 5, 6 and 17 in one device command of about 400 s (an H200 with
# PyTorch 2.11, cuda-bindings 13, no TensorRT, no diffusers: carry its wheel).
#
# THE PLAN (15 minutes of device time in all, one command at most 600 s, only $OUT comes back):
#   1. decisive, one call:  run(command="bash benchmarks/gpu_session.sh", timeout_s=420, carry=[".whl"])
#        setup ~10 s; gpu_check.py (buffers, tiny, sd15; --budget-s CHECK_S=95); gpu_fastpath.py with the rest of
#        PLAN_S=400 (~280 s): prepare ~35, diffusers-eager ~35, then ours-compiled and diffusers-compiled
#        together (both compile at once, then time one after the other) ~210; results-gpu.json at the end.
#        A machine's start (1-2 min) + 420 s leaves about 6 minutes.
#   2. follow-up, only if step 1 came back and >= 6 minutes of device time are left, at once (the machine stays
#      warm 30 s, and /tmp/sdengine-gpu-session with the weights and compiler caches is still there):
#        run(command="ONLY=followup PLAN_S=280 bash benchmarks/gpu_session.sh", timeout_s=300, carry=[".whl"])
#        ours-graph (eager/graph/channels_last rows, attention kernels) and throughput (batches 2, 4, 8).
#      If step 1 failed instead, fix and rerun only the failed phase: ONLY=check PLAN_S=120 (timeout_s 140) or
#      ONLY=fast PLAN_S=290 (timeout_s 310). Then give_back.
#   The estimates behind these numbers are gpu_fastpath.py's EST_S and gpu_check.py's PART_SECONDS: guesses until
#   the first run; step 1 writes each part's real wall time (part-end rows, summary.txt).
#
# Output: everything printed goes to standard output AND to $OUT/session.log as it is printed (tee). Every SNAP_S
# seconds (20) the work folder is packed into $OUT/gpu-results.tgz and $OUT/results-gpu.json is rewritten from what
# exists (partial: true), so a command killed at its limit still returns what was measured. At the end the final
# results-gpu.json (partial: false) and the archive are written; copy results-gpu.json to
# benchmarks/results-gpu.json. $OUT holds 3 files (the device returns at most 8).
#
# diffusers (0.42.1) and importlib_metadata are not on the device. Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
# (zipp, huggingface-hub, safetensors, regex, requests, filelock, Pillow and numpy are there already). Without the
# wheels the diffusers rows are skipped, each saying why, and the other parts get their time.
#
# Knobs: ONLY=decisive|followup|check|fast, PLAN_S, CHECK_S, SNAP_S, PY (the Python; tests point it at a stand-in).
set -u
OUT=${OUT:-gpu-session-out}
ONLY=${ONLY:-decisive}
PLAN_S=${PLAN_S:-400}
CHECK_S=${CHECK_S:-95}
SNAP_S=${SNAP_S:-20}
PY=${PY:-python3}
WORK=${WORK:-/tmp/sdengine-gpu-session}
FINAL_S=15   # kept back from PLAN_S for the last snapshot
START=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
left() { echo $((PLAN_S - ($(date +%s) - START))); }

case "$ONLY" in
    decisive) PHASES="check fast"; FAST_PARTS="diffusers-eager,ours-compiled,diffusers-compiled"; FAST_OUT=fast ;;
    followup) PHASES="fast"; FAST_PARTS="ours-graph,throughput"; FAST_OUT=fast2 ;;
    check) PHASES="check"; FAST_OUT=fast ;;
    fast) PHASES="fast"; FAST_PARTS="diffusers-eager,ours-compiled,diffusers-compiled"; FAST_OUT=fast ;;
    *) echo "ONLY must be decisive, followup, check or fast (got $ONLY)"; exit 2 ;;
esac
case "$ONLY" in  # what this run measures starts clean; the rest of an earlier run on this machine is kept
    decisive) rm -rf "$WORK/check" "$WORK/fast" ;;
    check) rm -rf "$WORK/check" ;;
    *) rm -rf "$WORK/$FAST_OUT" ;;
esac
mkdir -p "$WORK/check" "$WORK/$FAST_OUT"

FASTS="--fast $WORK/fast"
[ "$FAST_OUT" = fast2 ] && FASTS="$FASTS --fast $WORK/fast2"
snapshot() {  # $1: --final or nothing
    tar czf "$OUT/.gpu-results.tgz.tmp" -C "$WORK" --exclude='*.safetensors' --exclude='*-cache' --exclude='compare' \
        --exclude='sync' --exclude='*.npz' check fast $( [ -d "$WORK/fast2" ] && echo fast2 ) 2>/dev/null \
        && mv "$OUT/.gpu-results.tgz.tmp" "$OUT/gpu-results.tgz"
    "$PY" benchmarks/gpu_results.py --check "$WORK/check" $FASTS --out "$OUT/results-gpu.json" ${1:-} >/dev/null 2>&1
}
(while sleep "$SNAP_S"; do snapshot; done) &
SNAPPER=$!
trap 'kill $SNAPPER 2>/dev/null; snapshot --final' EXIT
# Killed (SIGTERM, as a shell's timeout sends): stop the running phase at once (its timeout passes the signal on to
# the script, which kills its parts' process groups: benchmarks/procs.py), then the EXIT trap packs what was measured.
PHASE=
trap '[ -n "$PHASE" ] && kill -TERM "$PHASE" 2>/dev/null; exit 143' TERM INT HUP
run_phase() {  # in the background and waited for, so a signal is handled while the phase runs
    "$@" &
    PHASE=$!
    wait "$PHASE"
    local rc=$?
    PHASE=
    return $rc
}

echo "gpu_session: ONLY=$ONLY PLAN_S=$PLAN_S, $(date -u +%H:%M:%S) UTC"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD"
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$WORK/check/nvidia-smi.txt"
fi

for phase in $PHASES; do
    if [ "$(left)" -lt $((FINAL_S + 20)) ]; then
        echo "== $phase skipped: $(left) s of PLAN_S left =="
        continue
    fi
    if [ "$phase" = check ]; then
        budget=$(( CHECK_S < $(left) - FINAL_S ? CHECK_S : $(left) - FINAL_S ))
        echo "== gpu_check.py (budget ${budget} s) =="
        run_phase timeout -k 5 $((budget + 15)) "$PY" benchmarks/gpu_check.py --out "$WORK/check" --budget-s "$budget" \
            --timing-steps 10 --full-steps 20
        echo "gpu_check exit $?"
    else
        budget=$(( $(left) - FINAL_S ))
        echo "== gpu_fastpath.py --parts $FAST_PARTS (budget ${budget} s) =="
        run_phase timeout -k 5 $((budget + 10)) "$PY" benchmarks/gpu_fastpath.py --out "$WORK/$FAST_OUT" --work "$WORK/work" \
            --budget-s "$budget" --parts "$FAST_PARTS" --runs 8
        echo "gpu_fastpath exit $?"
    fi
done
kill "$SNAPPER" 2>/dev/null
trap - EXIT
snapshot --final
echo "== results-gpu.json =="
cat "$OUT/results-gpu.json"
echo "gpu_session: done in $(( $(date +%s) - START )) s"
