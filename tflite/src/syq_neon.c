/* AArch64 NEON path of syq_conv2d_opt / syq_fully_connected_opt (phones, ARM servers).
 *
 * Chosen at run time by syq_simd_level() (syq_opt.c): level 3 = NEON (ASIMD, every AArch64 CPU),
 * level 4 = NEON + the ARMv8.2 dot product (SDOT), reported by Linux in AT_HWCAP (HWCAP_ASIMDDP).
 * Same packing format, same arithmetic as the reference kernel:
 *
 *   The image is copied once (scratch) as signed x with the rows/columns of padding set to the input
 *   zero point (so x - zp = 0 there) and the channels past in_c (up to the next multiple of 32) set
 *   to 0.  The codes of one output channel are expanded once per image into int8 {-1, 0, +1}
 *   (c = (S | 1) & Z from the sign and non-zero bit planes; binary: c = S | 1; scratch,
 *   k_h * k_w * 32 * nw bytes) and reused by every output position:
 *     SDOT:  4 x 32-bit lanes += 4 products c_i * x_i each, 16 channels per instruction;
 *     NEON:  SMLAL/SMLAL2 into 16-bit lanes (|c x| <= 128, flushed into 32 bits with SADALP at
 *            most every 64 chunks of 16 channels: 64 * 2 * 128 <= 32767).
 *   Four output positions per block share each code vector.  Then
 *     sum_i c_i (x_i - zp) = sum_i c_i x_i - zp * sum_i c_i,
 *   the second term (times m_g, minus the bias) depends on the weights only: one pass over the
 *   codes' popcounts per call and output channel (corr).  No multiply by a weight value: products
 *   with c in {-1, 0, +1}, one multiply per group m_g (pixel granularity: per kernel position, on
 *   the 32-bit lanes).  Sums wrap modulo 2^32 like TFLite's int32 accumulator never needs to.
 *   Requantization: syq_requantize (the scalar TFLite arithmetic), once per output. */
#include "syq_internal.h"

#if SYQ_HAVE_NEON
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#endif

#if defined(__clang__)
#define SYQ_DOT __attribute__((target("dotprod")))
#else
#define SYQ_DOT __attribute__((target("arch=armv8.2-a+dotprod")))
#endif
#define SYQ_INLINE static inline __attribute__((always_inline))
#define SYQ_NNP 4 /* output positions per block */

int syq_neon_level(void) {
    static int level = -1;
    if (level < 0) {
        int lv = 3; /* ASIMD is architectural on AArch64 */
#if defined(__ARM_FEATURE_DOTPROD)
        lv = 4; /* built for a dot-product CPU */
#elif defined(__linux__)
        const unsigned long hw = getauxval(AT_HWCAP);
        if (!(hw & HWCAP_ASIMD)) lv = 0;
        else if (hw & HWCAP_ASIMDDP) lv = 4;
#endif
        level = lv;
    }
    return level;
}

typedef struct {
    const syq_conv_params *p;
    const syq_packed_weights *w;
    size_t nw, ip, wp, hp; /* words per pixel/plane, padded channel stride, padded image size */
    int8_t *x;             /* padded signed image */
    int32_t *corr;         /* per output channel: m * zp * sum c - bias (mod 2^32) */
    int8_t *e;             /* expanded codes of one output channel */
} syq_nctx;

static void syq_neon_pad(const syq_nctx *c, const int8_t *img) {
    const syq_conv_params *p = c->p;
    const int32_t in_c = c->w->in_c;
    const int8_t pad = (int8_t)p->input_zero_point;
    size_t py, px;
    int32_t ch;
    for (py = 0; py < c->hp; ++py) {
        const int32_t iy = (int32_t)py - p->pad_top;
        for (px = 0; px < c->wp; ++px) {
            const int32_t ix = (int32_t)px - p->pad_left;
            int8_t *dst = c->x + (py * c->wp + px) * c->ip;
            if (iy >= 0 && iy < p->in_h && ix >= 0 && ix < p->in_w) {
                const int8_t *src = img + ((size_t)iy * p->in_w + ix) * in_c;
                for (ch = 0; ch < in_c; ++ch) dst[ch] = src[ch];
            } else {
                for (ch = 0; ch < in_c; ++ch) dst[ch] = pad;
            }
            for (ch = in_c; ch < (int32_t)c->ip; ++ch) dst[ch] = 0;
        }
    }
}

static void syq_neon_corr(const syq_nctx *c) {
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w, zp = c->p->input_zero_point;
    const size_t pw = c->nw * (size_t)w->bits;
    int32_t o, pix;
    size_t j;
    for (o = 0; o < w->out_c; ++o) {
        uint32_t total = 0;
        for (pix = 0; pix < kk; ++pix) {
            const uint32_t *sg = w->codes + ((size_t)o * kk + pix) * pw;
            int32_t nneg = 0, nnz = w->in_c;
            if (w->bits == 2) nnz = 0;
            for (j = 0; j < c->nw; ++j) {
                nneg += syq_popcount32(sg[j]);
                if (w->bits == 2) nnz += syq_popcount32(sg[c->nw + j]);
            }
            total += (uint32_t)w->mag[syq_mag_index(w, o, pix)] * (uint32_t)zp * (uint32_t)(nnz - 2 * nneg);
        }
        c->corr[o] = (int32_t)(total - (uint32_t)(c->p->bias ? c->p->bias[o] : 0));
    }
}

