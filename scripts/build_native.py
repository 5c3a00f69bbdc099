"""Build syq_tf's TensorFlow CPU ops (syq_tf/quantizers/native/*.cc) against the TensorFlow of the
Python that runs this script; called by scripts/setup.sh after the install.

    .venv/bin/python scripts/build_native.py [--force]

All sources go into one library next to them, ``_syq_ops<EXT_SUFFIX>`` (one per Python, so the
3.11 / 3.12 / 3.13 virtualenvs of one checkout do not overwrite each other's), written atomically,
and only when it is missing or older than one of its sources. Needs a C++17 compiler (``CXX``, default g++). Without
one the build fails with the compiler's message and syq_tf runs with the slower pure-TensorFlow
searches (``syq_tf.quantizers.native.status()`` says why).
"""

import argparse
import os
import pathlib
import shlex
import subprocess
import sys
import sysconfig

NATIVE = pathlib.Path(__file__).resolve().parent.parent / "syq_tf" / "quantizers" / "native"


LIBRARY = NATIVE / ("_syq_ops" + sysconfig.get_config_var("EXT_SUFFIX"))


def build(sources, force=False):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # only for its headers and framework library

    out = LIBRARY
    inputs = [*sources, *NATIVE.glob("*.h")]
    if not force and out.is_file() and all(out.stat().st_mtime >= src.stat().st_mtime for src in inputs):
        return out, False
    cxx = shlex.split(os.environ.get("CXX", "g++"))
    tmp = out.with_name(out.name + ".tmp")
    # TensorFlow's headers as system headers: their own warnings are not ours
    flags = ["-isystem" + f[2:] if f.startswith("-I") else f for f in tf.sysconfig.get_compile_flags()]
    cmd = [*cxx, "-shared", "-fPIC", "-O3", "-fopenmp-simd", "-Wall", *flags,
           *map(str, sources), "-o", str(tmp), *tf.sysconfig.get_link_flags()]
    try:
        subprocess.run(cmd, check=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    out, built = build(sorted(NATIVE.glob("*.cc")), args.force)
    print(f"[build_native] {out.name}: {'built' if built else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
