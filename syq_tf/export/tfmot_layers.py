"""A tfmot QAT model (:func:`syq_tf.quantize_model`) as syq_tf quantized layers, for a target that
plans layer by layer (target ``lce``); :func:`syq_tf.export.inference.build` then makes its
inference form as for any syq_tf model.

Each ``QuantizeWrapper`` becomes its inner layer, computing what the wrapper computes:

* a kernel layer becomes its ``syq_tf.quantize``d layer: the kernel quantizer is a copy of the syq_tf
  quantizer of the wrapper's config (its variables' values: SYQ alpha ...), or tfmot's own 8-bit
  weight quantizer with its trained range (:class:`TfmotKernel`, the first and last layers);
* the wrapper's output and post-activation quantizers become layers after it: a copy of the syq_tf
  activation quantizer (DoReFa, UniQ ...), or the int8 FakeQuant of tfmot's trained range
  (:class:`~syq_tf.export.inference.Int8Input`; likewise tfmot's ``QuantizeLayer`` on the inputs);
* a kernel layer whose input holds the levels of such a quantizer -- directly or through layers that
  only move or select values (max pooling, flatten, reshape, dropout) -- takes a copy of it as its
  ``input_quantizer``. Quantizing a value already on the quantizer's grid leaves it unchanged, so
  the model computes the same, and a binary layer after a 1-bit activation has the binary input
  quantizer LCE packs.
"""

import tensorflow as tf
from tensorflow_model_optimization.python.core.quantization.keras.quantize_aware_activation import (
    NoOpActivation,  # (tfmot's activation wrappers are not public)
    QuantizeAwareActivation,
)
from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import (
    QuantizeLayer,  # (the layer on a tfmot model's inputs is not public)
)

from syq_tf.export.inference import Int8Input, leaf
from syq_tf.layers import quantize
from syq_tf.quantizers import ActivationQuantizer
from syq_tf.tfmot import TfmotQuantizer, is_wrapper, wrapper_kernels
from syq_tf.tfmot.adapter import kernel_attr

# Layers whose outputs are values of their input: the grid of the quantizer before them holds.
KEEPS_GRID = (tf.keras.layers.MaxPooling1D, tf.keras.layers.MaxPooling2D, tf.keras.layers.GlobalMaxPooling1D,
              tf.keras.layers.GlobalMaxPooling2D, tf.keras.layers.Flatten, tf.keras.layers.Reshape,
              tf.keras.layers.Dropout)


class TfmotKernel:
    """tfmot's weight quantizer with its trained range, as a kernel quantizer: kernel -> the
    fake-quantized kernel tfmot computes at inference (a callable, like larq's quantizer functions)."""

    def __init__(self, quantizer, variables):
        self.quantizer = quantizer
        self.variables = variables
        self.bits = getattr(quantizer, "num_bits", None)

    @property
    def weights(self):
        """Its float scales (one per output channel, or one): the trained top of the range."""
        return [self.variables["max_var"]]

    def __call__(self, kernel):
        return self.quantizer(kernel, False, self.variables)

    def get_config(self):
        return {"tfmot": type(self.quantizer).__name__, "bits": self.bits,
                "per_axis": getattr(self.quantizer, "per_axis", None)}


def _int8_range(quantizer, variables, where, name):
    """Int8Input of a tfmot activation quantizer's trained range (tfmot's 8-bit default: asymmetric,
    per tensor, full range); ValueError naming the layer for any other."""
    settings = {k: getattr(quantizer, k, None) for k in ("num_bits", "per_axis", "symmetric", "narrow_range")}
    if settings != {"num_bits": 8, "per_axis": False, "symmetric": False, "narrow_range": False}:
        raise ValueError(f"to_tflite(target='lce'): {where}: tfmot activation quantizer "
                         f"{type(quantizer).__name__} {settings} has no int8 form here (tfmot's default "
                         "8-bit activations are per tensor, asymmetric, 8 bits).")
    low, high = (float(variables[k].numpy()) for k in ("min_var", "max_var"))
    if not low < high:
        raise ValueError(f"to_tflite(target='lce'): {where}: tfmot's activation range [{low:g}, {high:g}] is "
                         "empty: it is set in training; fit the model (or run it with training=True) first.")
    return Int8Input(low, high, name=name)


