#!/usr/bin/env bash
# The first GPU run, as one prepared command (issue 22):
#   bash launch/bench/gpu_check.sh OUT            # on a CUDA machine: under 8 minutes on one H200
#   bash launch/bench/gpu_check.sh OUT --dry-run  # on a CPU: tiny sizes, the same code path (a CI test)
# Writes everything under OUT, each step's result as soon as it is known:
#   1. OUT/cuda_tests.{txt,xml}  CUDA correctness: pytest -m gpu (tests/test_gpu.py; SEM/REM step vs the CPU,
#                                bf16 + channels_last, a map pass, DDPM, JCDP, D-VAE, victim PGD-AT, accelerate launch)
#   2. OUT/bench/bench.{json,md} launch/bench/bench.py at the real sizes (224/256 px, full-width ResNet-18, the 256 px
#                                UNet, the ImageNet-100 D-VAE): images/s, FLOPs, fraction of peak, wall-clock on 1/8/64
#   3. OUT/sem_cifar10/          CIFAR-10 SEM at the reference settings on the carried sample: SEM_STEPS surrogate
#                                steps and the final pass over it, timed (metrics.json), extrapolated by sem_cifar10.md
# and OUT/summary.md. Needs no network and no install: uedist is used from this checkout through PYTHONPATH
# (only its core dependencies: torch, accelerate, numpy, pillow, pyyaml, tqdm, matplotlib; pytest for step 1).
# The CIFAR-10 sample travels inside the checkout, in the git-ignored data_local/, built once beforehand with
#   python launch/build_shards.py source=cifar cifar.root=../shared/data/cifar10_jpg out=data_local/cifar10 \
#       splits=[train] workers=2
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$(pwd)"
OUT="${1:?usage: bash launch/bench/gpu_check.sh OUT [--dry-run]}"
DRY="${2:-}"
case "$DRY" in ""|--dry-run) ;; *) echo "usage: bash launch/bench/gpu_check.sh OUT [--dry-run]" >&2; exit 2 ;; esac
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
SEM_STEPS="${SEM_STEPS:-60}"
summary="$OUT/summary.md"
status=0

step() {  # step NAME LIMIT_S CMD...: run, log to OUT/NAME.log, record rc and seconds in the summary
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc=0
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  echo "| $name | $rc | $((SECONDS - t0)) s | \`$name.log\` |" >> "$summary"
  echo "   rc $rc in $((SECONDS - t0)) s, log $OUT/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

{
  echo "# uedist GPU check — $(date -u '+%Y-%m-%d %H:%M UTC')${DRY:+ (dry run on CPU: tiny sizes, measures nothing)}"
  echo
  "$PY" - <<'EOF'
import platform, subprocess, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name(0)}")
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        print(f"driver: {drv}")
    except OSError:
        pass
else:
    print("device: CPU")
EOF
  echo
  echo "| step | rc | time | log |"
  echo "|---|---:|---:|---|"
} > "$summary"

if [ -n "$DRY" ]; then
  export UEDIST_GPU_TEST_DEVICE=cpu  # run tests/test_gpu.py's code on the CPU
  BENCH=(--quick)
  data="$OUT/data"
  "$PY" launch/build_shards.py source=synthetic "out=$data" splits=[train] synthetic.num_train=64 synthetic.size=32 \
    shard_size=32 workers=0 > "$OUT/data.log" 2>&1
  SEM_SET=(surrogate.width=0.125 steps=2 noise_steps=1 eot_samples=1 adv_steps=1 data.batch_size=16 final_batch_size=32)
else
  BENCH=()
  data="$REPO/data_local/cifar10"
  [ -f "$data/train/manifest.json" ] || { echo "no CIFAR-10 sample at $data/train (see the header)" >&2; exit 2; }
  SEM_SET=("steps=$SEM_STEPS" final_batch_size=1024)
fi

# 1. CUDA correctness
step cuda_tests 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py --junitxml "$OUT/cuda_tests.xml"
cp "$OUT/cuda_tests.log" "$OUT/cuda_tests.txt"

# 2. the stages at their real sizes
step bench 240 "$PY" launch/bench/bench.py --out "$OUT/bench" "${BENCH[@]}"

# 3. CIFAR-10 SEM at the reference settings (configs/sem/cifar10.yaml), SEM_STEPS surrogate steps + the final pass
step sem_cifar10 300 "$PY" -m accelerate.commands.launch --num_processes 1 ${DRY:+--cpu} launch/sem.py \
  --config configs/sem/cifar10.yaml "data.train=$data/train" data.test= "run_root=$OUT" name=sem_cifar10 \
  progress=false data.workers=4 ckpt_every=1000000 "${SEM_SET[@]}"
if [ -f "$OUT/sem_cifar10/metrics.json" ]; then
  "$PY" - "$OUT/sem_cifar10/metrics.json" > "$OUT/sem_cifar10.md" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
t, steps, n = m["timings"], len(m.get("surrogate_curve", [])) and m["surrogate_curve"][-1]["step"], m["noise"]["samples"]
per_step, per_img = t["surrogate_training_s"] / max(steps, 1), t["final_pass_s"] / max(n, 1)
full = 5000 * per_step + 50000 * per_img  # M = 5000 surrogate steps + the final pass over the 50k train images
print("| what | measured | per unit | full CIFAR-10 |\n|---|---:|---:|---:|")
print(f"| surrogate steps | {steps} in {t['surrogate_training_s']:.1f} s | {per_step:.3f} s/step | {5000 * per_step / 60:.1f} min |")
print(f"| final pass | {n} images in {t['final_pass_s']:.1f} s | {1000 * per_img:.2f} ms/image | {50000 * per_img / 60:.1f} min |")
print(f"| SEM total | | | **{full / 60:.1f} min** (the SEM paper: 6 h; the aim: < 30 min) |")
EOF
  { echo; cat "$OUT/sem_cifar10.md"; } >> "$summary"
fi
echo "wrote $summary"
exit "$status"
