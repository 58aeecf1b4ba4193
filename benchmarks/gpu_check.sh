#!/usr/bin/env bash
# Every pending GPU check in one run, prepared on the CPU; meant to finish in under 8 minutes on an
# H100/H200 (estimated from the CPU dry run and the 0.3 H200 timings: it has not run on a GPU yet).
#
#   bash benchmarks/gpu_check.sh             # on the lent GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --dry-run   # every step at toy size on the CPU (CI runs this)
#
# Writes benchmarks/results/gpu/ (JSON and logs, named after the device) and prints each step's
# wall time. A step that fails is reported and the others still run; the exit status is that of
# the first failure. Steps:
#   1. tests/test_cuda.py (the CUDA tests; they skip without a GPU)
#   2. host cost on the CUDA code path (ops and scalar reads per iteration, default and fused; fp32, and
#      bf16 at the CIFAR-100 shape)
#   3. synthesis against the bare model: CIFAR-100 ResNet-18 batch 100 and ImageNet-1k ResNet-18
#      batch 100 at 200/224, bf16 and fp16, and --fused-statistics in bf16
#   4. the paper's efficiency table (FADRM, FADRM+, SRe2L++, G-VBSM, EDC, CV-DD), beside the public
#      reference's own loop at the same shape when ../shared/bench/reference_recover.py is there
#   5. the reference's loop at the CIFAR-100 shape, for step 3's side-by-side
#   6. patch selection's data path against the decode floor on all the node's cores (CPU only)
#   7. students per hour with --jobs 1 and --jobs auto: CIFAR-100 CIFAR ResNet-18 students by the
#      common protocol on one GPU (random pixels and teacher; issue target: auto >= 4x one job)
#   8. the student step against its floor, by default and with views rendered on the host one batch ahead
#      and the fused optimiser (issue target: <= 1.3x the floor's time); the student step's host cost
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ "$DRY" = 1 ]; then
    DEVICE=cpu; TAG=dry-run; OUT=${OUT_DIR:-$(mktemp -d)}
else
    DEVICE=cuda; TAG=$($PY -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())"); OUT=benchmarks/results/gpu
fi
mkdir -p "$OUT"
REF=../shared/bench/reference_recover.py
STATUS=0

step() {  # step NAME COMMAND...: run, time, keep the log, remember the first failure
    local name=$1; shift
    local began=$SECONDS
    if "$@" >"$OUT/$TAG-$name.log" 2>&1; then
        echo "ok     $name ($((SECONDS - began)) s)"
    else
        local rc=$?
        echo "FAILED $name ($((SECONDS - began)) s, exit $rc): tail of $OUT/$TAG-$name.log"
        tail -n 15 "$OUT/$TAG-$name.log"
        [ "$STATUS" = 0 ] && STATUS=$rc
    fi
}

step test-cuda $PY -m pytest -q tests/test_cuda.py
if [ "$DRY" = 1 ]; then
    step host-cost $PY benchmarks/host_cost.py --dry-run --json "$OUT/$TAG-host-cost.json"
    step synthesis $PY benchmarks/synthesis_speed.py --configs fashion-mnist --iters 1 --warmup 1 --rounds 1 \
        --fused-statistics --json "$OUT/$TAG-synthesis.json"
    step efficiency $PY benchmarks/efficiency.py --dry-run --iters 1 --warmup 1 --methods fadrm g-vbsm \
        --json "$OUT/$TAG-efficiency.json"
    step patches $PY benchmarks/patch_speed.py --dry-run --data "$OUT/imagenet-like" --json "$OUT/$TAG-patches.json"
    step student-jobs $PY benchmarks/student_jobs.py --synthetic cifar100 --dry-run --jobs 1 2 \
        --json "$OUT/$TAG-student-jobs.json"
    step student-speed-lean $PY benchmarks/student_speed.py --configs fashion-mnist --batch-sizes 16 --steps 2 \
        --rounds 1 --views host --prefetch-views on --fused-optimizer on --json "$OUT/$TAG-student-speed-lean.json"
    step host-cost-students $PY benchmarks/host_cost.py --students --dry-run --json "$OUT/$TAG-host-cost-students.json"
else
    step host-cost $PY benchmarks/host_cost.py --device cuda --json "$OUT/$TAG-host-cost.json"
    # The same count under bf16 autocast, where the frozen weights are held in its dtype.
    step host-cost-bf16 $PY benchmarks/host_cost.py --device cuda --amp bf16 --configs cifar100 \
        --json "$OUT/$TAG-host-cost-bf16.json"
    for amp in bf16 fp16; do
        step synthesis-$amp $PY benchmarks/synthesis_speed.py --device cuda --amp $amp --configs cifar100 imagenet-b100 \
            --iters 10 --warmup 3 --rounds 1 --json "$OUT/$TAG-synthesis-$amp.json"
    done
    # The fused statistics in bf16 (fp16 adds the scaler's per-step read, the same with either path).
    step synthesis-bf16-fused $PY benchmarks/synthesis_speed.py --device cuda --amp bf16 --configs cifar100 \
        imagenet-b100 --iters 10 --warmup 3 --rounds 1 --fused-statistics --json "$OUT/$TAG-synthesis-bf16-fused.json"
    step efficiency $PY benchmarks/efficiency.py --device cuda --iters 8 --warmup 3 --json "$OUT/$TAG-efficiency.json"
    if [ -f "$REF" ]; then
        step reference-cifar100 $PY "$REF" cifar100 --device cuda --iters 20 --warmup 5
    fi
    # The data stage on the GPU node's many cores (CPU only): patch selection against the decode floor.
    step patches $PY benchmarks/patch_speed.py --rounds 1 --per-class 50 --data /tmp/fadrm-imagenet-like \
        --json "$OUT/$TAG-patches.json"
    step student-jobs $PY benchmarks/student_jobs.py --synthetic cifar100 --device cuda --jobs 1 auto --epochs 1 \
        --repeats 8 --json "$OUT/$TAG-student-jobs.json"
    # The demo's and CIFAR's step at the published batch of 16 (the launch-bound case), default and lean.
    step student-speed $PY benchmarks/student_speed.py --device cuda --rounds 1 --batch-sizes 16 \
        --json "$OUT/$TAG-student-speed.json"
    step student-speed-lean $PY benchmarks/student_speed.py --device cuda --rounds 1 --batch-sizes 16 --views host \
        --prefetch-views on --fused-optimizer on --json "$OUT/$TAG-student-speed-lean.json"
    step host-cost-students $PY benchmarks/host_cost.py --students --device cuda \
        --json "$OUT/$TAG-host-cost-students.json"
fi
echo "results in $OUT"
exit $STATUS