/* 16 bits -> 16 bytes 0x00 / 0xFF */
SYQ_INLINE int8x16_t syq_bits16(uint32_t b) {
    static const uint8_t sel[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t v = vcombine_u8(vdup_n_u8((uint8_t)(b & 0xFFu)), vdup_n_u8((uint8_t)((b >> 8) & 0xFFu)));
    return vreinterpretq_s8_u8(vtstq_u8(v, vld1q_u8(sel)));
}

/* codes of output channel o -> k_h * k_w * nw * 32 int8 codes in c->e */
static void syq_neon_expand(const syq_nctx *c, int32_t o) {
    const syq_packed_weights *w = c->w;
    const size_t n = (size_t)w->k_h * (size_t)w->k_w, nw = c->nw, pw = nw * (size_t)w->bits;
    const uint32_t *sg = w->codes + (size_t)o * n * pw;
    const int8x16_t one = vdupq_n_s8(1);
    int8_t *e = c->e;
    size_t pix, j;
    int h;
    for (pix = 0; pix < n; ++pix, sg += pw)
        for (j = 0; j < nw; ++j)
            for (h = 0; h < 2; ++h, e += 16) {
                int8x16_t v = vorrq_s8(syq_bits16(sg[j] >> (16 * h)), one);
                if (w->bits == 2) v = vandq_s8(v, syq_bits16(sg[nw + j] >> (16 * h)));
                vst1q_s8(e, v);
            }
}

/* Window sums sum_pix m_pix * sum_i c_i x_i (pixel granularity) or sum_i c_i x_i (otherwise) of
 * output channel o at NP positions sw bytes apart starting at base; res[q] modulo 2^32. */
SYQ_INLINE SYQ_DOT void syq_block_dot(const syq_nctx *c, const int8_t *base, size_t sw, int32_t o,
                                      int32_t *res, const int NP) {
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w, pixel = w->granularity == SYQ_GRAN_PIXEL;
    const size_t nch = c->ip / 16u;
    const int8_t *e = c->e, *row = base;
    int32x4_t tot[SYQ_NNP], acc[SYQ_NNP];
    int32_t pix, kx = 0, q;
    size_t k;
    for (q = 0; q < NP; ++q) tot[q] = acc[q] = vdupq_n_s32(0);
    for (pix = 0; pix < kk; ++pix) {
        const int8_t *xb = row + (size_t)kx * c->ip;
        if (++kx == w->k_w) { kx = 0; row += c->wp * c->ip; }
        for (k = 0; k < nch; ++k, e += 16) {
            const int8x16_t cv = vld1q_s8(e);
            for (q = 0; q < NP; ++q) acc[q] = vdotq_s32(acc[q], vld1q_s8(xb + (size_t)q * sw + 16u * k), cv);
        }
        if (pixel) {
            const int32_t m = (int32_t)w->mag[syq_mag_index(w, o, pix)];
            for (q = 0; q < NP; ++q) { tot[q] = vmlaq_n_s32(tot[q], acc[q], m); acc[q] = vdupq_n_s32(0); }
        }
    }
    for (q = 0; q < NP; ++q) res[q] = vaddvq_s32(pixel ? tot[q] : acc[q]);
}

SYQ_INLINE void syq_block_neon(const syq_nctx *c, const int8_t *base, size_t sw, int32_t o, int32_t *res,
                               const int NP) {
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w, pixel = w->granularity == SYQ_GRAN_PIXEL;
    const size_t nch = c->ip / 16u;
    const int8_t *e = c->e, *row = base;
    int32x4_t tot[SYQ_NNP], acc[SYQ_NNP];
    int16x8_t a16[SYQ_NNP];
    int32_t pix, kx = 0, q;
    size_t k, k0;
    for (q = 0; q < NP; ++q) { tot[q] = acc[q] = vdupq_n_s32(0); a16[q] = vdupq_n_s16(0); }
    for (pix = 0; pix < kk; ++pix) {
        const int8_t *xb = row + (size_t)kx * c->ip;
        if (++kx == w->k_w) { kx = 0; row += c->wp * c->ip; }
        for (k0 = 0; k0 < nch; k0 += 64) { /* 64 chunks: |16-bit lane| <= 64 * 2 * 128 */
            const size_t k1 = k0 + 64 < nch ? k0 + 64 : nch;
            for (k = k0; k < k1; ++k, e += 16) {
                const int8x16_t cv = vld1q_s8(e);
                const int8x8_t cl = vget_low_s8(cv);
                for (q = 0; q < NP; ++q) {
                    const int8x16_t xv = vld1q_s8(xb + (size_t)q * sw + 16u * k);
                    a16[q] = vmlal_high_s8(vmlal_s8(a16[q], vget_low_s8(xv), cl), xv, cv);
                }
            }
            for (q = 0; q < NP; ++q) { acc[q] = vpadalq_s16(acc[q], a16[q]); a16[q] = vdupq_n_s16(0); }
        }
        if (pixel) {
            const int32_t m = (int32_t)w->mag[syq_mag_index(w, o, pix)];
            for (q = 0; q < NP; ++q) { tot[q] = vmlaq_n_s32(tot[q], acc[q], m); acc[q] = vdupq_n_s32(0); }
        }
    }
    for (q = 0; q < NP; ++q) res[q] = vaddvq_s32(pixel ? tot[q] : acc[q]);
}

static SYQ_DOT void syq_block_dot4(const syq_nctx *c, const int8_t *b, size_t sw, int32_t o, int32_t *r) {
    syq_block_dot(c, b, sw, o, r, 4);
}
static SYQ_DOT void syq_block_dot1(const syq_nctx *c, const int8_t *b, size_t sw, int32_t o, int32_t *r) {
    syq_block_dot(c, b, sw, o, r, 1);
}
static void syq_block_neon4(const syq_nctx *c, const int8_t *b, size_t sw, int32_t o, int32_t *r) {
    syq_block_neon(c, b, sw, o, r, 4);
}
static void syq_block_neon1(const syq_nctx *c, const int8_t *b, size_t sw, int32_t o, int32_t *r) {
    syq_block_neon(c, b, sw, o, r, 1);
}

/* Arguments checked and scratch size verified by syq_conv2d_opt (same layout: 64-byte aligned
 * padded image, out_c int32, k_h * k_w * 32 * nw bytes of expanded codes). */
int syq_conv2d_neon(const syq_conv_params *p, const syq_packed_weights *w, const int8_t *input,
                    int8_t *output, void *scratch, int level) {
    syq_nctx c;
    uint8_t *base = (uint8_t *)scratch;
    const int pixel = w->granularity == SYQ_GRAN_PIXEL;
    void (*blk4)(const syq_nctx *, const int8_t *, size_t, int32_t, int32_t *) =
        level >= 4 ? syq_block_dot4 : syq_block_neon4;
    void (*blk1)(const syq_nctx *, const int8_t *, size_t, int32_t, int32_t *) =
        level >= 4 ? syq_block_dot1 : syq_block_neon1;
    size_t oy, ox, sw;
    int32_t n, o, q;
    c.p = p;
    c.w = w;
    c.nw = syq_words_per_pixel(w->in_c);
    c.ip = c.nw * 32u;
    c.hp = (size_t)(p->out_h - 1) * (size_t)p->stride_h + (size_t)w->k_h;
    c.wp = (size_t)(p->out_w - 1) * (size_t)p->stride_w + (size_t)w->k_w;
    base += (64u - (size_t)((uintptr_t)base & 63u)) & 63u;
    c.x = (int8_t *)base;
    c.corr = (int32_t *)(void *)(base + SYQ_ALIGN64(c.hp * c.wp * c.ip));
    c.e = (int8_t *)c.corr + SYQ_ALIGN64((size_t)w->out_c * sizeof(int32_t));
    sw = (size_t)p->stride_w * c.ip;
    syq_neon_corr(&c);
    for (n = 0; n < p->batch; ++n) {
        int8_t *img_out = output + (size_t)n * p->out_h * p->out_w * w->out_c;
        syq_neon_pad(&c, input + (size_t)n * p->in_h * p->in_w * w->in_c);
        for (o = 0; o < w->out_c; ++o) {
            const uint32_t m = pixel ? 1u : (uint32_t)w->mag[syq_mag_index(w, o, 0)];
            syq_neon_expand(&c, o);
            for (oy = 0; oy < (size_t)p->out_h; ++oy) {
                const int8_t *rowp = c.x + oy * (size_t)p->stride_h * c.wp * c.ip;
                int8_t *out = img_out + oy * (size_t)p->out_w * w->out_c + o;
                for (ox = 0; ox < (size_t)p->out_w;) {
                    int32_t r[SYQ_NNP];
                    const int np = (size_t)p->out_w - ox >= SYQ_NNP ? SYQ_NNP : 1;
                    if (np == SYQ_NNP) blk4(&c, rowp + ox * sw, sw, o, r);
                    else blk1(&c, rowp + ox * sw, sw, o, r);
                    for (q = 0; q < np; ++q, ++ox)
                        out[ox * (size_t)w->out_c] = syq_requantize(p, o, (int32_t)(m * (uint32_t)r[q] - (uint32_t)c.corr[o]));
                }
            }
        }
    }
    return SYQ_OK;
}
#else
typedef int syq_neon_unused; /* ISO C: no empty translation unit */
#endif
