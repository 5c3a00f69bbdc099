/*
 * syq_kernels: packed binary / ternary weight kernels with int8 activations (C99, libc-free).
 *
 * Semantics are those of TFLite's int8 reference kernels (per-channel Conv2D, FullyConnected):
 *
 *   acc[o]  = bias[o] + sum_{ky,kx,i} w_int8[o,ky,kx,i] * (x[iy,ix,i] - input_zero_point)
 *   out[o]  = clamp(MultiplyByQuantizedMultiplier(acc[o], mult[o], shift[o]) + output_zero_point,
 *                   act_min, act_max)
 *
 * with the weights of a binary/ternary codebook written as w_int8 = m_g * code, code in {-1,+1}
 * (1 bit) or {-1,0,+1} (2 bits) and m_g in 0..127 one small integer per group g:
 *   SYQ_GRAN_LAYER   one m for the whole layer
 *   SYQ_GRAN_CHANNEL one m per output channel                      (index o)
 *   SYQ_GRAN_PIXEL   one m per output channel and kernel position   (index (o*k_h + ky)*k_w + kx)
 * Kernels add or subtract activations (no multiply per weight) and multiply once per group.
 *
 * Packing (LCE style, along input channels): weights are OHWI; for every (o, ky, kx) the in_c
 * codes are packed into nw = ceil(in_c / 32) uint32 words, bit (i % 32) of word (i / 32) holding
 * channel i.  Binary: one plane, bit set = code -1 (sign bit), clear = +1.  Ternary: two planes
 * stored one after the other per (o, ky, kx): first the sign plane (bit set = code -1), then the
 * non-zero plane (bit set = code != 0).  Unused bits of the last word are zero.
 * Words per layer: out_c * k_h * k_w * nw * bits  (1/8 or 1/4 of the int8 bytes, plus tail bits).
 *
 * No function allocates memory.  The optimized path needs a caller-provided scratch buffer
 * (syq_conv2d_scratch_bytes); the reference path needs none.
 */
#ifndef SYQ_KERNELS_H
#define SYQ_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SYQ_OK 0
#define SYQ_ERR_ARG (-1)     /* bad shape / parameter / NULL pointer */
#define SYQ_ERR_CODE (-2)    /* a code outside the codebook (pack) or bits/plane mismatch */
#define SYQ_ERR_SCRATCH (-3) /* scratch buffer too small */

enum { SYQ_GRAN_LAYER = 0, SYQ_GRAN_CHANNEL = 1, SYQ_GRAN_PIXEL = 2 };

typedef struct {
    int32_t bits;        /* 1: binary {-1,+1}; 2: ternary {-1,0,+1} */
    int32_t granularity; /* SYQ_GRAN_* : how mag is indexed */
    int32_t out_c, k_h, k_w, in_c;
    const uint32_t *codes; /* packed codes, syq_packed_words() words */
    const uint8_t *mag;    /* m_g: 1, out_c or out_c*k_h*k_w entries, each <= 127 */
} syq_packed_weights;

typedef struct {
    int32_t batch, in_h, in_w; /* input NHWC, channels = weights.in_c */
    int32_t out_h, out_w;      /* output NHWC, channels = weights.out_c */
    int32_t stride_h, stride_w;
    int32_t pad_top, pad_left; /* TFLite padding (SAME: ((out-1)*stride + k - in) / 2, VALID: 0) */
    int32_t input_zero_point;  /* -128..127 */
    int32_t output_zero_point; /* -128..127 */
    int32_t act_min, act_max;  /* int8 clamp (e.g. -128, 127; ReLU: zero point, 127) */
    const int32_t *bias;            /* out_c entries or NULL */
    const int32_t *out_multiplier;  /* out_c entries (TFLite per-channel quantized multiplier) */
    const int32_t *out_shift;       /* out_c entries (TFLite shift: > 0 left, < 0 right) */
} syq_conv_params;

/* Compile-time scratch size for syq_conv2d_opt (firmware: size a static buffer with it).
 * Equals syq_conv2d_scratch_bytes() for the same layer. */
#define SYQ_ALIGN64(v) ((((size_t)(v)) + 63u) & ~(size_t)63u)
#define SYQ_CONV2D_SCRATCH_BYTES(out_h, out_w, stride_h, stride_w, k_h, k_w, in_c, out_c)        \
    (64u + SYQ_ALIGN64((((size_t)(out_h) - 1u) * (size_t)(stride_h) + (size_t)(k_h)) *              \
                       (((size_t)(out_w) - 1u) * (size_t)(stride_w) + (size_t)(k_w)) *              \
                       ((((size_t)(in_c) + 31u) / 32u) * 32u)) +                                     \
     SYQ_ALIGN64((size_t)(out_c) * 4u) +                                                         \
     SYQ_ALIGN64((size_t)(k_h) * (size_t)(k_w) * ((((size_t)(in_c) + 31u) / 32u) * 32u)))
