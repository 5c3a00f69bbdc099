/* Cortex-M path of syq_conv2d_opt / syq_fully_connected_opt: Armv7E-M (Cortex-M4/M7) and
 * Armv8-M Mainline with the DSP extension (Cortex-M33/M35P/M55), 32-bit Arm cores with SIMD32.
 * Chosen at compile time (__ARM_FEATURE_DSP; a microcontroller has no run-time CPU discovery),
 * syq_simd_level() reports 5.  Same packing format, same arithmetic as the reference kernel.
 *
 * The image is copied once (scratch, as the portable path) as u = x + 128 (uint8) with the padding
 * at the zero point and the channels past in_c at 0.  For a code c in {-1, 0, +1} with sign bit S
 * and non-zero bit Z (0x00/0xFF bytes), the byte (u AND Z) XOR S is u (c = +1), 255 - u (c = -1)
 * or 0 (c = 0); USADA8 (sum of absolute differences against 0, accumulated) adds four such bytes
 * into a 32-bit sum in one instruction:
 *   raw = sum_i c_i u_i + 255 n_neg,  sum_i c_i (x_i - zp) = raw - 255 n_neg - (zp + 128) sum_i c_i.
 * The correction depends on the weights only (popcounts, once per call and output channel).
 * Masks of 8 channels come from one byte of a code word through a 256-entry table (2 KB of flash,
 * one LDRD), shared by a block of up to 4 output positions: per 8 channels and position one LDRD of
 * u, two EOR (ternary: two AND more), two USADA8.  Binary layers skip the AND (Z = all ones).
 * No multiply per weight; one multiply per group m_g.  Requantization: syq_cm_requant (TFLite's
 * arithmetic, one SMULL). */
#include "syq_internal.h"

#if SYQ_HAVE_CM_DSP
#include <arm_acle.h>

#define SYQ_CNP 4 /* output positions per block */
#define SYQ_CINLINE static inline __attribute__((always_inline))

/* byte b -> 8 bytes, byte k = 0xFF if bit k of b is set (little-endian: low word = bits 0..3) */
#define SYQ_M1(b, k) ((((uint32_t)(b) >> (k)) & 1u) * (0xFFu << (8 * ((k) & 3))))
#define SYQ_LO(b) (SYQ_M1(b, 0) | SYQ_M1(b, 1) | SYQ_M1(b, 2) | SYQ_M1(b, 3))
#define SYQ_HI(b) (SYQ_M1(b, 4) | SYQ_M1(b, 5) | SYQ_M1(b, 6) | SYQ_M1(b, 7))
#define SYQ_E(b) {SYQ_LO(b), SYQ_HI(b)}
#define SYQ_E4(b) SYQ_E(b), SYQ_E((b) + 1), SYQ_E((b) + 2), SYQ_E((b) + 3)
#define SYQ_E16(b) SYQ_E4(b), SYQ_E4((b) + 4), SYQ_E4((b) + 8), SYQ_E4((b) + 12)
#define SYQ_E64(b) SYQ_E16(b), SYQ_E16((b) + 16), SYQ_E16((b) + 32), SYQ_E16((b) + 48)
static const uint32_t syq_mask8[256][2] = {SYQ_E64(0), SYQ_E64(64), SYQ_E64(128), SYQ_E64(192)};

typedef struct {
    const syq_conv_params *p;
    const syq_packed_weights *w;
    size_t nw, ip, wp, hp;
    uint8_t *u;
    int32_t *corr;
} syq_cctx;

static void syq_cm_pad(const syq_cctx *c, const int8_t *img) {
    const syq_conv_params *p = c->p;
    const int32_t in_c = c->w->in_c;
    const uint8_t pad = (uint8_t)(p->input_zero_point + 128);
    size_t py, px;
    int32_t ch;
    for (py = 0; py < c->hp; ++py) {
        const int32_t iy = (int32_t)py - p->pad_top;
        for (px = 0; px < c->wp; ++px) {
            const int32_t ix = (int32_t)px - p->pad_left;
            uint8_t *dst = c->u + (py * c->wp + px) * c->ip;
            if (iy >= 0 && iy < p->in_h && ix >= 0 && ix < p->in_w) {
                const int8_t *src = img + ((size_t)iy * p->in_w + ix) * in_c;
                for (ch = 0; ch < in_c; ++ch) dst[ch] = (uint8_t)((int32_t)src[ch] + 128);
            } else {
                for (ch = 0; ch < in_c; ++ch) dst[ch] = pad;
            }
            for (ch = in_c; ch < (int32_t)c->ip; ++ch) dst[ch] = 0;
        }
    }
}

