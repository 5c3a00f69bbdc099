"""Fuzz the readers of untrusted .tflite files: mutate exported flatbuffers, run ``syq-tf inspect``'s
reading code and ``syq_tf.kernels.run_tflite`` on each, with the C kernels built with
AddressSanitizer and UBSan, in worker subprocesses with a per-case timeout.

Outcomes counted per case and per reader (inspect, run): ``ok``, ``MalformedModelError`` (the
documented refusal of a malformed file), ``UnsupportedOp`` (a well-formed file naming an op, type or
option the runner does not implement: a legitimate refusal, counted separately), any other exception
type (a defect), and per case: crashes (the worker died), hangs (no answer within ``--timeout``
seconds) and sanitizer reports (the worker died with an ASan / UBSan report; ``-fno-sanitize-
recover=all`` makes every UBSan finding fatal). The crashing / hanging inputs are kept.

Mutations (deterministic from ``--seed`` and the case number): bit flips, random bytes, int32
fields of the serialized file set to boundary values, truncation / extension, and structured edits
through the flatbuffer object API (tensorflow.lite.python.schema_py_generated): scales (inf, NaN,
0, negative, huge, tiny, wrong count), zero points, quantized dimension, shapes, types, buffer
indices, op input / output indices, op codes, builtin option fields (strides, dilations, pool
windows, padding, activation, axis, shapes), buffer data (cut, grown, random, extreme int32s),
graph inputs / outputs, deleted / duplicated / swapped ops and deleted tensors.

    python benchmarks/fuzz_tflite.py --cases 20000 --workers 2 --out benchmarks/results/fuzz_tflite.json

``tests/test_fuzz_tflite.py`` runs :func:`campaign` with 1,000 cases in CI.
"""

import argparse
import collections
import json
import os
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/machine.py, also when imported by path
from machine import write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["tflite/src/syq_common.c", "tflite/src/syq_opt.c"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
ACCEPTED = ("ok", "MalformedModelError", "UnsupportedOp")
KINDS = ("bitflip", "bytes", "int32", "resize", "struct")
KIND_WEIGHTS = (0.2, 0.1, 0.2, 0.05, 0.45)


# ---- the sanitized library ----------------------------------------------------------------------

def build_sanitized_library(out_dir, cc="gcc"):
    """Compile tflite/src into ``out_dir``/libsyq_asan.so with ASan + UBSan; returns (library, preload):
    the libraries to LD_PRELOAD into Python, the ASan runtime and libstdc++ (TensorFlow throws C++
    exceptions; ASan's __cxa_throw interceptor needs libstdc++ loaded when it starts)."""
    if shutil.which(cc) is None:
        raise FileNotFoundError(f"{cc} not found: the sanitized kernel library needs a C compiler")
    out = os.path.join(out_dir, "libsyq_asan.so")
    cmd = [cc, "-std=c99", "-O1", "-g", "-shared", "-fPIC", *SANITIZE, "-I", os.path.join(REPO, "tflite/include"),
           *[os.path.join(REPO, s) for s in SOURCES], "-o", out]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    preload = []
    for name in ("libasan.so", "libstdc++.so"):
        path = subprocess.run([cc, f"-print-file-name={name}"], check=True, capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path):
            raise FileNotFoundError(f"{cc} has no {name} (got {path!r})")
        preload.append(path)
    return out, " ".join(preload)


# ---- seed models --------------------------------------------------------------------------------

def export_seeds(out_dir):
    """Export the seed models (written to ``out_dir``, reused when already there); returns paths."""
    names = ["ternary_net.tflite", "binary_net.tflite", "tflm_lut.tflite"]
    paths = [os.path.join(out_dir, n) for n in names]
    if all(os.path.isfile(p) for p in paths):
        return paths
    import syq_tf  # noqa: PLC0415  (first: selects Keras 2)

    import larq as lq  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415
    from syq_tf.quantizers import SYQ, DoReFa  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (32, 8, 8, 3)).astype(np.float32)

    def net(bits, gran, softmax):
        q = dict(input_quantizer=DoReFa(8))
        inp = tf.keras.Input((8, 8, 3))
        h = tf.keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)  # ordinary int8 weights
        h = lq.layers.QuantConv2D(32, 3, padding="same", kernel_quantizer=SYQ(bits, gran), **q)(h)
        a = tf.keras.layers.MaxPool2D()(h)
        b = tf.keras.layers.AveragePooling2D()(h)
        h = tf.keras.layers.Add()([a, tf.keras.layers.ReLU()(b)])
        h = syq_tf.quantize(tf.keras.layers.DepthwiseConv2D(3, padding="same"),
                            kernel_quantizer=SYQ(bits, gran, depthwise=True), **q)(h)
        h = lq.layers.QuantConv2D(16, 2, strides=2, kernel_quantizer=SYQ(3 - bits, gran), **q)(h)
        g = tf.keras.layers.GlobalAveragePooling2D()(h)
        f = tf.keras.layers.Dense(8)(tf.keras.layers.Flatten()(h))
        h = tf.keras.layers.Concatenate()([g, f])
        h = lq.layers.QuantDense(12, kernel_quantizer=SYQ(bits, "layer"), **q)(h)
        h = tf.keras.layers.BatchNormalization()(h)
        out = lq.layers.QuantDense(4, **q)(h)
        if softmax:
            out = tf.keras.layers.Softmax()(out)
        return tf.keras.Model(inp, out)

    os.makedirs(out_dir, exist_ok=True)
    tf.keras.utils.set_random_seed(1)
    for path, model in ((paths[0], net(2, "channel", False)), (paths[1], net(1, "layer", True))):
        model(x[:1])
        fb = syq_tf.export.to_tflite(model, representative_data=x).flatbuffer
        with open(path, "wb") as f:
            f.write(bytes(fb))
    small = tf.keras.Sequential([
        tf.keras.Input((8, 8, 3)),
        syq_tf.quantize(tf.keras.layers.Conv2D(8, 3), kernel_quantizer=SYQ(2, "channel")),
        tf.keras.layers.Flatten(),
        syq_tf.quantize(tf.keras.layers.Dense(4), kernel_quantizer=SYQ(1, "layer")),
    ])
    fb = syq_tf.export.to_tflite(small, representative_data=x, target="tflm").flatbuffer
    with open(paths[2], "wb") as f:
        f.write(bytes(fb))
    return paths