/* FullyConnected over `batch` rows: the same buffer as a 1x1 conv over a 1 x batch image. */
#define SYQ_FC_SCRATCH_BYTES(batch, in_c, out_c) SYQ_CONV2D_SCRATCH_BYTES(1, batch, 1, 1, 1, 1, in_c, out_c)

/* ---- packing ------------------------------------------------------------------------------- */
size_t syq_words_per_pixel(int32_t in_c);
size_t syq_packed_words(int32_t bits, int32_t out_c, int32_t k_h, int32_t k_w, int32_t in_c);
/* codes: OHWI int8 in {-1,+1} (bits 1) or {-1,0,+1} (bits 2); out: syq_packed_words() words. */
int syq_pack(const int8_t *codes, int32_t bits, int32_t out_c, int32_t k_h, int32_t k_w,
             int32_t in_c, uint32_t *out);
int syq_unpack(const uint32_t *packed, int32_t bits, int32_t out_c, int32_t k_h, int32_t k_w,
               int32_t in_c, int8_t *codes);
size_t syq_mag_count(int32_t granularity, int32_t out_c, int32_t k_h, int32_t k_w);

/* ---- requantization (TFLite semantics, no libm) -------------------------------------------- */
/* QuantizeMultiplier: real -> (multiplier in [2^30, 2^31), shift), as TFLite derives it. */
void syq_quantize_multiplier(double real_multiplier, int32_t *multiplier, int32_t *shift);
/* MultiplyByQuantizedMultiplier (gemmlowp double rounding, TFLite's default build). */
int32_t syq_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int32_t shift);

/* ---- kernels ------------------------------------------------------------------------------- */
/* Reference: direct loops, bounds checks for padding, one add/subtract per weight. */
int syq_conv2d_ref(const syq_conv_params *p, const syq_packed_weights *w, const int8_t *input,
                   int8_t *output);
/* Optimized: zero-point padded copy of each image in scratch, output blocking; AVX2 (when the CPU
 * has it and SYQ_NO_SIMD is not defined): codes expanded per output channel into scratch and
 * vpmaddubsw/vpmaddwd sums, or (narrow outputs, e.g. FullyConnected batch < 4) codes expanded in
 * registers, 8 output channels per pass for 1x1 kernels; 64-bit SWAR otherwise.
 * Scratch: padded image + out_c int32 + k_h*k_w*32*ceil(in_c/32) bytes (+64 for alignment). */
size_t syq_conv2d_scratch_bytes(const syq_conv_params *p, const syq_packed_weights *w);
int syq_conv2d_opt(const syq_conv_params *p, const syq_packed_weights *w, const int8_t *input,
                   int8_t *output, void *scratch, size_t scratch_bytes);

/* FullyConnected: input [batch, in_c], output [batch, out_c]; w has k_h = k_w = 1.
 * Granularity PIXEL equals CHANNEL here.  Stride/padding/size fields of p other than batch,
 * zero points, activation range, bias and requantization are ignored. */
int syq_fully_connected_ref(const syq_conv_params *p, const syq_packed_weights *w,
                            const int8_t *input, int8_t *output);
size_t syq_fully_connected_scratch_bytes(const syq_conv_params *p, const syq_packed_weights *w);
int syq_fully_connected_opt(const syq_conv_params *p, const syq_packed_weights *w,
                            const int8_t *input, int8_t *output, void *scratch,
                            size_t scratch_bytes);

/* What syq_conv2d_opt uses on this CPU: 0 portable C, 2 AVX2 (x86-64), 3 NEON (AArch64),
 * 4 NEON + ARMv8.2 dot product (SDOT; Linux HWCAP_ASIMDDP), 5 Armv7E-M / Armv8-M DSP (SIMD32,
 * Cortex-M4/M7/M33/M55, chosen at compile time by __ARM_FEATURE_DSP), 6 the same with Helium (MVE)
 * convolutions (Cortex-M55/M85, __ARM_FEATURE_MVE). */
int syq_simd_level(void);
/* Force the portable path (1) or allow SIMD again (0); returns the previous setting. */
int syq_force_portable(int force);

#ifdef __cplusplus
}
#endif
#endif /* SYQ_KERNELS_H */
