"""Test vectors for the packed kernels on ARM targets, from exported int8 models (host side).

Every layer comes from a full-integer int8 TFLite flatbuffer: its binary/ternary CONV_2D /
FULLY_CONNECTED op is read back as packed codes (syq_tf.kernels.packed_layers), and its input and
expected output are the tensors LiteRT's reference kernels (BUILTIN_REF, all intermediate tensors
kept) compute for that op inside the model.  Layer sets:

  demo    the demo CNN (syq_tf.recipes.build_cnn: conv2, conv3, conv4, fc1; untrained, random
          BatchNorm statistics) exported with syq_tf.export.to_tflite, binary (W1A8) and ternary (W2A8)
  random  one-layer Keras models (Conv2D / Dense with binary or ternary codebook kernels at layer,
          channel or pixel granularity) converted to int8: odd channel counts, strides 1-3, SAME and
          VALID padding, ReLU / no activation, with or without bias, batch 1-2
  dwsep   a depthwise-separable block (int8 DepthwiseConv2D 3x3 + binary/ternary 1x1 Conv2D): the
          pointwise layer, its input being LiteRT's depthwise output

Writes one C header (arrays + a table of syq_vec records, see tflite/arm/check_vectors.c) and a
JSON summary.  Each layer is also checked on the host (syq_tf.kernels reference kernel == LiteRT).

    python tflite/arm/gen_vectors.py --sets random,dwsep --out build/arm/vectors.h
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # this checkout's syq_tf
import numpy as np  # noqa: E402

import syq_tf  # noqa: E402,F401  (Keras 2 before TensorFlow)
import tensorflow as tf  # noqa: E402
from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: E402

from syq_tf import kernels as K  # noqa: E402
from syq_tf.export.convert import int8 as convert_int8  # noqa: E402


def _scratch_bytes(layer, oh, ow):
    """SYQ_CONV2D_SCRATCH_BYTES of syq_kernels.h (FC: a 1 x batch image)."""
    o, kh, kw, i = layer.shape
    sh, sw = layer.stride if layer.kind == "conv" else (1, 1)
    a64 = lambda v: (v + 63) // 64 * 64  # noqa: E731
    ip = (i + 31) // 32 * 32
    return 64 + a64(((oh - 1) * sh + kh) * ((ow - 1) * sw + kw) * ip) + a64(o * 4) + a64(kh * kw * ip)


def _layers_of(fb, x, prefix):
    """(name, PackedLayer, input, expected output) for every packed op of flatbuffer fb on input x."""
    it = Interpreter(model_content=fb, experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                     num_threads=1, experimental_preserve_all_tensors=True)
    d = it.get_input_details()[0]
    it.resize_tensor_input(d["index"], x.shape)
    it.allocate_tensors()
    it.set_tensor(d["index"], x.astype(d["dtype"]))
    it.invoke()
    ops = {op["index"]: op for op in it._get_ops_details()}
    out = []
    for idx, layer in sorted(K.packed_layers(fb).items()):
        op = ops[idx]
        xin = it.get_tensor(int(op["inputs"][0]))
        y = it.get_tensor(int(op["outputs"][0]))
        name = f"{prefix}_{layer.name or idx}".replace("/", "_").replace(";", "_").replace(":", "_")[:60]
        out.append((name, layer, xin, y))
    return out


def demo_layers(rng):
    from syq_tf.recipes import build_cnn

    res = []
    for bits in (1, 2):
        model = build_cnn(bits, "pixel")
        x = rng.uniform(0, 1, size=(64, 28, 28, 1)).astype(np.float32)
        model(x[:1])
        for layer in model.layers:  # BatchNorm statistics away from identity
            if isinstance(layer, tf.keras.layers.BatchNormalization):
                n = layer.gamma.shape[0]
                r = np.random.default_rng(n + bits)
                layer.set_weights([r.uniform(0.5, 1.5, n), r.normal(0, 0.2, n), r.normal(0, 0.3, n),
                                   r.uniform(0.5, 2, n)])
        fb = bytes(syq_tf.export.to_tflite(model, representative_data=x).flatbuffer)
        xq = rng.integers(-128, 128, size=(1, 28, 28, 1)).astype(np.int8)
        # the packed layers (conv1 keeps float->int8 weights: its 3x3x1 kernels are no smaller packed)
        found = [t for t in _layers_of(fb, xq, "demo") if t[1].weight_bytes < int(np.prod(t[1].shape))]
        names = ["conv2", "conv3", "conv4", "fc1"]
        if len(found) != len(names):
            raise SystemExit(f"demo CNN: expected packed {names}, found {[t[0] for t in found]}")
        res += [(f"demo_w{bits}_{n}", layer, xin, y) for n, (_, layer, xin, y) in zip(names, found)]
    return res


def _one_layer_model(kind, in_shape, out_c, rng, k, stride, padding, bits, gran, act, bias):
    inp = tf.keras.Input(in_shape)
    if kind == "conv":
        layer = tf.keras.layers.Conv2D(out_c, k, strides=stride, padding=padding, use_bias=bias, activation=act)
    else:
        layer = tf.keras.layers.Dense(out_c, use_bias=bias, activation=act)
    model = tf.keras.Model(inp, layer(inp))
    shape = tuple(layer.kernel.shape)
    codes = rng.choice([-1, 1] if bits == 1 else [-1, 0, 1], size=shape)
    if gran == "layer":
        alpha = np.full([1] * len(shape), rng.uniform(0.02, 0.3))
    elif gran == "channel":
        alpha = rng.uniform(0.02, 0.3, size=[1] * (len(shape) - 1) + [shape[-1]])
    else:
        alpha = rng.uniform(0.02, 0.3, size=list(shape[:-2]) + [1, 1])
    layer.kernel.assign((codes * alpha).astype(np.float32))
    if bias:
        layer.bias.assign(rng.normal(0, 0.5, size=out_c).astype(np.float32))
    return model


def random_layers(rng, n_conv=10, n_fc=4):
    res = []
    for t in range(n_conv):
        h, w = int(rng.integers(3, 11)), int(rng.integers(3, 11))
        cin = int(rng.choice([1, 3, 5, 7, 13, 31, 33, 45, 64, 70]))
        cout = int(rng.choice([1, 3, 5, 8, 11, 16, 17]))
        k = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        stride = (int(rng.integers(1, 4)), int(rng.integers(1, 3)))
        padding = "same" if t % 2 == 0 or h < k[0] or w < k[1] else "valid"
        bits, gran = int(rng.integers(1, 3)), ["layer", "channel", "pixel"][t % 3]
        act = "relu" if t % 3 == 1 else None
        model = _one_layer_model("conv", (h, w, cin), cout, rng, k, stride, padding, bits, gran, act, t % 4 != 3)
        fb = convert_int8(model, rng.uniform(-1, 1, size=(16, h, w, cin)).astype(np.float32))
        x = rng.integers(-128, 128, size=(1 + t % 2, h, w, cin)).astype(np.int8)
        res += _layers_of(fb, x, f"rnd_conv{t}_w{bits}_{gran}_k{k[0]}x{k[1]}_s{stride[0]}{stride[1]}_{padding}_c{cin}")
    for t in range(n_fc):
        cin, cout = int(rng.choice([7, 33, 100, 257, 500])), int(rng.choice([1, 5, 10, 19, 64]))
        bits, gran = 1 + t % 2, ["layer", "channel"][t // 2 % 2]
        model = _one_layer_model("fc", (cin,), cout, rng, None, None, None, bits, gran, "relu" if t == 1 else None,
                                 t != 2)
        fb = convert_int8(model, rng.uniform(-1, 1, size=(16, cin)).astype(np.float32))
        x = rng.integers(-128, 128, size=(1 + t % 3, cin)).astype(np.int8)
        res += _layers_of(fb, x, f"rnd_fc{t}_w{bits}_{gran}_{cin}x{cout}")
    return res


def dwsep_layers(rng):
    res = []
    for bits in (1, 2):
        inp = tf.keras.Input((10, 10, 24))
        x = tf.keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(inp)
        pw = tf.keras.layers.Conv2D(40, 1, use_bias=True)
        model = tf.keras.Model(inp, pw(x))
        shape = tuple(pw.kernel.shape)
        codes = rng.choice([-1, 1] if bits == 1 else [-1, 0, 1], size=shape)
        pw.kernel.assign((codes * rng.uniform(0.02, 0.3, size=(1, 1, 1, shape[-1]))).astype(np.float32))
        fb = convert_int8(model, rng.uniform(-1, 1, size=(16, 10, 10, 24)).astype(np.float32))
        xq = rng.integers(-128, 128, size=(1, 10, 10, 24)).astype(np.int8)
        res += _layers_of(fb, xq, f"dwsep_w{bits}_pointwise")
    return res


def _arr(ctype, name, a, per_line=24):
    a = np.asarray(a).ravel()
    body = ",".join(str(int(v)) + ("u" if ctype.startswith("uint32") else "") for v in a) if a.size else "0"
    return f"static const {ctype} {name}[{max(a.size, 1)}] = {{{body}}};\n"


def write_header(layers, path, bench_names=()):
    lines = ["/* Generated by tflite/arm/gen_vectors.py: packed layers of exported int8 models, inputs and",
             " * LiteRT BUILTIN_REF outputs.  Do not edit. */", "#include \"check_vectors.h\"", ""]
    recs, summary, max_scratch, max_out = [], [], 0, 0
    for i, (name, L, x, y) in enumerate(layers):
        o, kh, kw, cin = L.shape
        if L.kind == "conv":
            n, h, w, _ = x.shape
            _, oh, ow, _ = y.shape
            sh, sw = L.stride
            pt = max((oh - 1) * sh + kh - h, 0) // 2 if L.padding == "SAME" else 0
            pl = max((ow - 1) * sw + kw - w, 0) // 2 if L.padding == "SAME" else 0
            scratch = _scratch_bytes(L, oh, ow)
        else:
            n, h, w, oh, ow, sh, sw, pt, pl = x.size // cin, 1, 1, 1, 1, 1, 1, 0, 0
            scratch = _scratch_bytes(L, 1, n)
        # host check: our reference kernel against LiteRT on exactly these arrays
        got = L(x, impl="ref")
        if not np.array_equal(got.reshape(y.shape), y):
            raise SystemExit(f"{name}: host reference kernel differs from LiteRT BUILTIN_REF")
        w8 = L.int8_weights().reshape(o, kh, kw, cin)
        p = f"v{i}"
        lines += [_arr("uint32_t", f"{p}_codes", L.codes), _arr("uint8_t", f"{p}_mag", L.mag),
                  _arr("int32_t", f"{p}_mult", L.multiplier), _arr("int32_t", f"{p}_shift", L.shift),
                  _arr("int8_t", f"{p}_w8", w8), _arr("int8_t", f"{p}_in", x), _arr("int8_t", f"{p}_out", y)]
        if L.bias is not None:
            lines.append(_arr("int32_t", f"{p}_bias", L.bias))
        gran = K.GRANULARITIES.index(L.granularity)
        bench = 1  # every layer also runs through the int8 kernels (ours, CMSIS-NN)
        recs.append(f'    {{"{name}", {int(L.kind == "fc")}, {L.bits}, {gran}, {o}, {kh}, {kw}, {cin}, {n}, {h}, {w}, '
                    f"{oh}, {ow}, {sh}, {sw}, {pt}, {pl}, {L.input_zero_point}, {L.output_zero_point}, {L.act_min}, "
                    f"{L.act_max}, {p}_codes, {L.codes.size}u, {p}_mag, {L.mag.size}u, "
                    f"{p + '_bias' if L.bias is not None else '0'}, {p}_mult, {p}_shift, {p}_w8, {p}_in, {p}_out, "
                    f"{x.size}u, {y.size}u, {bench}}},")
        max_scratch, max_out = max(max_scratch, scratch), max(max_out, y.size)
        summary.append(dict(name=name, kind=L.kind, bits=L.bits, granularity=L.granularity, shape=list(L.shape),
                            input=list(x.shape), output=list(y.shape), stride=list(L.stride), padding=L.padding,
                            packed_bytes=L.weight_bytes, int8_bytes=int(w8.size), scratch_bytes=scratch,
                            macs=int(y.size // o * o * kh * kw * cin)))
    lines += ["", f"#define SYQ_VEC_COUNT {len(recs)}", f"#define SYQ_VEC_SCRATCH_BYTES {max_scratch}u",
              f"#define SYQ_VEC_MAX_OUT {max_out}u", "static const syq_vec syq_vecs[SYQ_VEC_COUNT] = {", *recs, "};", ""]
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text("\n".join(lines))
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="demo,random,dwsep", help="comma list of demo, random, dwsep")
    ap.add_argument("--out", required=True, help="C header to write (a .json summary is written next to it)")
    ap.add_argument("--seed", type=int, default=22)
    ap.add_argument("--n-conv", type=int, default=10)
    ap.add_argument("--n-fc", type=int, default=4)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    tf.keras.utils.set_random_seed(a.seed)
    layers = []
    for s in a.sets.split(","):
        if s == "demo":
            layers += demo_layers(rng)
        elif s == "random":
            layers += random_layers(rng, a.n_conv, a.n_fc)
        elif s == "dwsep":
            layers += dwsep_layers(rng)
        elif s:
            raise SystemExit(f"unknown set {s!r}")
    if not layers:
        raise SystemExit("no packed layers found")
    summary = write_header(layers, a.out)
    pathlib.Path(a.out).with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"[gen_vectors] {len(layers)} layers -> {a.out} (host reference == LiteRT BUILTIN_REF on each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
