"""syq_tf.recipes: the float -> quantized recipe copies every float weight (kernels of larq layers
included) and keeps only the quantizers' own scales."""

import numpy as np
import pytest

import syq_tf  # noqa: F401
import larq as lq
import tensorflow as tf

from syq_tf import quantizers as Q
from syq_tf.recipes import build_cnn, transfer_float_weights

WIDTHS = (4, 4, 8, 8, 8)


def _layer_weights(model):
    return {f"{layer.name}/{w.name.split('/')[-1].split(':')[0]}": w for layer in model.layers for w in layer.weights}


def test_transfer_copies_larq_layer_kernels_and_keeps_scales():
    tf.keras.utils.set_random_seed(0)
    float_model = build_cnn(None, widths=WIDTHS)
    for factories in ((lambda: Q.SYQ(2, "pixel"), lambda: Q.SYQ(2, "layer"), lambda: Q.DoReFa(8)),
                      (lq.quantizers.SteTern, lq.quantizers.SteTern, None)):
        model = build_cnn(widths=WIDTHS, quantizers=factories)
        before = {k: w.numpy().copy() for k, w in _layer_weights(model).items()}
        model.set_weights(transfer_float_weights(model, float_model))
        after = _layer_weights(model)
        source = _layer_weights(float_model)
        for name in ("conv2/kernel", "conv3/kernel", "conv4/kernel", "fc1/kernel", "conv1/kernel", "logits/kernel",
                     "bn3/gamma"):
            np.testing.assert_array_equal(after[name].numpy(), source[name].numpy(), err_msg=name)
        scales = [k for k in after if k.endswith("/alpha")]
        for k in scales:  # the quantizer's own variable keeps its value (set later from the weights)
            np.testing.assert_array_equal(after[k].numpy(), before[k], err_msg=k)
        assert len(scales) == (4 if factories[2] is not None else 0)


def test_compile_model_passes_loss_aware_options_and_refuses_them_for_adam():
    from syq_tf.optimizers import LossAwareAdam
    from syq_tf.recipes import compile_model

    model = build_cnn(widths=(4, 4, 4, 4, 8), quantizers=(lambda: Q.LossAware("binary"),) * 2 + (None,))
    compile_model(model, 1e-3, "la", {"curvature": "raw"})
    assert isinstance(model.optimizer, LossAwareAdam) and model.optimizer.curvature == "raw"
    compile_model(model, 1e-3, "la")
    assert model.optimizer.curvature == "bias_corrected"
    with pytest.raises(ValueError, match=r"compile_model: optimizer_options=\{'curvature': 'raw'\} are "
                                         r"LossAwareAdam's; they need method='la' \(got method='syq'\)"):
        compile_model(model, 1e-3, "syq", {"curvature": "raw"})
