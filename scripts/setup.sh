#!/usr/bin/env bash
# One-time (idempotent) set-up: the Fashion-MNIST Debian package and a pinned virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# Offline data: Fashion-MNIST (IDX files) and the Linux kernel UAPI headers (the text corpus of
# examples/char_lstm_laq.py); installed only when missing.
missing=""
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || missing="$missing dataset-fashion-mnist"
dpkg -s linux-libc-dev >/dev/null 2>&1 || missing="$missing linux-libc-dev"
# ARM cross toolchains and emulators (tests/test_arm.py, `make arm`: the kernels on AArch64 and Cortex-M)
for pkg in qemu-user qemu-system-arm gcc-aarch64-linux-gnu gcc-arm-none-eabi libnewlib-arm-none-eabi; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  echo "[setup] installing Debian package(s):$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY="$c"; break; fi
  done
fi
[ -n "$PY" ] || { echo "[setup] error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=".venv/.syq_tf-installed"
# re-install when the pins, setup.py or the C kernels (compiled by the install) change
want="$(cat constraints.txt setup.py tflite/include/*.h tflite/src/*.[ch] | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned dependencies (constraints.txt)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