# ---- mutations (worker side) --------------------------------------------------------------------

_INT32_VALUES = (0, 1, -1, 2, 3, 4, 7, 8, 15, 16, 127, 128, 255, 256, 1 << 15, 1 << 16, (1 << 31) - 1, -(1 << 31),
                 1 << 24, -2, 1 << 30)
_FLOATS = (float("inf"), float("-inf"), float("nan"), 0.0, -1.0, 1e-45, 1e38, 3.4e38, 1e-30, 1e30, 1.0, 2.0 ** 40)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _int_value(rng, current=None):
    r = rng.random()
    if r < 0.6:
        return int(_pick(rng, _INT32_VALUES))
    if r < 0.8 and current is not None:
        return int(current) + int(rng.integers(-3, 4))
    return int(rng.integers(-(1 << 31), 1 << 31))


def _raw_mutation(kind, buf, rng):
    import numpy as np  # noqa: PLC0415

    b = bytearray(buf)
    if kind == "bitflip":
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(len(b)))
            b[i] ^= 1 << int(rng.integers(8))
    elif kind == "bytes":
        for _ in range(int(rng.integers(1, 17))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
    elif kind == "int32":
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(len(b) // 4)) * 4
            old = int.from_bytes(b[i:i + 4], "little", signed=True)
            b[i:i + 4] = (_int_value(rng, old) & 0xFFFFFFFF).to_bytes(4, "little")
    else:  # resize
        if rng.random() < 0.6:
            b = b[:int(rng.integers(0, len(b)))]
        else:
            b += rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
    return bytes(b)


def _structured(model, rng, schema):
    """One structured edit of a ModelT in place; returns its name."""
    import numpy as np  # noqa: PLC0415

    sub = model.subgraphs[0]
    tensors, ops = sub.tensors, sub.operators
    t = _pick(rng, tensors)
    choice = int(rng.integers(17))
    if choice == 0 and t.quantization is not None and t.quantization.scale is not None and len(t.quantization.scale):
        s = np.array(t.quantization.scale, np.float32)
        s[int(rng.integers(s.size))] = _pick(rng, _FLOATS)
        t.quantization.scale = s
        return "scale"
    if choice == 1 and t.quantization is not None:
        q = t.quantization
        if q.zeroPoint is not None and len(q.zeroPoint) and rng.random() < 0.7:
            z = np.array(q.zeroPoint, np.int64)
            z[int(rng.integers(z.size))] = int(_pick(rng, (-129, 128, 255, 1000, (1 << 31) - 1, -(1 << 40), -128, 127)))
            q.zeroPoint = z
        elif q.scale is not None and len(q.scale):
            n = int(rng.integers(0, 3 * len(q.scale) + 2))
            q.scale = np.resize(np.asarray(q.scale, np.float32), n)
        return "zero_point_or_scale_count"
    if choice == 2 and t.quantization is not None:
        t.quantization.quantizedDimension = int(rng.integers(-2, 7))
        return "quantized_dimension"
    if choice == 3:
        shape = [] if t.shape is None else [int(d) for d in t.shape]
        r = rng.random()
        if r < 0.6 and shape:
            shape[int(rng.integers(len(shape)))] = int(_pick(rng, (0, -1, 1, 2, 3, 7, 33, 1 << 16, (1 << 31) - 1, -(1 << 31))))
        elif r < 0.8 and shape:
            shape.pop(int(rng.integers(len(shape))))
        else:
            shape.insert(int(rng.integers(len(shape) + 1)), int(_pick(rng, (1, 2, 0, 5))))
        t.shape = np.array(shape, np.int32)
        return "shape"
    if choice == 4:
        t.type = int(rng.integers(0, 26))
        return "type"
    if choice == 5:
        t.buffer = int(rng.integers(0, len(model.buffers) + 3))
        return "buffer_index"
    if choice in (6, 7) and ops:
        op = _pick(rng, ops)
        field = "inputs" if choice == 6 else "outputs"
        v = [int(j) for j in getattr(op, field)]
        if v:
            v[int(rng.integers(len(v)))] = int(_pick(rng, (-1, -2, len(tensors), len(tensors) + 5, 1 << 20,
                                                           int(rng.integers(len(tensors))), int(rng.integers(len(tensors))))))
        if rng.random() < 0.15:
            v = v[:-1] if v and rng.random() < 0.5 else v + [int(rng.integers(-1, len(tensors)))]
        setattr(op, field, np.array(v, np.int32))
        return "op_" + field
    if choice == 8 and ops:
        _pick(rng, ops).opcodeIndex = int(rng.integers(0, len(model.operatorCodes) + 2))
        return "opcode_index"
    if choice == 9:
        code = _pick(rng, model.operatorCodes)
        code.builtinCode = int(rng.integers(0, 210))
        code.deprecatedBuiltinCode = min(code.builtinCode, 127)
        return "builtin_code"
    if choice in (10, 11) and ops:
        op = _pick(rng, [o for o in ops if o.builtinOptions is not None] or ops)
        opts = op.builtinOptions
        if opts is None or rng.random() < 0.1:
            op.builtinOptionsType = int(rng.integers(0, 130))
            op.builtinOptions = None if rng.random() < 0.5 else schema.Conv2DOptionsT()
            return "options_type"
        fields = [k for k, v in vars(opts).items() if isinstance(v, (int, float, bool, np.integer, np.floating))
                  or v is None or isinstance(v, (list, np.ndarray))]
        if not fields:
            return "options_none"
        k = _pick(rng, fields)
        v = getattr(opts, k)
        if isinstance(v, (float, np.floating)):
            setattr(opts, k, float(_pick(rng, _FLOATS)))
        elif isinstance(v, (list, np.ndarray)) or v is None:
            setattr(opts, k, np.array([int(_pick(rng, (-1, 0, 1, 2, 5, 1 << 20)))
                                       for _ in range(int(rng.integers(0, 6)))], np.int32))
        else:
            setattr(opts, k, int(_pick(rng, (0, -1, 1, 2, 3, 4, 5, 6, 100, 1 << 16, (1 << 31) - 1, -(1 << 31)))))
        return "option_field"
    if choice == 12:
        with_data = [b for b in model.buffers if b.data is not None and len(b.data)]
        if with_data:
            b = _pick(rng, with_data)
            data = np.array(b.data, np.uint8)
            r = rng.random()
            if r < 0.3:
                data = data[:int(rng.integers(0, data.size))]
            elif r < 0.5:
                data = np.concatenate([data, rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8)])
            elif r < 0.75:
                data = rng.integers(0, 256, data.size, dtype=np.uint8)
            else:
                v = data[: data.size // 4 * 4].view(np.int32).copy()
                if v.size:
                    v[int(rng.integers(v.size))] = int(_pick(rng, ((1 << 31) - 1, -(1 << 31), 1 << 30, -(1 << 30))))
                    data = np.concatenate([v.view(np.uint8), data[v.size * 4:]])
            b.data = data
        return "buffer_data"
    if choice == 13:
        field = "inputs" if rng.random() < 0.5 else "outputs"
        v = [int(j) for j in getattr(sub, field)]
        v = v or [0]
        v[int(rng.integers(len(v)))] = int(rng.integers(-1, len(tensors) + 2))
        setattr(sub, field, np.array(v, np.int32))
        return "graph_" + field
    if choice == 14 and len(ops) > 1:
        i, j = int(rng.integers(len(ops))), int(rng.integers(len(ops)))
        r = rng.random()
        if r < 0.4:
            ops.pop(i)
        elif r < 0.7:
            ops.insert(j, ops[i])
        else:
            ops[i], ops[j] = ops[j], ops[i]
        return "op_order"
    if choice == 15 and len(tensors) > 1:
        tensors.pop(int(rng.integers(len(tensors))))
        return "delete_tensor"
    if t.quantization is not None and t.quantization.scale is not None and len(t.quantization.scale):
        t.quantization.scale = np.full(len(t.quantization.scale), _pick(rng, _FLOATS), np.float32)
        return "all_scales"
    return "noop"


def mutate(seed_bytes, rng, schema):
    """(kind, detail, mutated bytes) of one mutation of ``seed_bytes``."""
    import flatbuffers  # noqa: PLC0415

    kind = KINDS[int(rng.choice(len(KINDS), p=KIND_WEIGHTS))]
    if kind != "struct":
        return kind, kind, _raw_mutation(kind, seed_bytes, rng)
    for _ in range(8):
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(seed_bytes), 0))
        details = [_structured(model, rng, schema) for _ in range(int(rng.integers(1, 4)))]
        try:
            builder = flatbuffers.Builder(len(seed_bytes) + 1024)
            builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
            return kind, "+".join(details), bytes(builder.Output())
        except Exception:  # noqa: BLE001  (a value the field's type cannot hold: draw another edit)
            continue
    return "bitflip", "bitflip", _raw_mutation("bitflip", seed_bytes, rng)


