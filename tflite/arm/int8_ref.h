/* syq_int8_conv: our straightforward int8 kernel, shared by the vector checker (the "our int8"
 * instruction column) and the whole-model firmware. */
#ifndef SYQ_ARM_INT8_REF_H_
#define SYQ_ARM_INT8_REF_H_

#include <stddef.h>
#include <stdint.h>

#include "syq_kernels.h"

/* Our straightforward int8 kernel (TFLite reference arithmetic): conv over NHWC, int8 OHWI weights,
 * one multiply per weight, per-channel requantization.  FC = 1x1 conv over batch rows. */
static void syq_int8_conv(const syq_conv_params *p, const int8_t *w, int32_t oc, int32_t kh, int32_t kw, int32_t ic,
                          const int8_t *in, int8_t *o8) {
    int32_t n, oy, ox, o, ky, kx, i;
    for (n = 0; n < p->batch; ++n)
        for (oy = 0; oy < p->out_h; ++oy)
            for (ox = 0; ox < p->out_w; ++ox)
                for (o = 0; o < oc; ++o) {
                    int32_t acc = p->bias ? p->bias[o] : 0, v;
                    for (ky = 0; ky < kh; ++ky) {
                        const int32_t iy = oy * p->stride_h - p->pad_top + ky;
                        if (iy < 0 || iy >= p->in_h) continue;
                        for (kx = 0; kx < kw; ++kx) {
                            const int32_t ix = ox * p->stride_w - p->pad_left + kx;
                            const int8_t *xr, *wr;
                            if (ix < 0 || ix >= p->in_w) continue;
                            xr = in + (((size_t)n * p->in_h + iy) * p->in_w + ix) * ic;
                            wr = w + (((size_t)o * kh + ky) * kw + kx) * ic;
                            for (i = 0; i < ic; ++i) acc += (int32_t)wr[i] * ((int32_t)xr[i] - p->input_zero_point);
                        }
                    }
                    v = syq_multiply_by_quantized_multiplier(acc, p->out_multiplier[o], p->out_shift[o]) +
                        p->output_zero_point;
                    v = v < p->act_min ? p->act_min : (v > p->act_max ? p->act_max : v);
                    o8[(((size_t)n * p->out_h + oy) * p->out_w + ox) * oc + o] = (int8_t)v;
                }
}

#endif  /* SYQ_ARM_INT8_REF_H_ */