def _output_layers(wrapper, name):
    """(layer to run after the inner layer, the syq_tf quantizer it copies or None) per output and
    post-activation quantizer of a wrapper."""
    quantizers = []
    for activation in getattr(wrapper, "_quantize_activations", []):
        if activation._should_pre_quantize():
            raise ValueError(f"to_tflite(target='lce'): layer '{name}': tfmot quantizes the input of its "
                             f"activation {activation._name(activation.activation)}; export it with "
                             "target='litert' or put the activation in its own layer.")
        if activation._should_post_quantize():
            quantizers.append((activation.quantizer, activation._post_activation_vars))
    for quantizer in getattr(wrapper, "_output_quantizers", None) or []:
        quantizers.append((quantizer, getattr(wrapper, "_output_quantizer_vars", None)))
    after = []
    for i, (quantizer, variables) in enumerate(quantizers):
        out_name = f"{name}_output_quantizer" + (f"_{i}" if i else "")
        if isinstance(quantizer, TfmotQuantizer):
            after.append((_copy(quantizer.impl, out_name), quantizer.impl))
        else:
            after.append((_int8_range(quantizer, variables, f"layer '{name}'", out_name), None))
    return after


def _copy(layer, name=None):
    """A fresh layer of the same config (its weights are set once it is built); the activation of a
    wrapper's inner layer is the one tfmot wrapped (its NoOpActivation: linear)."""
    config = layer.get_config()
    if name:
        config["name"] = name
    activation = getattr(layer, "activation", None)
    if isinstance(activation, QuantizeAwareActivation):
        activation = activation.activation
    if isinstance(activation, NoOpActivation):  # tfmot's identity
        config["activation"] = "linear"
    elif "activation" in config and activation is not None:
        config["activation"] = tf.keras.activations.serialize(activation)
    return type(layer).from_config(config)


def _assign(new_variables, old_variables, what):
    new_variables, old_variables = list(new_variables), list(old_variables)
    shapes = [tuple(v.shape) for v in new_variables], [tuple(v.shape) for v in old_variables]
    if shapes[0] != shapes[1]:
        raise ValueError(f"to_tflite(target='lce'): {what}: weights of shapes {shapes[0]} cannot take "
                         f"the tfmot model's {shapes[1]}.")
    for new, old in zip(new_variables, old_variables):
        new.assign(old.numpy())