# ---- worker -------------------------------------------------------------------------------------

def _classify(err):
    return type(err).__name__


def _inputs(runner, rng):
    import numpy as np  # noqa: PLC0415

    xs = []
    for j in runner.inputs:
        t = runner.tensors[j]
        dtype = t.dtype or np.int8
        if np.dtype(dtype).kind == "f":
            xs.append(rng.uniform(-1, 1, t.shape).astype(dtype))
        elif np.dtype(dtype) == np.int8:
            xs.append(rng.integers(-128, 128, t.shape, dtype=np.int8))
        else:
            xs.append(np.zeros(t.shape, dtype))
    return xs


def run_case(buffer, rng, impl="opt"):
    """{'inspect': outcome, 'run': outcome, messages} of one file: outcome 'ok' or an exception type."""
    from syq_tf import cli  # noqa: PLC0415
    from syq_tf.export import flatbuffer  # noqa: PLC0415
    from syq_tf.kernels import TFLiteRunner  # noqa: PLC0415

    out = {}
    try:
        flatbuffer.op_names(buffer)
        cli.tflite_weight_rows(buffer)
        out["inspect"] = "ok"
    except Exception as err:  # noqa: BLE001
        out["inspect"], out["inspect_message"] = _classify(err), str(err)[:300]
    try:
        runner = TFLiteRunner(buffer, impl=impl)
        runner(*_inputs(runner, rng))
        out["run"] = "ok"
    except Exception as err:  # noqa: BLE001
        out["run"], out["run_message"] = _classify(err), str(err)[:300]
    return out


