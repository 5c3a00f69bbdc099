#!/usr/bin/env bash
# One command for the ARM side of the packed kernels: installs the Debian cross toolchains and
# emulators when missing, generates test vectors from exported models (LiteRT BUILTIN_REF outputs),
# builds and runs them on qemu-aarch64 (NEON+SDOT, NEON) and qemu-system-arm Cortex-M4/M33/M55
# boards, and writes benchmarks/results/arm.json (instruction counts, bytes, bit-exactness).
#   bash tflite/arm/run.sh            # full set (demo CNN layers + random + depthwise-separable)
#   bash tflite/arm/run.sh --quick    # reduced set (what CI runs)
# CMSIS-NN column: CMSIS_NN_DIR=/path/to/CMSIS-NN (a checkout of github.com/ARM-software/CMSIS-NN).
set -euo pipefail
cd "$(dirname "$0")/../.."
need=""
for pkg in qemu-user qemu-system-arm gcc-aarch64-linux-gnu gcc-arm-none-eabi libnewlib-arm-none-eabi; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
done
if [ -n "$need" ]; then
  echo "[arm] installing Debian package(s):$need"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need >/dev/null
fi
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/arm.py "$@"
