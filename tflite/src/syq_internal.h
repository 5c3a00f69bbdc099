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

/* AArch64 NEON / SDOT path (syq_neon.c): level 3 NEON, 4 NEON + dot product; chosen at run time. */
#if !defined(SYQ_NO_SIMD) && defined(__aarch64__) && defined(__ARM_NEON) && \
    (defined(__GNUC__) || defined(__clang__))
#define SYQ_HAVE_NEON 1
int syq_neon_level(void);
int syq_conv2d_neon(const syq_conv_params *p, const syq_packed_weights *w, const int8_t *input,
                    int8_t *output, void *scratch, int level);
#else
#define SYQ_HAVE_NEON 0
#endif

/* Cortex-M / 32-bit Arm with the DSP (SIMD32) extension (syq_cm.c): level 5, with Helium (MVE)
 * level 6; compile time. */
#if !defined(SYQ_NO_SIMD) && defined(__arm__) && defined(__ARM_FEATURE_DSP) && \
    (defined(__GNUC__) || defined(__clang__))
#define SYQ_HAVE_CM_DSP 1
int syq_cm_level(void);
int syq_conv2d_cm(const syq_conv_params *p, const syq_packed_weights *w, const int8_t *input,
                  int8_t *output, void *scratch);
#else
#define SYQ_HAVE_CM_DSP 0
#endif

int syq_check_args(const syq_conv_params *p, const syq_packed_weights *w, const void *input,
                   const void *output);

#endif