def worker(seeds, master_seed, work_dir, impl="opt"):
    import syq_tf.cli  # noqa: F401, PLC0415  (first: selects Keras 2)

    import numpy as np  # noqa: PLC0415
    from tensorflow.lite.python import schema_py_generated as schema  # noqa: PLC0415
    from syq_tf.kernels import TFLiteRunner  # noqa: PLC0415

    buffers = [open(p, "rb").read() for p in seeds]
    for b in buffers[:2]:  # the seeds themselves must run (through the sanitized library)
        r = TFLiteRunner(b)
        r(*_inputs(r, np.random.default_rng(0)))
    current = os.path.join(work_dir, f"current-{os.getpid()}.tflite")
    print("@@ready", flush=True)
    for line in sys.stdin:
        case = int(line)
        rng = np.random.default_rng([master_seed, case])
        seed_index = case % len(buffers)
        kind, detail, data = mutate(buffers[seed_index], rng, schema)
        with open(current, "wb") as f:
            f.write(data)
        start = time.monotonic()
        res = run_case(data, rng, impl)
        res.update(case=case, seed=os.path.basename(seeds[seed_index]), kind=kind, detail=detail,
                   seconds=round(time.monotonic() - start, 4))
        print("@@" + json.dumps(res), flush=True)


# ---- parent -------------------------------------------------------------------------------------

