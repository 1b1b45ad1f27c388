#!/usr/bin/env bash
# Issue 36 part 1, the candidate CPU configuration: the study's CPU D-VAE (configs/dvae/cifar10_cpu.yaml at 12 epochs
# per stage, p-floor from epoch 2.2) with batches of 32 instead of 128 — four times the optimizer steps for the same
# images and about the same CPU time (steps.py found p̂ follows the perturbation better with more steps) — on an
# attack's CIFAR-10 sample set, then the quick victim on each of its stages' sets. Run from the repository root:
#   bash docs/results/dvae_diagnosis/b32.sh lsp      # or sem, em_cw
# Records: docs/results/dvae_diagnosis/<run>/, discussion: docs/purify_dvae.md.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
L="accelerate launch --num_processes 1 --num_cpu_threads_per_process 1 --cpu"
A=${1:-lsp}
[ -f shards/cifar10_jpg/train/manifest.json ] || uedist shards build source=cifar cifar.root=../shared/data/cifar10_jpg out=shards/cifar10_jpg
case $A in
  lsp) cfg="configs/lsp/cifar10_cpu.yaml" ;;
  sem) cfg="configs/sem/cifar10_cpu.yaml" ;;
  em_cw) cfg="configs/em/cifar10_cpu.yaml em.mode=classwise" ;;
  *) echo "unknown attack $A" >&2; exit 2 ;;
esac
[ -f runs/${A}_c10/poisoned/manifest.json ] || $L launch/attack.py --config $cfg data.train=shards/cifar10_jpg/train \
  data.test=shards/cifar10_jpg/test name=${A}_c10 progress=false
$L launch/purify.py --config configs/dvae/cifar10_cpu.yaml data.src=runs/${A}_c10/poisoned data.clean=shards/cifar10_jpg/train \
  epochs=12 p_floor_epoch=2.2 data.batch_size=32 name=dvae_${A}12_b32 progress=false
for s in purified p1 p2; do
  $L launch/victim.py --config configs/victim/cifar10_quick.yaml data.train=runs/dvae_${A}12_b32/$s \
    data.test=shards/cifar10_jpg/test name=v_dvae_${A}12_b32_$s progress=false
done