class _Unwrapped:
    """What one layer of the tfmot model became: the layer in its place, the layers after it, and
    where their weights come from."""

    def __init__(self, layer):
        self.old = layer
        self.inner = layer.layer if is_wrapper(layer) else layer
        self.kernel_source = None  # the syq_tf weight quantizer whose variables the copy takes
        self.after = []
        self.main = self._main()

    def _main(self):
        layer, inner = self.old, self.inner
        if isinstance(layer, QuantizeLayer):
            if layer.quantizer is None:
                return None
            return _int8_range(layer.quantizer, layer.quantizer_vars, f"layer '{layer.name}'", layer.name)
        copy = _copy(inner)
        if not is_wrapper(layer):
            return copy
        self.after = _output_layers(layer, inner.name)
        quantized = getattr(layer, "_weight_vars", [])
        if not quantized:
            return copy
        attr = kernel_attr(inner)
        names = list(wrapper_kernels(layer))  # the attributes of the weights tfmot quantizes
        if attr is None or names != [attr]:
            raise ValueError(f"to_tflite(target='lce'): layer '{inner.name}' ({type(inner).__name__}): tfmot "
                             f"quantizes its weights {names}; only the kernel of a "
                             "Conv1D/Conv2D/DepthwiseConv2D/Dense layer has a syq_tf form.")
        (_, quantizer, variables), = quantized
        if isinstance(quantizer, TfmotQuantizer):
            self.kernel_source = quantizer.impl
            return copy, quantizer.impl
        return copy, TfmotKernel(quantizer, variables)

    def __call__(self, inputs, grid, *args, **kwargs):
        """(the new layers on ``inputs``, the quantizer layer whose levels the output holds or None);
        ``grid``: that of the input."""
        main = self.main
        if isinstance(main, tuple):  # a kernel layer: quantize it, with the input's quantizer
            copy, kernel_quantizer = main
            main = self.main = quantize(copy, kernel_quantizer=kernel_quantizer, input_quantizer=grid)
            if grid is not None:  # built and set before the first call (a UniQ step must be calibrated)
                main.input_quantizer.build(inputs.shape)
                _assign(main.input_quantizer.weights, grid.weights, f"layer '{main.name}' input quantizer")
        out = inputs if main is None else main(inputs, *args, **kwargs)
        if isinstance(main, (ActivationQuantizer, Int8Input)):
            grid = main
        elif not isinstance(main, KEEPS_GRID) and main is not None:
            grid = None
        for layer, source in self.after:
            if source is not None:
                layer.build(out.shape)
                _assign(layer.weights, source.weights, f"layer '{layer.name}'")
            out, grid = layer(out), layer
        return out, grid

    def transfer(self):
        """The inner layer's weights (and the syq_tf kernel quantizer's variables) into the copy."""
        main = self.main
        # the wrapper took the kernel out of the inner layer's weights; leaves are unique in a layer
        old = {leaf(w.name): w for w in self.inner.weights + [w for w, _, _ in getattr(self.old, "_weight_vars", [])]}
        if main is None or isinstance(main, Int8Input) or not old:
            return
        quantizers = [q for q in (getattr(main, "kernel_quantizer", None), getattr(main, "input_quantizer", None))
                      if isinstance(q, tf.keras.layers.Layer)]
        own = [w for w in main.weights if not any(w is v for q in quantizers for v in q.weights)]
        missing = [leaf(w.name) for w in own if leaf(w.name) not in old]
        if missing:
            raise ValueError(f"to_tflite(target='lce'): layer '{main.name}': no weights {missing} in the tfmot "
                             f"model's layer (it has {sorted(old)}).")
        _assign(own, [old[leaf(w.name)] for w in own], f"layer '{main.name}'")
        if self.kernel_source is not None:
            _assign(main.kernel_quantizer.weights, self.kernel_source.weights, f"layer '{main.name}' kernel quantizer")


def as_quantized_layers(model):
    """The tfmot model ``model`` as a functional model of syq_tf quantized layers that computes the
    same (see the module docstring); layers keep their inner layers' names."""
    inputs = [tf.keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in model.inputs]
    tensors = {id(old): (new, None) for old, new in zip(model.inputs, inputs)}  # old tensor -> (new, grid)
    made = {}
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.outbound_layer
            if isinstance(layer, tf.keras.layers.InputLayer):
                continue
            if layer not in made:
                made[layer] = _Unwrapped(layer)
            args, kwargs = tf.nest.map_structure(lambda t: tensors[id(t)][0] if id(t) in tensors else t,
                                                 (node.call_args, node.call_kwargs))
            flat = tf.nest.flatten(node.call_args)
            grid = tensors[id(flat[0])][1] if len(flat) == 1 and id(flat[0]) in tensors else None
            out, out_grid = made[layer](args[0], grid, *args[1:], **kwargs)
            for old, new in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(out)):
                tensors[id(old)] = (new, out_grid)
    outputs = tf.nest.map_structure(lambda t: tensors[id(t)][0], model.outputs)
    unwrapped = tf.keras.Model(inputs, outputs, name=f"{model.name}_layers")
    for step in made.values():
        step.transfer()
    return unwrapped