class _Worker:
    def __init__(self, cmd, env, work_dir, n):
        self.err_path = os.path.join(work_dir, f"worker-{n}-{time.monotonic_ns()}.stderr")
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     env=env, bufsize=0)
        self.buf = b""
        self.case = None
        self.sent = None
        self.ready = False
        self.started = time.monotonic()

    def lines(self):
        chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *done, self.buf = self.buf.split(b"\n")
        return [d.decode(errors="replace") for d in done]

    def send(self, case):
        self.case, self.sent = case, time.monotonic()
        self.proc.stdin.write(f"{case}\n".encode())
        self.proc.stdin.flush()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.err.close()

    def stderr_text(self):
        self.err.flush()
        with open(self.err_path, "rb") as f:
            return f.read()[-200000:].decode(errors="replace")


def campaign(cases=1000, workers=1, timeout=10.0, seed=0, sanitize=True, seeds_dir=None, keep_dir=None,
             progress=False, startup_timeout=300.0, impl="opt"):
    """Run ``cases`` mutations; returns the summary dict (see the module docstring)."""
    work = tempfile.mkdtemp(prefix="syq-fuzz-")
    keep_dir = keep_dir or os.path.join(work, "findings")
    os.makedirs(keep_dir, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "TF_NUM_INTEROP_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1"}
    lib = libasan = None
    if sanitize:
        lib, libasan = build_sanitized_library(work)
        env.update(SYQ_KERNELS_LIB=lib, LD_PRELOAD=libasan,
                   ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86:"
                                "detect_odr_violation=0:alloc_dealloc_mismatch=0:allocator_may_return_null=1",
                   UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87")
    seeds_dir = seeds_dir or os.path.join(work, "seeds")
    if not all(os.path.isfile(os.path.join(seeds_dir, n)) for n in
               ("ternary_net.tflite", "binary_net.tflite", "tflm_lut.tflite")):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--export-seeds", seeds_dir], check=True,
                       env={k: v for k, v in env.items() if k not in ("LD_PRELOAD", "SYQ_KERNELS_LIB")},
                       capture_output=True)
    seeds = export_seeds(seeds_dir)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--seed", str(seed), "--work", work, "--impl", impl,
           *seeds]
    counts = {"inspect": collections.Counter(), "run": collections.Counter()}
    kinds, details, samples = collections.Counter(), collections.Counter(), {}
    crashes, hangs, sanitizer, findings = 0, 0, 0, []
    done, next_case, slowest, printed = 0, 0, 0.0, 0
    pool = [_Worker(cmd, env, work, i) for i in range(workers)]
    t0 = time.monotonic()

    def restart(w, n):
        w.stop()
        return _Worker(cmd, env, work, n)

    try:
        while done < cases:
            for w in pool:
                if w.ready and w.case is None and next_case < cases:
                    w.send(next_case)
                    next_case += 1
            live = {w.proc.stdout.fileno(): w for w in pool}
            readable, _, _ = select.select(list(live), [], [], 0.5)
            now = time.monotonic()
            for n, w in enumerate(pool):
                fd = w.proc.stdout.fileno()
                lines = w.lines() if fd in readable else []
                if lines is None:  # the worker died
                    w.proc.wait()
                    text = w.stderr_text()
                    if not w.ready:
                        raise RuntimeError(f"fuzz worker failed to start: {text[-3000:]}")
                    is_san = any(s in text for s in ("AddressSanitizer", "UndefinedBehaviorSanitizer",
                                                     "runtime error:", "LeakSanitizer"))
                    sanitizer += is_san
                    crashes += not is_san
                    done += 1
                    findings.append(_keep(work, keep_dir, w, "sanitizer" if is_san else "crash", text))
                    pool[n] = restart(w, n)
                    continue
                for line in lines:
                    if line == "@@ready":
                        w.ready = True
                    elif line.startswith("@@"):
                        res = json.loads(line[2:])
                        w.case = None
                        done += 1
                        slowest = max(slowest, res["seconds"])
                        kinds[res["kind"]] += 1
                        for d in res["detail"].split("+"):
                            details[d] += 1
                        for part in ("inspect", "run"):
                            outcome = res[part]
                            counts[part][outcome] += 1
                            if outcome != "ok" and len(samples.setdefault(f"{part}:{outcome}", [])) < 6:
                                samples[f"{part}:{outcome}"].append(
                                    {"case": res["case"], "seed": res["seed"], "mutation": res["detail"],
                                     "message": res.get(part + "_message", "")})
                if w.case is not None and now - w.sent > timeout:
                    hangs += 1
                    done += 1
                    findings.append(_keep(work, keep_dir, w, "hang", w.stderr_text()))
                    pool[n] = restart(w, n)
                elif not w.ready and now - w.started > startup_timeout:
                    raise RuntimeError(f"fuzz worker did not start in {startup_timeout} s: {w.stderr_text()[-3000:]}")
            if progress and done // 1000 > printed:
                printed = done // 1000
                print(f"{done}/{cases} cases, {time.monotonic() - t0:.0f} s, crashes {crashes}, hangs {hangs}, "
                      f"sanitizer {sanitizer}, inspect {dict(counts['inspect'])}, run {dict(counts['run'])}",
                      flush=True)
    finally:
        for w in pool:
            w.stop()
    unexpected = {part: {k: v for k, v in c.items() if k not in ACCEPTED} for part, c in counts.items()}
    summary = {
        "cases": done, "seconds": round(time.monotonic() - t0, 1), "workers": workers, "timeout_s": timeout,
        "seed": seed, "impl": impl, "sanitized": sanitize, "sanitizers": " ".join(SANITIZE) if sanitize else None,
        "crashes": crashes, "hangs": hangs, "sanitizer_reports": sanitizer,
        "inspect": dict(counts["inspect"]), "run": dict(counts["run"]),
        "unexpected_exceptions": unexpected, "malformed_model_error": {p: counts[p]["MalformedModelError"] for p in counts},
        "unsupported_op": {p: counts[p]["UnsupportedOp"] for p in counts},
        "slowest_case_s": slowest, "mutation_kinds": dict(kinds), "structured_edits": dict(details),
        "samples": samples, "findings": findings,
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
    }
    shutil.rmtree(work, ignore_errors=True) if not findings else None
    return summary