/* corr[o] = sum_pix m (255 n_neg + (zp + 128)(n_nonzero - 2 n_neg)) - bias[o], modulo 2^32 */
static void syq_cm_corr(const syq_cctx *c) {
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w, zc = c->p->input_zero_point + 128;
    const size_t pw = c->nw * (size_t)w->bits;
    int32_t o, pix;
    size_t j;
    for (o = 0; o < w->out_c; ++o) {
        uint32_t total = 0;
        for (pix = 0; pix < kk; ++pix) {
            const uint32_t *sg = w->codes + ((size_t)o * kk + pix) * pw;
            int32_t nneg = 0, nnz = w->bits == 2 ? 0 : w->in_c;
            for (j = 0; j < c->nw; ++j) {
                nneg += syq_popcount32(sg[j]);
                if (w->bits == 2) nnz += syq_popcount32(sg[c->nw + j]);
            }
            total += (uint32_t)w->mag[syq_mag_index(w, o, pix)] * (uint32_t)(255 * nneg + zc * (nnz - 2 * nneg));
        }
        c->corr[o] = (int32_t)(total - (uint32_t)(c->p->bias ? c->p->bias[o] : 0));
    }
}

/* 8 channels of one position: acc += the byte sums of (u AND Z) XOR S (binary: u XOR S) */
#define SYQ_CM_STEP(acc, ptr)                                                                      \
    do {                                                                                           \
        const uint32_t *u_ = (const uint32_t *)(const void *)(ptr);                                \
        const uint32_t u0_ = u_[0], u1_ = u_[1];                                                   \
        acc = __usada8(tern ? ((u0_ & z0) ^ s0) : (u0_ ^ s0), 0u, acc);                           \
        acc = __usada8(tern ? ((u1_ & z1) ^ s1) : (u1_ ^ s1), 0u, acc);                           \
    } while (0)

/* raw window sums (times m_pix at pixel granularity) of output channel o, NP (1 or 4) positions
 * sw bytes apart from base; accumulators in named variables (registers, not an array) */
SYQ_CINLINE void syq_cm_block(const syq_cctx *c, const uint8_t *base, size_t sw, int32_t o, uint32_t *res,
                              const int NP, const int tern) {
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w, pixel = w->granularity == SYQ_GRAN_PIXEL;
    const size_t nw = c->nw, pw = nw * (size_t)w->bits;
    const uint32_t *sg = w->codes + (size_t)o * (size_t)kk * pw;
    const uint8_t *row = base;
    uint32_t t0 = 0, t1 = 0, t2 = 0, t3 = 0, a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    int32_t pix, kx = 0;
    size_t j;
    for (pix = 0; pix < kk; ++pix, sg += pw) {
        const uint8_t *xb = row + (size_t)kx * c->ip;
        if (++kx == w->k_w) { kx = 0; row += c->wp * c->ip; }
        for (j = 0; j < nw; ++j) {
            uint32_t s = sg[j], z = tern ? sg[nw + j] : 0u;
            const uint8_t *xe = xb + 32u;
            for (; xb < xe; xb += 8, s >>= 8, z >>= 8) {
                const uint32_t *ms = syq_mask8[s & 0xFFu];
                const uint32_t s0 = ms[0], s1 = ms[1];
                uint32_t z0 = 0xFFFFFFFFu, z1 = 0xFFFFFFFFu;
                if (tern) {
                    const uint32_t *mz = syq_mask8[z & 0xFFu];
                    z0 = mz[0];
                    z1 = mz[1];
                }
                SYQ_CM_STEP(a0, xb);
                if (NP > 1) {
                    SYQ_CM_STEP(a1, xb + sw);
                    SYQ_CM_STEP(a2, xb + 2 * sw);
                    SYQ_CM_STEP(a3, xb + 3 * sw);
                }
            }
        }
        if (pixel) {
            const uint32_t m = w->mag[syq_mag_index(w, o, pix)];
            t0 += m * a0; t1 += m * a1; t2 += m * a2; t3 += m * a3;
            a0 = a1 = a2 = a3 = 0;
        }
    }
    res[0] = pixel ? t0 : a0;
    if (NP > 1) {
        res[1] = pixel ? t1 : a1;
        res[2] = pixel ? t2 : a2;
        res[3] = pixel ? t3 : a3;
    }
}

/* syq_requantize, exactly, with a short path for multiplier >= 0 and -31 <= shift <= 0 (what
 * TFLite's QuantizeMultiplier gives for output scales < 1): SaturatingRoundingDoublingHighMul (no
 * saturation possible with multiplier >= 0) as one SMULL and a truncating shift, then
 * RoundingDivideByPOT.  Other shifts take the generic code. */
