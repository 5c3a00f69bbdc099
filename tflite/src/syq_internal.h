/* Internal helpers shared by the syq_kernels sources (not part of the public API). */
#ifndef SYQ_INTERNAL_H
#define SYQ_INTERNAL_H

#include "syq_kernels.h"

static inline int32_t syq_clamp_i32(int32_t v, int32_t lo, int32_t hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

/* popcount, portable (no libgcc helper); used once per packed word per call, not per MAC. */
static inline int32_t syq_popcount32(uint32_t v) {
    v = v - ((v >> 1) & 0x55555555u);
    v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
    v = (v + (v >> 4)) & 0x0F0F0F0Fu;
    v = v + (v >> 8);
    v = v + (v >> 16);
    return (int32_t)(v & 0x3Fu);
}

static inline int32_t syq_mag_index(const syq_packed_weights *w, int32_t o, int32_t pix) {
    if (w->granularity == SYQ_GRAN_LAYER) return 0;
    if (w->granularity == SYQ_GRAN_CHANNEL) return o;
    return o * w->k_h * w->k_w + pix;
}

/* acc (bias included) -> int8 output, exactly as TFLite's reference int8 kernels. */
static inline int8_t syq_requantize(const syq_conv_params *p, int32_t o, int32_t acc) {
    /* + zero point in 64 bits: a requantized value near INT32_MAX (a crafted bias) cannot overflow */
    const int64_t v = (int64_t)syq_multiply_by_quantized_multiplier(acc, p->out_multiplier[o], p->out_shift[o]) +
                      p->output_zero_point;
    return (int8_t)(v < p->act_min ? p->act_min : (v > p->act_max ? p->act_max : v));
}

int syq_check_args(const syq_conv_params *p, const syq_packed_weights *w, const void *input,
                   const void *output);

#endif