def _keep(work, keep_dir, w, what, text):
    src = os.path.join(work, f"current-{w.proc.pid}.tflite")
    dst = os.path.join(keep_dir, f"{what}-case{w.case}.tflite")
    if os.path.exists(src):
        shutil.copyfile(src, dst)
    marks = [m for m in (text.find(s) for s in ("ERROR: AddressSanitizer", "runtime error:", "Sanitizer")) if m >= 0]
    at = text.rfind("\n", 0, min(marks)) + 1 if marks else max(0, len(text) - 1500)
    return {"what": what, "case": w.case, "file": dst, "report": text[at:at + 1500]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sanitize", action="store_true", help="use the normal library (no ASan/UBSan build)")
    ap.add_argument("--impl", default="opt", choices=("opt", "portable", "ref"),
                    help="the packed kernels run_tflite uses (opt: AVX2 when available, as by default)")
    ap.add_argument("--seeds-dir", default=None, help="where the exported seed models are cached")
    ap.add_argument("--keep", default=None, help="folder for the inputs that crashed or hung")
    ap.add_argument("--out", default=None, help="write the summary JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--export-seeds", default=None, help=argparse.SUPPRESS)
    ap.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.export_seeds:
        export_seeds(args.export_seeds)
        return 0
    if args.worker:
        worker(args.files, args.seed, args.work, args.impl)
        return 0
    summary = campaign(args.cases, args.workers, args.timeout, args.seed, not args.no_sanitize, args.seeds_dir,
                       args.keep, progress=True, impl=args.impl)
    if args.out:
        write_json(args.out, summary, sort_keys=True, default=str)
    print(json.dumps({k: summary[k] for k in ("cases", "seconds", "crashes", "hangs", "sanitizer_reports",
                                               "inspect", "run", "unexpected_exceptions")}, indent=1))
    bad = summary["crashes"] + summary["hangs"] + summary["sanitizer_reports"] + sum(
        sum(v.values()) for v in summary["unexpected_exceptions"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
