"""Export trained syq_tf / larq / tfmot models to TFLite.

``to_tflite(model, representative_data=..., target="litert")`` returns an :class:`ExportResult`:
the flatbuffer, a per-layer report of what was stored (codebook levels, exactness, bytes) and,
when ``verify_data`` is given, runtime-vs-Keras agreement.

The pipeline, top-down (docs/ARCHITECTURE.md): the options are checked once (:mod:`.targets`), the
target's module runs -- inference form (:mod:`.inference`), conversion (:mod:`.convert`, or LCE's
converter), flatbuffer rewrite (:mod:`.flatbuffer` with the codebook arithmetic of
:mod:`.codebook`), report (:mod:`.report`), verification (:mod:`.runtime`). Where the exported
model departs from Keras, op by op: :func:`trace_divergence` (:mod:`.trace`).
"""

from syq_tf.export import flatbuffer
from syq_tf.export.inference import build as build_inference_model
from syq_tf.export.report import ExportResult, LayerReport
from syq_tf.export.runtime import litert_predict
from syq_tf.export.targets import REGISTRY, TARGETS, WEIGHTS, options
from syq_tf.export.trace import TraceRow, trace_divergence


def to_tflite(model, representative_data, target="litert", verify_data=None, verify_labels=None,
              representative_samples=200, require_exact=False, weights="int8", requantization="auto"):
    """Export ``model`` to TFLite for ``target`` (:data:`TARGETS`):

    * ``"litert"``: a full-integer int8 model (int8 inputs and outputs) for LiteRT. Models with LSTM
      layers are exported with int8 weights and float activations instead (dynamic range: TFLite's
      full-integer fused LSTM gives wrong outputs on this stack), batch size 1, the LSTM as one fused
      op whose eight gate weight tensors are checked against the Keras codebooks like any other
      kernel. GRU / SimpleRNN layers are refused with the reason.
    * ``"tflm"``: the same int8 model with LUT-compressed low-bit weights for TFLite Micro
      (:mod:`syq_tf.export.tflm`), checked in TFLM's interpreter.
    * ``"lce"``: binary layers bit-packed into larq-compute-engine ``LceBconv2d`` ops
      (:mod:`syq_tf.export.lce`), run by LCE's interpreter.

    representative_data: input examples (array, (x, y) tuple or tf.data.Dataset) used to
        calibrate the ranges of tensors that have no quantizer of their own (unused for recurrent
        models, whose activations stay float).
    verify_data / verify_labels: optional inputs (and labels) on which the runtime is run and
        compared with Keras; the result lands in ``ExportResult.verification``.
    require_exact: raise instead of exporting when some quantized layer's codebook cannot be
        stored exactly (it is always reported in ``ExportResult.layers`` and ``notes``).
    weights: how low-bit weights are stored (:data:`WEIGHTS`):

        * ``"int8"`` (default): int8 in every target (lce: the layers it cannot bit-pack, as int8
          dequantized to float when the interpreter prepares).
        * ``"int4"`` (target ``litert``): the int8 weights of quantized CONV_2D / DEPTHWISE_CONV_2D /
          FULLY_CONNECTED layers whose codebook is integer multiples k of one step with |k| <= 7
          per channel (binary, ternary, UniQ 2-3 bit, LAB, LAT, LAQ with at most 7 positive steps,
          ...) are stored as packed TFLite INT4 (values k*m, scale re-expressed: still exact), at
          half the bytes; the rest stays int8 (``notes`` say why; UniQ 4 bit needs odd multiples
          up to 15). XNNPACK runs INT4 FULLY_CONNECTED only; INT4 convolutions run with the
          builtin kernels.
        * ``"int2"`` (target ``litert``): as ``"int4"``, and FULLY_CONNECTED kernels whose
          codebook is ``k * step`` per channel with |k| <= 1 (binary and ternary) are stored as
          packed TFLite INT2, four weights a byte. Convolutions have no INT2 kernel in LiteRT:
          they are stored INT4 where they fit (the report says so per layer).
        * ``"float32"`` (target ``lce``): the layers LCE cannot bit-pack keep float32 kernels.

        Packed INT4 / INT2 is not the default because the re-expressed int32 bias and
        requantization multipliers differ from the int8 export's by rounding: outputs may differ
        from the int8 model's by a few int8 steps on some values. The packed model itself is
        checked to compute bit-identically to its int8 twin (the same integers stored as int8) with
        LiteRT's builtin kernels.

    requantization: how the runtime the model is for rounds an int32 accumulator onto an int8
        output (``tests/test_runtime_kernels.py``):

        * ``"auto"`` (default): ``"single"`` for target ``litert``, ``"double"`` for ``tflm``.
        * ``"single"``: one rounding (LiteRT's default XNNPACK delegate; a TFLite Micro built with
          ``TFLITE_SINGLE_ROUNDING``); the biases are the converter's.
        * ``"double"``: a rounding fixed-point multiply, then a rounding shift (TFLite Micro and
          CMSIS-NN as built by default, LiteRT's builtin and reference kernels), which rounds up a
          value within half an accumulator unit below a rounding boundary. The int32 bias of each
          op whose output holds no negative value is lowered by one
          (:func:`syq_tf.export.flatbuffer.lower_biases_for_two_roundings`): such a runtime then
          departs from one rounding only within ``M - 1/2`` (M in [0.5, 1), the fixed-point
          multiplier) above a boundary. Target ``litert`` then verifies with LiteRT's builtin
          kernels. On MobileNet-VWW with 4-bit activations: TFLM agreement with Keras 0.970 ->
          0.996; XNNPACK on such a file 0.994 -> 0.982.

    Codebooks that are integer multiples of a unit step per channel (UniQ up to 7 bits, binary and
    ternary ones) are stored exactly: where the converter's scale max|w|/127 misses their levels,
    the int8 weights are re-expressed as k*m with a matching scale.
    """
    checked = options(model, target=target, weights=weights, representative_data=representative_data,
                      representative_samples=representative_samples, verify_data=verify_data,
                      verify_labels=verify_labels, require_exact=require_exact, requantization=requantization)
    return REGISTRY[checked.target].load().export(model, checked)


__all__ = ["to_tflite", "ExportResult", "LayerReport", "build_inference_model", "litert_predict",
           "trace_divergence", "TraceRow",
           "flatbuffer", "TARGETS", "WEIGHTS"]
