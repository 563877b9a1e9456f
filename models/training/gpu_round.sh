#!/usr/bin/env bash
# One training round of lung-lesion-unet on a lent GPU machine, in one device call.
#
# The device tool lends a machine for 15 minutes of device time in all, one command at most 10
# minutes, and the machine starts bare (its own python3 with PyTorch, numpy, scipy and onnx; no
# pydicom, no shared data). This script is that one command: it builds the training caches on the
# grid the node runs (4 x 1.5 x 1.5 mm) on the machine's 16 cores, rebuilds a checkpoint from the
# shipped graph (from_onnx.py) and fine-tunes it with batch 32 for a fixed number of minutes, with
# the focus cache of small attached lesions and mirrored crop ends (what the CPU rounds of 1.4.0 and
# 1.5.0 did with batch 4). The checkpoint and the log come back through $OUT; export, validation
# and the test sets run on the CPU machine (models/README.md, "The next training round").
#
# Here, once:   .venv/bin/python models/training/synth.py --split real --real-cache .real
# There:        models/training/gpu_round.sh   (the device tool's run, timeout_s 600, carry
#               [".real/ct-A0001-5mm-lung-kernel.npz"]: 19 MB beside the 20 MB working tree)
# Dry run here: PHANTOMS=2 REAL_COPIES=1 FOCUS=0 ITERATIONS=2 BATCH=2 WORKERS=2 OUT=/tmp/gr \
#               PYTHON=.venv/bin/python models/training/gpu_round.sh
set -euo pipefail

python=${PYTHON:-python3}
out=${OUT:?OUT: the folder that comes back}
work=${WORK:-/tmp/gpu-round}
real=${REAL_CACHE:-.real}            # the real training host as npz (synth.py --split real)
phantoms=${PHANTOMS:-128}            # training phantoms (1.2.0: 320 in 5.3 min on 16 cores)
copies=${REAL_COPIES:-32}            # copies of the real lung-kernel series (1.2.0: 64)
focus=${FOCUS:-1}                    # 1: also the focus cache (synth.py --focus small-attached)
workers=${WORKERS:-16}
iterations=${ITERATIONS:-2400}       # the schedule (1.2.0: ~0.1 s a step); --max-minutes stops it
minutes=${TRAIN_MINUTES:-4}          # early if need be; and never past the call's deadline:
deadline=${DEADLINE_SECONDS:-540}    # seconds from the start by which the checkpoint is saved
batch=${BATCH:-32}
lr=${LR:-2e-4}                       # CPU fine-tunes with batch 4: 5e-5 (1.5.0), 1e-4 (1.4.0)
grid=4,1.5,1.5

for f in "$real/ct-A0001-5mm-lung-kernel.npz" models/lung-lesion-unet/model.onnx; do
    [[ -f $f ]] || { echo "gpu_round: missing $f (see the header of $0)" >&2; exit 2; }
done
mkdir -p "$out" "$work"
log=$out/gpu-round.log
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1
started=$SECONDS
stamp() { echo "== $1 at $((SECONDS - started)) s"; }

stamp "start: $phantoms phantoms, $copies real copies, focus=$focus, $iterations steps of batch $batch"
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
"$python" models/training/synth.py --split train --out "$work/synth" --grid "$grid" \
    --phantoms "$phantoms" --real-copies "$copies" --body-patches 3 --workers "$workers" \
    --real-cache "$real" | tail -n 3
caches=("$work/synth/train")
if [[ $focus == 1 ]]; then
    stamp "focus cache"
    "$python" models/training/synth.py --split train --focus small-attached --out "$work/focus" \
        --grid "$grid" --random-patches 2 --workers "$workers" --real-cache "$real" | tail -n 3
    caches+=("$work/focus/train")
fi
caches+=("$work/synth/body")
stamp "data done"
"$python" models/training/from_onnx.py --onnx models/lung-lesion-unet/model.onnx --out "$work/init.pt"
# What is left before the deadline, less a minute for loading the caches and saving, caps the
# training minutes, so a slow data step shortens training instead of losing the checkpoint.
minutes=$("$python" -c "print(round(max(0.5, min($minutes, ($deadline - $((SECONDS - started)) - 60) / 60)), 2))")
stamp "training for at most $minutes min"
"$python" models/training/train.py --cache "${caches[@]}" --extra-fraction 0.4 \
    --init "$work/init.pt" --frozen-norm --channels 24,48,96,192 \
    --iterations "$iterations" --batch "$batch" --lr "$lr" --warmup 100 \
    --edge-crops --edge-slab mirror --edge-chance 0.5 \
    --max-minutes "$minutes" --threads 4 --out "$out/round.pt"
stamp "done"
