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

# Python 3.11 (default) in .venv; PYTHON=python3.12 / python3.13 (a command or a path) in .venv-3.12 /
# .venv-3.13 (VENV=dir overrides). python3.N is also looked up in pyenv's versions when the command
# itself does not run (pyenv's shim without that version selected).
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null
    then PY="$c"; break; fi
  done
  [ -n "$PY" ] || { echo "[setup] error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
elif ! "$PY" -c '' 2>/dev/null; then
  found=""
  if [[ "$PY" =~ ^python(3\.[0-9]+)$ ]] && command -v pyenv >/dev/null; then
    for d in "$(pyenv root)/versions/${BASH_REMATCH[1]}".*/bin; do
      [ -x "$d/$PY" ] && found="$d/$PY"
    done
  fi
  [ -n "$found" ] || { echo "[setup] error: PYTHON=$PY does not run" >&2; exit 1; }
  PY="$found"
fi
ver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$ver" in
  3.11|3.12|3.13) ;;
  *) echo "[setup] error: syq_tf supports Python 3.11, 3.12 and 3.13 (PYTHON=$PY is $ver)" >&2; exit 1 ;;
esac
VENV="${VENV:-$([ "$ver" = 3.11 ] && echo .venv || echo ".venv-$ver")}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
have="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$have" = "$ver" ] || { echo "[setup] error: $VENV has Python $have, not $ver (remove it or set VENV)" >&2; exit 1; }
stamp="$VENV/.syq_tf-installed"
# re-install when the pins, setup.py, this script (the install steps) or the C kernels (compiled by
# the install) change
want="$(cat constraints.txt setup.py scripts/setup.sh tflite/include/*.h tflite/src/*.[ch] | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned dependencies in $VENV (constraints.txt)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
  if [ "$ver" = 3.13 ]; then
    # larq 0.14.0 (the latest) declares numpy<2, which cannot be met on 3.13 (no numpy 1.x wheels;
    # TensorFlow's ml_dtypes needs numpy>=2.1 there). It uses nothing numpy 2 removed, and the test
    # suite runs it with numpy 2, so it is installed without its declared dependencies (the
    # others, terminaltables and packaging, are pinned in constraints.txt and installed here).
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt terminaltables packaging
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps larq
  fi
  echo "$want" > "$stamp"
fi
# syq_tf's TensorFlow CPU ops (syq_tf/quantizers/native/*.cc), built against this virtualenv's
# TensorFlow; skipped when up to date. Without them syq_tf falls back to its slower pure-TensorFlow
# searches, so a failed build stops the set-up rather than going unnoticed.
"$VENV/bin/python" scripts/build_native.py
