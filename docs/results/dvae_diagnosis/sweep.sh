#!/usr/bin/env bash
# Issue 36 part 1, step-resolved sweep: D-VAE stage 1 on the LSP-poisoned CIFAR-10 sample, p̂ against the true
# perturbation as training goes (steps.py), one run after another on one thread. Run from the repository root:
#   bash docs/results/dvae_diagnosis/sweep.sh [run names...]
# Records: docs/results/dvae_diagnosis/steps/<run>.csv; discussion: docs/purify_dvae.md.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
[ -f shards/cifar10_jpg/train/manifest.json ] || uedist shards build source=cifar cifar.root=../shared/data/cifar10_jpg out=shards/cifar10_jpg
[ -f runs/lsp_c10/poisoned/manifest.json ] || accelerate launch --num_processes 1 --cpu launch/attack.py \
  --config configs/lsp/cifar10_cpu.yaml data.train=shards/cifar10_jpg/train data.test=shards/cifar10_jpg/test name=lsp_c10 progress=false
S="python docs/results/dvae_diagnosis/steps.py --poisoned runs/lsp_c10/poisoned --clean shards/cifar10_jpg/train"
O=docs/results/dvae_diagnosis/steps
run() {  # name, then steps.py options
  local name=$1; shift
  [ -f "$O/$name.done" ] && return 0
  $S --out "$O/$name.csv" "$@" && touch "$O/$name.done"
}
for r in ${@:-w05_b32 w05_b128}; do
  case $r in
    w05_b32) run w05_b32 --width 0.5 --batch 32 --steps 3750 --eval-every 250 ;;    # 12 epochs, 4x the steps
    w05_b128) run w05_b128 --width 0.5 --batch 128 --steps 940 --eval-every 94 ;;   # the study's 12 epochs
    w025_b32) run w025_b32 --width 0.25 --batch 32 --steps 7500 --eval-every 500 ;; # 24 epochs, width 0.25
    w1_b32) run w1_b32 --width 1.0 --batch 32 --steps 3750 --eval-every 250 ;;      # 12 epochs, the reference width
    *) echo "unknown run $r" >&2; exit 2 ;;
  esac
done
