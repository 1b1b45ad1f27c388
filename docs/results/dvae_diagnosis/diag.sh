#!/usr/bin/env bash
# Issue 36 part 1, first diagnosis: the study's CPU D-VAE (configs/dvae/cifar10_cpu.yaml at 12 epochs per stage,
# p-floor from epoch 2.2, as configs/pipeline/cpu_dvae_table2.yaml runs it) on the LSP-poisoned CIFAR-10 sample, then
# the quick victim on each of its stages' sets P1, P2 and P3 (purified). Run from the repository root, one thread a job:
#   bash docs/results/dvae_diagnosis/diag.sh
# It ran 2026-12-07 from a worktree of commit 53a109b (same D-VAE, victim and LSP code as HEAD); the three victims ran
# two at a time. Records: docs/results/dvae_diagnosis/, discussion: docs/purify_dvae.md.
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
L="accelerate launch --num_processes 1 --cpu"
[ -f shards/cifar10_jpg/train/manifest.json ] || uedist shards build source=cifar cifar.root=../shared/data/cifar10_jpg out=shards/cifar10_jpg
$L launch/attack.py --config configs/lsp/cifar10_cpu.yaml data.train=shards/cifar10_jpg/train data.test=shards/cifar10_jpg/test name=lsp_c10 progress=false
$L launch/purify.py --config configs/dvae/cifar10_cpu.yaml data.src=runs/lsp_c10/poisoned data.clean=shards/cifar10_jpg/train epochs=12 p_floor_epoch=2.2 name=dvae_lsp12 progress=false
for s in p1 p2 purified; do
  $L launch/victim.py --config configs/victim/cifar10_quick.yaml data.train=runs/dvae_lsp12/$s data.test=shards/cifar10_jpg/test name=v_dvae_lsp12_$s progress=false
done
