#!/usr/bin/env bash
# Issue 5 efficacy on the CIFAR-10 JPEG sample, sequentially (one heavy job at a time on a shared CPU):
# D-VAE (configs/dvae/cifar10_cpu.yaml) and the ISS baselines on the SEM- and EM-poisoned sets, each followed by
# the quick victim (configs/victim/cifar10_quick.yaml). Every step resumes, so rerunning the script continues.
# Logs: runs/efficacy_dvae/*.log.   Usage: bash tests/scripts/dvae_efficacy_cifar10.sh [sem|em ...]
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG=runs/efficacy_dvae; mkdir -p "$LOG"
CLEAN=shards/cifar10_jpg/train
[ $# -gt 0 ] || set -- sem em
victim() {  # victim <run name> <train set>
  [ -f "runs/$1/metrics.json" ] && return 0
  python launch/victim.py --config configs/victim/cifar10_quick.yaml data.train="$2" name="$1" progress=false \
    > "$LOG/$1.log" 2>&1 || echo "FAILED $1" >> "$LOG/failed.txt"
}
for noise in "$@"; do
  case $noise in sem) P=runs/sem_c10/poisoned;; em) P=runs/em_cw_c10/poisoned;; esac
  python launch/dvae.py --config configs/dvae/cifar10_cpu.yaml data.src=$P data.clean=$CLEAN \
    name=dvae_${noise}_c10 progress=false > "$LOG/dvae_${noise}_c10.log" 2>&1 || echo "FAILED dvae_$noise" >> "$LOG/failed.txt"
  victim dvae_${noise}_c10_victim runs/dvae_${noise}_c10/purified
done
for noise in "$@"; do
  case $noise in sem) P=runs/sem_c10/poisoned;; em) P=runs/em_cw_c10/poisoned;; esac
  for b in jpeg10 grayscale; do
    python launch/purify.py --config configs/purify/$b.yaml data.src=$P data.clean=$CLEAN name=${b}_${noise}_c10 \
      progress=false > "$LOG/${b}_${noise}_c10.log" 2>&1 || echo "FAILED ${b}_$noise" >> "$LOG/failed.txt"
    victim ${b}_${noise}_c10_victim runs/${b}_${noise}_c10/purified
  done
done
echo done > "$LOG/DONE"
