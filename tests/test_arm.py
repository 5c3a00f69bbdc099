"""The packed kernels on ARM cores under emulation (the reduced set of benchmarks/arm.py).

Test vectors come from exported int8 models (random Conv2D / Dense layers with binary / ternary
codebooks: odd channel counts, strides, SAME / VALID padding; the pointwise layer of a
depthwise-separable block) with LiteRT BUILTIN_REF's outputs; every output byte of our reference,
optimized (the core's SIMD path) and portable kernels and of our int8 kernel must equal them on
qemu-aarch64 -cpu max (NEON + SDOT) and -cpu cortex-a72 (NEON), and on qemu-system-arm Cortex-M4
(mps2-an386), Cortex-M33 (mps2-an505) and Cortex-M55 (mps3-an547); tflite/tests/test_kernels.c
(randomized layers, every path vs the reference kernel) passes on each; the whole demo CNN (firmware
example tflite/arm/model_fw.c) gives LiteRT's int8 logits on the Cortex-M4 board.  The cross toolchains and
emulators are Debian packages that `make test` (scripts/setup.sh) installs; the test is skipped only
when they are absent."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import arm  # noqa: E402

pytestmark = pytest.mark.skipif(bool(arm.missing_tools()),
                                reason=f"ARM cross toolchain / qemu missing ({arm.missing_tools()}): "
                                       "`bash tflite/arm/run.sh` or scripts/setup.sh installs them")


def test_arm_targets_bit_exact_with_litert(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CMSIS_NN_DIR"}  # CI: no CMSIS-NN column
    out = tmp_path / "arm.json"
    r = subprocess.run([sys.executable, ROOT / "benchmarks" / "arm.py", "--quick", "--out", out,
                        "--build", tmp_path], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())
    n = len(res["vectors"])
    assert n >= 10 and res["all_bit_exact"]
    for cpu, level in (("max", 4), ("cortex-a72", 3)):  # the SIMD path each emulated CPU must take
        a = res["aarch64"][cpu]
        assert a["test_kernels"]["ok"] and a["summary"] == dict(layers=n, simd=level, failures=0), a
        assert len(a["layers"]) == n and all(L["opt"] == L["ref"] == L["portable"] == "ok" for L in a["layers"])
    for core, c in res["cortex_m"].items():
        level = 6 if core == "cortex-m55" else 5  # Helium (MVE) convolutions on the M55
        assert c["test_kernels"]["ok"] and c["summary"] == dict(layers=n, simd=level, failures=0), (core, c["summary"])
        assert len(c["layers"]) == n
        for L in c["layers"]:
            assert L["opt"] == L["ref"] == L["portable"] == L["int8"] == "ok", (core, L)
            assert L["instr_opt"] > 0 and L["instr_int8"] > 0  # the icount timer ran
    mf = res["model_firmware"]  # the whole demo CNN on the Cortex-M4 board
    assert mf["ok"] and len(mf["images"]) == 3, mf["output"]
    assert all(line.endswith(": equal to LiteRT BUILTIN_REF") for line in mf["images"]), mf["images"]
