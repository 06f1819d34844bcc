#!/usr/bin/env bash
# The README's device figures in one command, from the CIFAR-10 JPEG archive (ImageFolder layout,
# train/ and test/ folders of class folders):
#
#   bash tools/cifar10_figures.sh cifar10-jpeg.tar.xz results/ [EPOCHS]
#
# 1. extracts the archive to a temporary folder and packs it (python common.py pack, 32 px);
# 2. tools/benchmark.py for every method (ResNet-18, 32 px, batch 256) -> results/benchmark.json;
# 3. SimCLR ResNet-18 on CIFAR-10 for EPOCHS epochs (default 20), kNN top-1 after every epoch
#    -> results/simclr/ (metrics.csv), and a table of epoch time, images/s and kNN per epoch.
# Environment: DEVICE (default cuda), PYTHON (default python3), BENCH_FLAGS and SIMCLR_FLAGS (more
# flags for each step). last.pt is written at the end only (--save-every 1000): the epoch times are
# then those of training and kNN, not of writing last.pt again every epoch.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash tools/cifar10_figures.sh ARCHIVE.tar.xz OUT_DIR [EPOCHS]" >&2
    exit 2
elif [ ! -f "$1" ]; then
    echo "error: archive $1 is not a file; give the CIFAR-10 JPEG archive (cifar10-jpeg.tar.xz)" >&2
    exit 2
fi
archive=$(realpath "$1") out=$(realpath -m "$2") epochs=${3:-20} device=${DEVICE:-cuda} py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xJf "$archive" -C "$work"
train=$(find "$work" -maxdepth 3 -type d -name train | head -n 1)
[ -n "$train" ] || { echo "error: $archive holds no train/ folder (ImageFolder layout expected)" >&2; exit 1; }
root=$(dirname "$train")
"$py" common.py pack --data-dir "$root" --out "$work/packed" --image-size 32
mkdir -p "$out"
# shellcheck disable=SC2086  # the flag variables are lists of words
"$py" tools/benchmark.py --method all --device "$device" --json "$out/benchmark.json" ${BENCH_FLAGS:-}
# shellcheck disable=SC2086
"$py" simclr.py --dataset packed --data-dir "$work/packed" --epochs "$epochs" --knn-every 1 --device "$device" \
    --save-every 1000 --output-dir "$out/simclr" ${SIMCLR_FLAGS:-}
"$py" - "$out/simclr/metrics.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["kind"] == "epoch"]
print("epoch  seconds (with kNN)  train img/s  kNN top-1 (%)")
last = 0.0
for r in rows:
    print(f"{int(r['epoch']) + 1:5d}  {float(r['time_s']) - last:18.1f}  {float(r['img_per_s']):11.0f}  {r['knn_top1']:>13s}")
    last = float(r["time_s"])
PY
