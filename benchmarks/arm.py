"""The packed kernels on ARM, under emulation: bit-exactness on every core and instruction counts.

For each target the same test vectors (tflite/arm/gen_vectors.py: packed layers of exported int8
models, inputs and LiteRT BUILTIN_REF outputs) are compiled into one program (tflite/arm/
check_vectors.c) that checks every output byte of our reference, optimized and portable kernels,
our straightforward int8 kernel and (when its source is given) CMSIS-NN's int8 kernels:

  aarch64      qemu-aarch64 -cpu max (NEON + SDOT path) and -cpu cortex-a72 (plain NEON path)
  cortex-m4    qemu-system-arm -M mps2-an386  (Armv7E-M, DSP path)
  cortex-m33   qemu-system-arm -M mps2-an505  (Armv8-M Mainline + DSP)
  cortex-m55   qemu-system-arm -M mps3-an547  (Armv8.1-M with Helium/MVE: our DSP path; CMSIS-NN's MVE path)

plus tflite/tests/test_kernels.c (randomized layers, all paths vs reference) on each.

Cost: instructions executed per kernel call, measured as qemu's virtual time with -icount shift=0
(one instruction = 1 ns of virtual time; qemu's TCG counts guest instructions exactly) read from the
core's SysTick (processor clock) before and after each call, converted with a calibration loop of a
known instruction count (2,000,000: subs+bne).  Debian's qemu ships no TCG plugins (libinsn.so).
These are instruction counts, not cycles: a Cortex-M4 retires most of these in one cycle, loads in
two, SMLAD/USADA8 in one.  Flash: kernel code (sizes of the linked functions, arm-none-eabi-nm -S)
+ weight bytes; RAM: scratch + input + output activations.

CMSIS-NN: set CMSIS_NN_DIR to a checkout of https://github.com/ARM-software/CMSIS-NN (its Source/
and Include/); it is compiled with the same toolchain and flags as our kernels.  Without it the
CMSIS-NN column is skipped with a message.  Nothing of CMSIS-NN is stored in this project.

    python benchmarks/arm.py                 # full: demo CNN + random + depthwise-separable layers
    python benchmarks/arm.py --quick --out /tmp/arm.json   # reduced set (CI)
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/machine.py, also when imported by path
from machine import write_json  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
T = ROOT / "tflite"
CFLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-ffunction-sections", "-fdata-sections"]
SRC = [T / "src" / "syq_common.c", T / "src" / "syq_opt.c"]
BOARDS = {  # core: (qemu machine, -mcpu, code origin/length, RAM origin/length[, read-only data origin/length])
    "cortex-m4": ("mps2-an386", "cortex-m4", 0x00000000, 0x400000, 0x20000000, 0x400000),  # SSRAM1, SSRAM2/3
    "cortex-m33": ("mps2-an505", "cortex-m33", 0x10000000, 0x400000, 0x38000000, 0x400000),  # secure aliases
    "cortex-m55": ("mps3-an547", "cortex-m55", 0x10000000, 0x80000, 0x70800000, 0x800000,  # ITCM, DDR
                   0x70000000, 0x800000),
}
# Cortex-M55: hard-float ABI, so that GCC enables Helium (MVE; __ARM_FEATURE_MVE) and CMSIS-NN builds its
# MVE kernels; ours have no MVE path (their DSP path runs there).  Others: soft float (integer kernels).
FLOAT_ABI = {"cortex-m55": "hard"}
TOOLS = ["aarch64-linux-gnu-gcc", "qemu-aarch64", "arm-none-eabi-gcc", "arm-none-eabi-nm", "qemu-system-arm"]
CMSIS_SOURCES = ("Source/ConvolutionFunctions/*s8*.c", "Source/FullyConnectedFunctions/*s8*.c",
                 "Source/NNSupportFunctions/*s8*.c", "Source/NNSupportFunctions/arm_nn_vec_mat_mult_t_per_ch_s8.c")
OURS_OPT = re.compile(r"^(syq_conv2d_opt|syq_fully_connected_opt|syq_fc_as_conv|syq_check_args|syq_simd_level|"
                      r"syq_conv2d_scratch_bytes|syq_fully_connected_scratch_bytes|syq_words_per_pixel|syq_mag_count|"
                      r"syq_multiply_by_quantized_multiplier|syq_conv2d_cm|syq_cm_\w+|syq_mask8|syq_srdhm|syq_rdbpot|"
                      r"syq_floor_shift)$")
INT8 = re.compile(r"^(int8_conv|syq_multiply_by_quantized_multiplier|syq_srdhm|syq_rdbpot|syq_floor_shift)$")


def missing_tools():
    miss = [t for t in TOOLS if shutil.which(t) is None]
    if "arm-none-eabi-gcc" not in miss:  # newlib (libnewlib-arm-none-eabi): semihosting C library
        r = _run(["arm-none-eabi-gcc", "-print-file-name=rdimon.specs"])
        if not os.path.isabs(r.stdout.strip()):
            miss.append("newlib (rdimon.specs)")
    return miss


def _run(cmd, timeout=900, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    return r


def _check(r, what):
    if r.returncode != 0 and "SUMMARY" not in r.stdout and "passed" not in r.stdout:
        raise SystemExit(f"{what} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _qemu_m(machine, elf, timeout=900):
    return _run(["qemu-system-arm", "-M", machine, "-nographic", "-monitor", "none", "-serial", "none",
                 "-semihosting-config", "enable=on,target=native", "-icount", "shift=0", "-kernel", elf],
                timeout=timeout)


def _parse(stdout):
    calib, layers, summary = None, [], None
    for line in stdout.splitlines():
        if line.startswith("CALIB"):
            calib = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
        elif line.startswith("VEC "):
            name = line.split()[1]
            d = dict(re.findall(r"(\w+)=(\S+)", line))
            layers.append(dict(name=name, **{k: int(v) if v.isdigit() else v for k, v in d.items()}))
        elif line.startswith("SUMMARY"):
            summary = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    return calib, layers, summary


def _linker_script(build, core):
    co, cl, ro, rl = BOARDS[core][2:6]
    rodata = [f"-DRO_ORIGIN={BOARDS[core][6]:#x}", f"-DRO_LENGTH={BOARDS[core][7]:#x}"] if len(BOARDS[core]) > 6 else []
    ld = build / f"{core}.ld"
    _check(_run(["arm-none-eabi-gcc", "-E", "-P", "-x", "c", f"-DCODE_ORIGIN={co:#x}", f"-DCODE_LENGTH={cl:#x}",
                 f"-DRAM_ORIGIN={ro:#x}", f"-DRAM_LENGTH={rl:#x}", *rodata, T / "arm" / "board.ld.in", "-o", ld]),
           "cpp")
    return ld


def _cmsis_lib(build, core, cmsis_dir):
    mcpu = BOARDS[core][1]
    fabi = FLOAT_ABI.get(core, "soft")
    out = build / f"cmsis-nn-{core}"
    out.mkdir(parents=True, exist_ok=True)
    objs = []
    for pat in CMSIS_SOURCES:
        for src in sorted(cmsis_dir.glob(pat)):
            obj = out / (src.stem + ".o")
            _check(_run(["arm-none-eabi-gcc", f"-mcpu={mcpu}", "-mthumb", f"-mfloat-abi={fabi}", "-O2",
                         "-ffunction-sections", "-fdata-sections", f"-I{cmsis_dir / 'Include'}", "-c", src, "-o", obj]),
                   f"CMSIS-NN {src.name}")
            objs.append(obj)
    lib = out / "libcmsisnn.a"
    lib.unlink(missing_ok=True)
    _check(_run(["arm-none-eabi-ar", "rcs", lib, *objs]), "ar")
    return lib


def _code_sizes(elf):
    """{symbol: size} of the linked text/rodata symbols."""
    r = _run(["arm-none-eabi-nm", "-S", "--size-sort", elf])
    sizes = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2].lower() in "trd":
            sizes[parts[3]] = int(parts[1], 16)
    return sizes


def run_cortex_m(core, vec_dir, build, cmsis_dir, n_random):
    machine, mcpu = BOARDS[core][:2]
    ld = _linker_script(build, core)
    base = ["arm-none-eabi-gcc", f"-mcpu={mcpu}", "-mthumb", f"-mfloat-abi={FLOAT_ABI.get(core, 'soft')}", *CFLAGS, "-Wl,--gc-sections",
            "--specs=rdimon.specs", "-nostartfiles", "-T", ld, f"-I{T / 'include'}", f"-I{T / 'arm'}"]
    res = dict(board=machine, mcpu=mcpu, float_abi=FLOAT_ABI.get(core, "soft"))
    # randomized self-test (all paths vs reference, pack round trip)
    elf = build / f"test_kernels-{core}.elf"
    _check(_run([*base, f'-DSYQ_ARM_ARG="{n_random}"', T / "arm" / "startup.c", *SRC, T / "src" / "syq_cm.c",
                 T / "tests" / "test_kernels.c", "-o", elf]), f"build test_kernels {core}")
    r = _qemu_m(machine, elf)
    res["test_kernels"] = dict(ok=r.returncode == 0 and "1 passed, 0 failed" in r.stdout, output=r.stdout.strip()[-300:])
    # test vectors (+ CMSIS-NN)
    elf = build / f"check_vectors-{core}.elf"
    extra = []
    if cmsis_dir:
        extra = ["-DSYQ_WITH_CMSIS_NN", f"-I{cmsis_dir / 'Include'}", T / "arm" / "cmsis_adapter.c",
                 _cmsis_lib(build, core, cmsis_dir)]
    _check(_run([*base, f"-I{vec_dir}", T / "arm" / "startup.c", *SRC, T / "src" / "syq_cm.c",
                 T / "arm" / "check_vectors.c", *extra, "-o", elf]), f"build check_vectors {core}")
    t0 = time.time()
    r = _check(_qemu_m(machine, elf), f"run check_vectors {core}")
    calib, layers, summary = _parse(r.stdout)
    res.update(run_seconds=round(time.time() - t0, 1), calibration=calib, summary=summary,
               exit_code=r.returncode, layers=layers)
    sizes = _code_sizes(elf)
    sz = _run(["arm-none-eabi-size", elf]).stdout.split("\n")[1].split()
    res["elf_size"] = dict(text=int(sz[0]), data=int(sz[1]), bss=int(sz[2]), note="the whole test program: every "
                           "layer's packed and int8 weights, inputs, expected outputs, all kernels, newlib")
    res["code_bytes"] = dict(ours=sum(v for k, v in sizes.items() if OURS_OPT.match(k)),
                             int8=sum(v for k, v in sizes.items() if INT8.match(k)),
                             cmsis_nn=sum(v for k, v in sizes.items() if k.startswith("arm_")) if cmsis_dir else None)
    ipt = 2_000_000 / calib["ticks"]  # instructions per tick
    res["instructions_per_tick"] = round(ipt, 4)
    for L in layers:
        for k in ("ref", "opt", "portable", "int8", "cmsis"):
            if f"t_{k}" in L:
                L[f"instr_{k}"] = int(round(L[f"t_{k}"] * ipt))
    return res


def run_model_firmware(build, core="cortex-m4"):
    """The whole demo CNN (tflite/arm/gen_model.py -> model.h, model_fw.c) on a Cortex-M board: its int8
    logits for 3 Fashion-MNIST test images against LiteRT BUILTIN_REF's, per-op instructions."""
    machine, mcpu = BOARDS[core][:2]
    out = build / "model"
    _check(_run([sys.executable, T / "arm" / "gen_model.py", "--out", out / "model.h"],
                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")), "gen_model")
    elf = build / f"model_fw-{core}.elf"
    _check(_run(["arm-none-eabi-gcc", f"-mcpu={mcpu}", "-mthumb", f"-mfloat-abi={FLOAT_ABI.get(core, 'soft')}", *CFLAGS,
                 "-Wl,--gc-sections", "--specs=rdimon.specs", "-nostartfiles", "-T", _linker_script(build, core),
                 f"-I{T / 'include'}", f"-I{out}", T / "arm" / "startup.c", *SRC, T / "src" / "syq_cm.c",
                 T / "arm" / "model_fw.c", "-o", elf]), "build model_fw")
    r = _qemu_m(machine, elf)
    images = [line for line in r.stdout.splitlines() if line.startswith("IMAGE")]
    ops = dict(re.findall(r"^OP (.+) ticks_per_image=(\d+)$", r.stdout, re.M))
    return dict(core=core, board=machine, ok=r.returncode == 0 and "failures=0" in r.stdout, images=images,
                ticks_per_image={k: int(v) for k, v in ops.items()}, output=r.stdout.strip()[-2000:])


def run_aarch64(vec_dir, build, n_random):
    base = ["aarch64-linux-gnu-gcc", *CFLAGS, "-static", f"-I{T / 'include'}"]
    res = {}
    tk = build / "test_kernels-aarch64"
    cv = build / "check_vectors-aarch64"
    _check(_run([*base, *SRC, T / "src" / "syq_neon.c", T / "tests" / "test_kernels.c", "-o", tk]), "build aarch64")
    _check(_run([*base, "-DSYQ_HOSTED", f"-I{T / 'arm'}", f"-I{vec_dir}", *SRC, T / "src" / "syq_neon.c",
                 T / "arm" / "check_vectors.c", "-o", cv]), "build aarch64 vectors")
    for cpu, path in (("max", "NEON + SDOT"), ("cortex-a72", "NEON (no dot product)")):
        r1 = _run(["qemu-aarch64", "-cpu", cpu, tk, str(n_random)])
        r2 = _check(_run(["qemu-aarch64", "-cpu", cpu, cv]), f"aarch64 {cpu}")
        _, layers, summary = _parse(r2.stdout)
        res[cpu] = dict(path=path, test_kernels=dict(ok=r1.returncode == 0 and "1 passed, 0 failed" in r1.stdout,
                                                     output=r1.stdout.strip()[-200:]),
                        summary=summary, exit_code=r2.returncode,
                        layers=[{k: L[k] for k in ("name", "ref", "opt", "portable") if k in L} for L in layers])
    return res


def _versions():
    def first(cmd):
        r = _run(cmd)
        return (r.stdout or r.stderr).splitlines()[0] if r.returncode == 0 else None
    return {"arm-none-eabi-gcc": first(["arm-none-eabi-gcc", "--version"]),
            "aarch64-linux-gnu-gcc": first(["aarch64-linux-gnu-gcc", "--version"]),
            "qemu-system-arm": first(["qemu-system-arm", "--version"]),
            "qemu-aarch64": first(["qemu-aarch64", "--version"])}


def table(results):
    """Markdown table: per core, per layer (bench layers)."""
    rows = ["| core | layer | MACs | ours (instr) | CMSIS-NN int8 | our int8 | ours / CMSIS-NN | weights ours / int8 (B) "
            "| RAM ours / CMSIS-NN (B) | bit-exact (ours, int8, CMSIS-NN) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    vecs = {v["name"]: v for v in results["vectors"]}
    for core, r in results["cortex_m"].items():
        for L in r["layers"]:
            if not L["name"].startswith(("demo_", "dwsep_")):
                continue
            v = vecs[L["name"]]
            ours, cm, i8 = L.get("instr_opt"), L.get("instr_cmsis"), L.get("instr_int8")
            ratio = f"{ours / cm:.2f}" if ours and cm else "n/a"
            act = v["in_bytes"] + v["out_bytes"]
            ram_c = act + L["cmsis_buf"] if "cmsis_buf" in L else None
            exact = ", ".join(L.get(k, "n/a") for k in ("opt", "int8", "cmsis"))
            rows.append(f"| {core} | {L['name']} | {v['macs']:,} | {ours:,} | {f'{cm:,}' if cm else 'n/a'} | "
                        f"{i8:,} | {ratio} | {v['packed_bytes']:,} / {v['int8_bytes']:,} | "
                        f"{act + L['scratch']:,} / {f'{ram_c:,}' if ram_c else 'n/a'} | {exact} |")
    return "\n".join(rows)


def _cmsis_version(cmsis):
    """Which CMSIS-NN the column was built from: its git commit (a local path says nothing elsewhere)."""
    r = subprocess.run(["git", "-C", str(cmsis), "log", "-1", "--format=%H %cs"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        commit, date = r.stdout.split()
        return f"ARM-software/CMSIS-NN {commit} ({date})"
    return f"ARM-software/CMSIS-NN, a checkout without git history ({cmsis.name})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced set for CI: random + depthwise-separable layers")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/arm.json; --quick: none)")
    ap.add_argument("--build", default=str(ROOT / "build" / "arm"), help="build directory")
    ap.add_argument("--cmsis-nn", default=os.environ.get("CMSIS_NN_DIR"),
                    help="CMSIS-NN checkout (Source/, Include/); default $CMSIS_NN_DIR")
    ap.add_argument("--cores", default="cortex-m4,cortex-m33,cortex-m55", help="Cortex-M cores to run")
    a = ap.parse_args(argv)
    miss = missing_tools()
    if miss:
        raise SystemExit(f"missing {miss}: run `bash tflite/arm/run.sh` (installs qemu-user, qemu-system-arm, "
                         "gcc-aarch64-linux-gnu, gcc-arm-none-eabi, libnewlib-arm-none-eabi)")
    build = pathlib.Path(a.build) / ("quick" if a.quick else "full")
    build.mkdir(parents=True, exist_ok=True)
    cmsis = pathlib.Path(a.cmsis_nn) if a.cmsis_nn else None
    if cmsis and not (cmsis / "Include" / "arm_nnfunctions.h").exists():
        raise SystemExit(f"--cmsis-nn {cmsis}: no Include/arm_nnfunctions.h there")
    if not cmsis:
        print("[arm] CMSIS-NN column skipped: set CMSIS_NN_DIR to a checkout of "
              "https://github.com/ARM-software/CMSIS-NN to compare with arm_convolve_s8 / arm_fully_connected_s8")
    sets = "random,dwsep" if a.quick else "demo,random,dwsep"
    gen = [sys.executable, T / "arm" / "gen_vectors.py", "--sets", sets, "--out", build / "vectors.h"]
    if a.quick:
        gen += ["--n-conv", "6", "--n-fc", "3"]
    print(f"[arm] test vectors ({sets}) from LiteRT BUILTIN_REF", flush=True)
    _check(_run(gen, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")), "gen_vectors")
    vectors = json.loads((build / "vectors.json").read_text())
    for v in vectors:
        v["in_bytes"] = 1
        for d in v["input"]:
            v["in_bytes"] *= d
        v["out_bytes"] = 1
        for d in v["output"]:
            v["out_bytes"] *= d
    n_random = 40 if a.quick else 300
    results = dict(method=__doc__.split("\n\n")[2].strip(), versions=_versions(), cflags=CFLAGS,
                   cmsis_nn=_cmsis_version(cmsis) if cmsis else None, vectors=vectors, cortex_m={})
    print("[arm] aarch64 (qemu-aarch64)", flush=True)
    results["aarch64"] = run_aarch64(build, build, n_random)
    for core in a.cores.split(","):
        print(f"[arm] {core} ({BOARDS[core][0]})", flush=True)
        results["cortex_m"][core] = run_cortex_m(core, build, build, cmsis, n_random)
    vec = {v["name"]: v for v in vectors}
    for core, r in results["cortex_m"].items():  # flash = kernel code + this layer's weights; RAM = scratch + activations
        cb = r["code_bytes"]
        for L in r["layers"]:
            v = vec[L["name"]]
            act = v["in_bytes"] + v["out_bytes"]
            L["flash_ours"] = cb["ours"] + v["packed_bytes"]
            L["flash_int8"] = cb["int8"] + v["int8_bytes"]
            L["ram_ours"] = act + L["scratch"]
            L["ram_int8"] = act
            if cb["cmsis_nn"] is not None and "cmsis_buf" in L:
                L["flash_cmsis"] = cb["cmsis_nn"] + v["int8_bytes"]
                L["ram_cmsis"] = act + L["cmsis_buf"]
    results["bytes_note"] = ("flash_*: linked kernel code (arm-none-eabi-nm -S of the functions each path uses) + the "
                             "layer's weights (packed codes + magnitudes, or int8); bias / multipliers / shifts (same "
                             "for all) not counted. ram_*: input + output activations + scratch (ours: "
                             "SYQ_CONV2D_SCRATCH_BYTES) or CMSIS-NN's buffer (its get_buffer_size).")
    print("[arm] whole demo CNN firmware on cortex-m4", flush=True)
    results["model_firmware"] = mf = run_model_firmware(build)
    ok = mf["ok"]
    print(f"[arm] demo CNN on cortex-m4: logits of {len(mf['images'])} images "
          f"{'equal to LiteRT BUILTIN_REF' if mf['ok'] else 'DIFFERENT'}")
    for cpu, r in results["aarch64"].items():
        good = r["exit_code"] == 0 and r["summary"]["failures"] == 0 and r["test_kernels"]["ok"]
        ok &= good
        print(f"[arm] aarch64 -cpu {cpu} ({r['path']}): {len(r['layers'])} layers, test_kernels "
              f"{'ok' if r['test_kernels']['ok'] else 'FAILED'}, vectors {'all equal' if good else 'FAILED'}")
    for core, r in results["cortex_m"].items():
        good = r["exit_code"] == 0 and r["summary"]["failures"] == 0 and r["test_kernels"]["ok"]
        ok &= good
        print(f"[arm] {core}: {len(r['layers'])} layers, test_kernels {'ok' if r['test_kernels']['ok'] else 'FAILED'}, "
              f"vectors {'all equal' if good else 'FAILED'} (code bytes {r['code_bytes']})")
    results["all_bit_exact"] = bool(ok)
    print(table(results))
    out = a.out or (None if a.quick else str(ROOT / "benchmarks" / "results" / "arm.json"))
    if out:
        write_json(out, results, indent=1)
        print(f"[arm] wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
