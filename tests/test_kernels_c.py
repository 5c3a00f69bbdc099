"""C side of the packed kernels: the randomized C test under AddressSanitizer + UBSan, the
freestanding/-Werror compile check of the kernel sources, and the firmware example."""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tflite"
SOURCES = [ROOT / "src" / f for f in ("syq_common.c", "syq_opt.c", "syq_neon.c", "syq_cm.c")]
CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
STRICT = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", f"-I{ROOT / 'include'}"]

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc/gcc/clang) on PATH")


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=240, **kw)


def _sanitizers_work(tmp_path):
    src = tmp_path / "probe.c"
    src.write_text("int main(void) { return 0; }\n")
    r = _run([CC, "-fsanitize=address,undefined", src, "-o", tmp_path / "probe"])
    return r.returncode == 0 and _run([tmp_path / "probe"]).returncode == 0


@pytest.mark.parametrize("simd", ["simd", "nosimd"])
def test_c_kernels_under_asan_ubsan(tmp_path, simd):
    if not _sanitizers_work(tmp_path):
        pytest.skip(f"{CC} cannot build/run -fsanitize=address,undefined programs here")
    exe = tmp_path / "test_kernels"
    extra = ["-DSYQ_NO_SIMD"] if simd == "nosimd" else []
    r = _run([CC, *STRICT, *extra, "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=all", *SOURCES, ROOT / "tests" / "test_kernels.c", "-o", exe])
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    r = _run([exe, "400"], env=env)
    assert r.returncode == 0 and "1 passed, 0 failed" in r.stdout, r.stdout + r.stderr
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr, r.stderr


@pytest.mark.parametrize("flags", [["-ffreestanding", "-fno-builtin", "-DSYQ_NO_SIMD"], ["-ffreestanding"]],
                         ids=["freestanding-nosimd", "freestanding-simd"])
def test_kernel_sources_compile_freestanding(tmp_path, flags):
    for src in SOURCES + [ROOT / "examples" / "firmware_example.c"]:
        obj = tmp_path / (src.stem + ".o")
        r = _run([CC, *STRICT, *flags, "-O2", "-c", src, "-o", obj])
        assert r.returncode == 0, f"{src.name}: {r.stderr}"
    if "-DSYQ_NO_SIMD" in flags:  # the portable build needs nothing from libc or libgcc
        nm = shutil.which("nm")
        if nm:
            for src in SOURCES:
                out = _run([nm, "-u", tmp_path / (src.stem + ".o")]).stdout.split()
                undefined = [s for s in out if s not in ("U",) and not s.startswith("syq_")]
                assert not undefined, f"{src.name} needs {undefined}"


def test_firmware_example_runs_on_host(tmp_path):
    exe = tmp_path / "fw"
    r = _run([CC, *STRICT, "-DSYQ_HOST_DEMO", "-O1", ROOT / "examples" / "firmware_example.c", *SOURCES, "-o", exe])
    assert r.returncode == 0, r.stderr
    r = _run([exe])
    assert r.returncode == 0 and "optimized == reference" in r.stdout, r.stdout