SYQ_CINLINE int8_t syq_cm_requant(const syq_conv_params *p, int32_t o, int32_t acc) {
    const int32_t mult = p->out_multiplier[o], shift = p->out_shift[o];
    int64_t ab;
    int32_t x, e, v;
    uint32_t mask;
    if (mult < 0 || shift > 0 || shift < -31) return syq_requantize(p, o, acc);
    ab = (int64_t)acc * mult;
    ab += ab >= 0 ? ((int64_t)1 << 30) : (1 - ((int64_t)1 << 30));
    if (ab < 0) ab += 0x7FFFFFFF; /* division by 2^31 truncating toward zero */
    x = (int32_t)(ab >> 31);      /* arithmetic shift (GCC / Clang) */
    e = -shift;
    mask = (uint32_t)(((uint64_t)1 << e) - 1u);
    v = (x >> e) + (((int32_t)((uint32_t)x & mask) > (int32_t)(mask >> 1) + (x < 0)) ? 1 : 0);
    v += p->output_zero_point;
    return (int8_t)(v < p->act_min ? p->act_min : (v > p->act_max ? p->act_max : v));
}

typedef void (*syq_cm_fn)(const syq_cctx *, const uint8_t *, size_t, int32_t, uint32_t *);
static void syq_cm_bin4(const syq_cctx *c, const uint8_t *b, size_t sw, int32_t o, uint32_t *r) {
    syq_cm_block(c, b, sw, o, r, 4, 0);
}
static void syq_cm_bin1(const syq_cctx *c, const uint8_t *b, size_t sw, int32_t o, uint32_t *r) {
    syq_cm_block(c, b, sw, o, r, 1, 0);
}
static void syq_cm_tern4(const syq_cctx *c, const uint8_t *b, size_t sw, int32_t o, uint32_t *r) {
    syq_cm_block(c, b, sw, o, r, 4, 1);
}
static void syq_cm_tern1(const syq_cctx *c, const uint8_t *b, size_t sw, int32_t o, uint32_t *r) {
    syq_cm_block(c, b, sw, o, r, 1, 1);
}

/* Arguments and scratch checked by syq_conv2d_opt (same scratch layout as the portable path). */
int syq_conv2d_cm(const syq_conv_params *p, const syq_packed_weights *w, const int8_t *input,
                  int8_t *output, void *scratch) {
    syq_cctx c;
    uint8_t *base = (uint8_t *)scratch;
    const int pixel = w->granularity == SYQ_GRAN_PIXEL, tern = w->bits == 2;
    const syq_cm_fn blk4 = tern ? syq_cm_tern4 : syq_cm_bin4, blk1 = tern ? syq_cm_tern1 : syq_cm_bin1;
    size_t oy, ox, sw;
    int32_t n, o, q;
    c.p = p;
    c.w = w;
    c.nw = syq_words_per_pixel(w->in_c);
    c.ip = c.nw * 32u;
    c.hp = (size_t)(p->out_h - 1) * (size_t)p->stride_h + (size_t)w->k_h;
    c.wp = (size_t)(p->out_w - 1) * (size_t)p->stride_w + (size_t)w->k_w;
    base += (64u - (size_t)((uintptr_t)base & 63u)) & 63u;
    c.u = base;
    c.corr = (int32_t *)(void *)(base + SYQ_ALIGN64(c.hp * c.wp * c.ip));
    sw = (size_t)p->stride_w * c.ip;
    syq_cm_corr(&c);
    for (n = 0; n < p->batch; ++n) {
        int8_t *img_out = output + (size_t)n * p->out_h * p->out_w * w->out_c;
        syq_cm_pad(&c, input + (size_t)n * p->in_h * p->in_w * w->in_c);
        for (oy = 0; oy < (size_t)p->out_h; ++oy) {
            const uint8_t *rowp = c.u + oy * (size_t)p->stride_h * c.wp * c.ip;
            int8_t *out = img_out + oy * (size_t)p->out_w * w->out_c;
            for (ox = 0; ox < (size_t)p->out_w;) {
                const int np = (size_t)p->out_w - ox >= SYQ_CNP ? SYQ_CNP : 1;
                for (o = 0; o < w->out_c; ++o) {
                    const uint32_t m = pixel ? 1u : (uint32_t)w->mag[syq_mag_index(w, o, 0)];
                    uint32_t r[SYQ_CNP];
                    if (np == SYQ_CNP) blk4(&c, rowp + ox * sw, sw, o, r);
                    else blk1(&c, rowp + ox * sw, sw, o, r);
                    for (q = 0; q < np; ++q)
                        out[(ox + (size_t)q) * (size_t)w->out_c + (size_t)o] =
                            syq_cm_requant(p, o, (int32_t)(m * r[q] - (uint32_t)c.corr[o]));
                }
                ox += (size_t)np;
            }
        }
    }
    return SYQ_OK;
}
#else
typedef int syq_cm_unused; /* ISO C: no empty translation unit */
#endif
