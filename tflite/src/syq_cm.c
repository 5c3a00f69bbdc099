/* Cortex-M path of syq_conv2d_opt / syq_fully_connected_opt: Armv7E-M (Cortex-M4/M7) and
 * Armv8-M Mainline with the DSP extension (Cortex-M33/M35P/M55), 32-bit Arm cores with SIMD32.
 * Chosen at compile time (__ARM_FEATURE_DSP; a microcontroller has no run-time CPU discovery),
 * syq_simd_level() reports 5 (6 with Helium: convolutions on the MVE path at the end of this file).
 * Same packing format, same arithmetic as the reference kernel.
 *
 * The image is copied once (scratch, as the portable path) as u = x + 128 (uint8) with the padding
 * at the zero point and the channels past in_c at 0.  For a code c in {-1, 0, +1} with sign bit S
 * and non-zero bit Z (0x00/0xFF bytes), |(u AND Z) - S| is u (c = +1), 255 - u (c = -1) or 0
 * (c = 0); USADA8 (sum of absolute byte differences, accumulated) adds four of them into a 32-bit
 * sum in one instruction (binary layers: USADA8(u, S) alone, Z = all ones):
 *   raw = sum_i c_i u_i + 255 n_neg,  sum_i c_i (x_i - zp) = raw - 255 n_neg - (zp + 128) sum_i c_i.
 * The correction depends on the weights only (popcounts, once per call and output channel).
 * Masks of 4 channels come from one nibble of a code word through a 16-entry table (64 bytes of
 * flash; UBFX + LDR), shared by a block of 4 output positions: per 4 channels and position one LDR
 * of u and one USADA8 (ternary: one AND more).  Positions stride_w * 32 * nw bytes apart; stride-1
 * layers with 1-4 words per pixel have specialised copies (immediate load offsets, nw known).
 * No multiply per weight; one multiply per group m_g.  Requantization: syq_cm_requant (TFLite's
 * arithmetic, one SMLAL and shifts: syq_cm_rq).
 *
 * 1x1 kernels (pointwise convolutions, FullyConnected) take their own paths, chosen per layer:
 * rows of >= 4 output pixels share each mask among 4 pixels as above, without the kernel-pixel loop
 * and skipping the nibbles past in_c (syq_conv2d_cm_pw); narrower layers (FullyConnected with a
 * batch < 4), where a mask would serve one pixel only, share the input pixel among all output
 * channels instead: tables of its subset sums, one load per 4 channels and plane, 8 channels for
 * ternary layers with >= 48 output channels (syq_conv2d_cm_tab). */
#include "syq_internal.h"

#if SYQ_HAVE_CM_DSP
#include <arm_acle.h>

#if defined(__ARM_FEATURE_MVE) && (__ARM_FEATURE_MVE & 1)
#define SYQ_HAVE_MVE 1
#else
#define SYQ_HAVE_MVE 0
#endif
#define SYQ_CNP 4 /* output positions per block (rows end with blocks of 2 and 1) */
#define SYQ_CINLINE static inline __attribute__((always_inline))

/* nibble b -> 4 bytes, byte k = 0xFF if bit k of b is set (one LDR with a scaled index) */
#define SYQ_M1(b, k) ((((uint32_t)(b) >> (k)) & 1u) * (0xFFu << (8 * (k))))
#define SYQ_M4(b) (SYQ_M1(b, 0) | SYQ_M1(b, 1) | SYQ_M1(b, 2) | SYQ_M1(b, 3))
static const uint32_t syq_mask4[16] = {SYQ_M4(0), SYQ_M4(1), SYQ_M4(2),  SYQ_M4(3),  SYQ_M4(4),  SYQ_M4(5),
                                       SYQ_M4(6), SYQ_M4(7), SYQ_M4(8),  SYQ_M4(9),  SYQ_M4(10), SYQ_M4(11),
                                       SYQ_M4(12), SYQ_M4(13), SYQ_M4(14), SYQ_M4(15)};

int syq_cm_level(void) { return SYQ_HAVE_MVE ? 6 : 5; }

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

/* per-byte bit counts of v (each 0..8): popcount(v) = USADA8(syq_cm_bytecount(v), 0) */
SYQ_CINLINE uint32_t syq_cm_bytecount(uint32_t v) {
    v = v - ((v >> 1) & 0x55555555u);
    v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
    return (v + (v >> 4)) & 0x0F0F0F0Fu;
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
            uint32_t nneg = 0, nnz = w->bits == 2 ? 0u : (uint32_t)w->in_c;
            for (j = 0; j < c->nw; ++j) {
                nneg = __usada8(syq_cm_bytecount(sg[j]), 0u, nneg);
                if (w->bits == 2) nnz = __usada8(syq_cm_bytecount(sg[c->nw + j]), 0u, nnz);
            }
            total += (uint32_t)w->mag[syq_mag_index(w, o, pix)] *
                     (uint32_t)(255 * (int32_t)nneg + zc * ((int32_t)nnz - 2 * (int32_t)nneg));
        }
        c->corr[o] = (int32_t)(total - (uint32_t)(c->p->bias ? c->p->bias[o] : 0));
    }
}

/* 4 channels of one position: acc += sum |(u AND Z) - S| over the bytes (binary: |u - S|), that
 * is u for code +1, 255 - u for code -1 (S byte 0xFF) and 0 for code 0 (USADA8 against the sign
 * mask: no EOR, no zero register) */
#define SYQ_CM_STEP(acc, ptr)                                                                      \
    do {                                                                                           \
        const uint32_t u_ = *(const uint32_t *)(const void *)(ptr);                                \
        acc = __usada8(tern ? (u_ & zm) : u_, sm, acc);                                            \
    } while (0)

/* channels 4k..4k+3 of the word at xb (codes s, z) for NP positions SW bytes apart */
#define SYQ_CM_NIB(k)                                                                              \
    do {                                                                                           \
        const uint32_t sm = syq_mask4[(s >> (4 * (k))) & 0xFu];                                    \
        const uint32_t zm = tern ? syq_mask4[(z >> (4 * (k))) & 0xFu] : 0xFFFFFFFFu;               \
        SYQ_CM_STEP(a0, xb + 4 * (k));                                                             \
        if (NP > 1) SYQ_CM_STEP(a1, xb + SW + 4 * (k));                                            \
        if (NP > 2) {                                                                              \
            SYQ_CM_STEP(a2, xb + 2 * SW + 4 * (k));                                                \
            SYQ_CM_STEP(a3, xb + 3 * SW + 4 * (k));                                                \
        }                                                                                          \
        (void)zm;                                                                                  \
    } while (0)

/* raw window sums (times m_pix at pixel granularity) of output channel o, NP (1 or 4) positions
 * SW bytes apart from base; accumulators in named variables (registers, not an array).  SW is a
 * compile-time constant in the specialised copies (immediate load offsets, LDRD). */
SYQ_CINLINE void syq_cm_block(const syq_cctx *c, const uint8_t *base, const size_t SW, int32_t o, uint32_t *res,
                              const int NP, const int tern, const int SWK) {
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w, pixel = w->granularity == SYQ_GRAN_PIXEL, k_w = w->k_w;
    const size_t nw = SWK ? SW / 32u : c->nw; /* SWK: stride 1, SW = 32 nw known at compile time */
    const size_t pw = nw * (size_t)w->bits, ip = SWK ? SW : c->ip, row_step = c->wp * ip;
    const uint32_t *sg = w->codes + (size_t)o * (size_t)kk * pw;
    const uint8_t *mg = w->mag + (pixel ? (size_t)o * (size_t)kk : 0u);
    const uint8_t *row = base;
    uint32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    int32_t pix, kx = 0;
    size_t j;
    for (pix = 0; pix < kk; ++pix, sg += pw) {
        const uint8_t *xb = row + (size_t)kx * ip;
        if (++kx == k_w) { kx = 0; row += row_step; }
        for (j = 0; j < nw; ++j, xb += 32) {
            const uint32_t s = sg[j], z = tern ? sg[nw + j] : 0u;
            SYQ_CM_NIB(0);
            SYQ_CM_NIB(1);
            SYQ_CM_NIB(2);
            SYQ_CM_NIB(3);
            SYQ_CM_NIB(4);
            SYQ_CM_NIB(5);
            SYQ_CM_NIB(6);
            SYQ_CM_NIB(7);
        }
        if (pixel) { /* one multiply per group */
            const uint32_t m = mg[pix];
            t0 += m * a0;
            if (NP > 1) t1 += m * a1;
            if (NP > 2) {
                t2 += m * a2;
                t3 += m * a3;
            }
            a0 = a1 = a2 = a3 = 0;
        }
    }
    res[0] = pixel ? t0 : a0;
    if (NP > 1) res[1] = pixel ? t1 : a1;
    if (NP > 2) {
        res[2] = pixel ? t2 : a2;
        res[3] = pixel ? t3 : a3;
    }
}

/* TFLite's MultiplyByQuantizedMultiplier for multiplier >= 0 and -31 <= shift <= -1 (what
 * QuantizeMultiplier gives for output scales in [2^-32, 0.5)), exactly.  SaturatingRounding-
 * DoublingHighMul (no saturation possible with multiplier >= 0) is floor((acc * mult + 2^30) / 2^31)
 * for either sign (TFLite's nudge and truncating division): one SMLAL and two shifts.
 * RoundingDivideByPOT (half away from zero) by 2^e is floor((x' + 2^(e-1)) / 2^e) with
 * x' = x - [x < 0], that is floor((y + 1) / 2) = (y >> 1) + (y & 1) with y = x' >> (e - 1): no
 * overflow anywhere. */
SYQ_CINLINE int32_t syq_cm_rq(int32_t acc, int32_t mult, int32_t shift) {
    const int32_t x = (int32_t)(((int64_t)acc * mult + ((int64_t)1 << 30)) >> 31); /* arithmetic shifts */
    const int32_t y = (x + (x >> 31)) >> (-shift - 1);
    return (y >> 1) + (y & 1);
}
SYQ_CINLINE int syq_cm_rq_ok(int32_t mult, int32_t shift) { return mult >= 0 && shift <= -1 && shift >= -31; }

/* syq_requantize, exactly: syq_cm_rq (shift 0: the high multiply alone) where it applies, the
 * generic code otherwise */
SYQ_CINLINE int8_t syq_cm_requant(const syq_conv_params *p, int32_t o, int32_t acc) {
    const int32_t mult = p->out_multiplier[o], shift = p->out_shift[o];
    int32_t v;
    if (mult < 0 || shift > 0 || shift < -31) return syq_requantize(p, o, acc);
    v = shift ? syq_cm_rq(acc, mult, shift) : (int32_t)(((int64_t)acc * mult + ((int64_t)1 << 30)) >> 31);
    v += p->output_zero_point;
    return (int8_t)(v < p->act_min ? p->act_min : (v > p->act_max ? p->act_max : v));
}

/* all output channels of NP positions: window sums, m_g, corrections, requantization; out: the
 * first position's output pixel (positions out_c bytes apart) */
SYQ_CINLINE void syq_cm_channels(const syq_cctx *c, const uint8_t *base, const size_t SW, int8_t *out, const int NP,
                                 const int SWK, const int tern) {
    const syq_conv_params *p = c->p;
    const syq_packed_weights *w = c->w;
    const int pixel = w->granularity == SYQ_GRAN_PIXEL;
    const size_t oc = (size_t)w->out_c;
    int32_t o;
    for (o = 0; o < w->out_c; ++o) {
        const uint32_t m = pixel ? 1u : (uint32_t)w->mag[syq_mag_index(w, o, 0)], corr = (uint32_t)c->corr[o];
        uint32_t r[SYQ_CNP] = {0u, 0u, 0u, 0u};
        syq_cm_block(c, base, SW, o, r, NP, tern, SWK);
        out[o] = syq_cm_requant(p, o, (int32_t)(m * r[0] - corr));
        if (NP > 1) out[oc + (size_t)o] = syq_cm_requant(p, o, (int32_t)(m * r[1] - corr));
        if (NP > 2) {
            out[2 * oc + (size_t)o] = syq_cm_requant(p, o, (int32_t)(m * r[2] - corr));
            out[3 * oc + (size_t)o] = syq_cm_requant(p, o, (int32_t)(m * r[3] - corr));
        }
    }
}

typedef void (*syq_cm_fn)(const syq_cctx *, const uint8_t *, size_t, int8_t *);
#define SYQ_CM_FN(name, SWC, NP, TERN)                                                             \
    static void name(const syq_cctx *c, const uint8_t *b, size_t sw, int8_t *out) {                \
        syq_cm_channels(c, b, (SWC) ? (size_t)(SWC) : sw, out, NP, (SWC) != 0, TERN);              \
    }
/* 4 positions of a stride-1 layer with 1-4 code words per pixel (distance 32 * nw bytes, immediate
 * load offsets, nw known), any distance, and single positions; binary and ternary */
SYQ_CM_FN(syq_cm_b4_32, 32, 4, 0)
SYQ_CM_FN(syq_cm_b4_64, 64, 4, 0)
SYQ_CM_FN(syq_cm_b4_96, 96, 4, 0)
SYQ_CM_FN(syq_cm_b4_128, 128, 4, 0)
SYQ_CM_FN(syq_cm_b4, 0, 4, 0)
SYQ_CM_FN(syq_cm_b2, 0, 2, 0)
SYQ_CM_FN(syq_cm_b1, 0, 1, 0)
SYQ_CM_FN(syq_cm_t4_32, 32, 4, 1)
SYQ_CM_FN(syq_cm_t4_64, 64, 4, 1)
SYQ_CM_FN(syq_cm_t4_96, 96, 4, 1)
SYQ_CM_FN(syq_cm_t4_128, 128, 4, 1)
SYQ_CM_FN(syq_cm_t4, 0, 4, 1)
SYQ_CM_FN(syq_cm_t2, 0, 2, 1)
SYQ_CM_FN(syq_cm_t1, 0, 1, 1)

static syq_cm_fn syq_cm_pick4(size_t sw, size_t nw, int tern) {
    static const syq_cm_fn b[5] = {syq_cm_b4, syq_cm_b4_32, syq_cm_b4_64, syq_cm_b4_96, syq_cm_b4_128};
    static const syq_cm_fn t[5] = {syq_cm_t4, syq_cm_t4_32, syq_cm_t4_64, syq_cm_t4_96, syq_cm_t4_128};
    const size_t i = sw == 32u * nw && nw <= 4u ? nw : 0u; /* stride 1, 1-4 words per pixel */
    return tern ? t[i] : b[i];
}

/* ---- 1x1 convolutions and FullyConnected: tables of subset sums -----------------------------
 * With a 1x1 kernel every output pixel reads one input pixel, shared by all out_c output channels.
 * For each group of 4 input channels of that pixel a table of the 16 subset sums of d = x - zp
 * (int16, |.| <= 1020; 32 bytes, built in pairs with SADD16: 8 words) turns the group's nibble of
 * a code plane into its partial sum with one load:
 *   binary:  sum_i c_i d_i = D - 2 T[s]      (D = sum_i d_i, s = sign nibble)
 *   ternary: sum_i c_i d_i = T[z] - 2 T[s]   (z = non-zero nibble; the sign bits are a subset)
 * so an output channel costs per 4 channels UBFX + LDRSH + ADD per plane: no correction term (the
 * zero point is in the tables), no padded copy of the input.  Output channels go in blocks of
 * SYQ_TNR (binary) / SYQ_TNR2 (ternary) sharing the table address and loop; input words in chunks
 * that fit in the scratch (256 bytes of tables per word; partial sums kept per output channel). */
#define SYQ_TNR 4
#define SYQ_TNR2 2
#define SYQ_T8_MIN_OC 48 /* ternary: byte tables (8 channels per load) from this many output channels */

/* the 16 subset sums of 4 channels (bytes of v, d = v - zp) as 8 words of int16 pairs; returns T[15] */
SYQ_CINLINE int32_t syq_cm_tab4(uint32_t v, uint32_t zp2, uint32_t *t) {
    const uint32_t d02 = __ssub16(__sxtb16(v), zp2);      /* (d0, d2) */
    const uint32_t d13 = __ssub16(__sxtb16(v >> 8), zp2); /* (d1, d3) */
    const uint32_t q1 = (d13 & 0xFFFFu) * 0x00010001u;    /* (d1, d1) */
    const uint32_t q2 = (d02 >> 16) * 0x00010001u;        /* (d2, d2) */
    const uint32_t q3 = (d13 >> 16) * 0x00010001u;        /* (d3, d3) */
    const uint32_t p0 = d02 << 16;                        /* T[0] = 0, T[1] = d0 */
    const uint32_t p1 = __sadd16(p0, q1), p2 = __sadd16(p0, q2), p3 = __sadd16(p1, q2);
    t[0] = p0;
    t[1] = p1;
    t[2] = p2;
    t[3] = p3;
    t[4] = __sadd16(p0, q3);
    t[5] = __sadd16(p1, q3);
    t[6] = __sadd16(p2, q3);
    t[7] = __sadd16(p3, q3);
    return (int32_t)t[7] >> 16;
}

/* channels c..c+3 of x as a word, channels from c1 on read as the zero point (d = 0) */
SYQ_CINLINE uint32_t syq_cm_x4(const int8_t *x, int32_t c, int32_t c1, uint32_t zpb) {
    uint32_t v;
    int32_t k;
    if (c + 4 <= c1) {
        __builtin_memcpy(&v, x + c, 4);
        return v;
    }
    v = zpb;
    for (k = 0; c + k < c1; ++k) v = (v & ~(0xFFu << (8 * k))) | ((uint32_t)(uint8_t)x[c + k] << (8 * k));
    return v;
}

/* nibble tables of input pixel x, words j0..j0+nwc-1 (channels past in_c: d = 0; whole groups
 * past in_c are never read: their nibbles are 0); returns the sum of d */
static int32_t syq_cm_tab_build(const int8_t *x, int32_t in_c, int32_t zp, size_t j0, size_t nwc, uint32_t *t) {
    const uint32_t zp2 = ((uint32_t)zp & 0xFFFFu) * 0x00010001u, zpb = ((uint32_t)zp & 0xFFu) * 0x01010101u;
    const int32_t cend = (int32_t)(32u * (j0 + nwc)), c1 = cend < in_c ? cend : in_c;
    int32_t c = (int32_t)(32u * j0), dsum = 0;
    for (; c < c1; c += 4, t += 8) dsum += syq_cm_tab4(syq_cm_x4(x, c, c1, zpb), zp2, t);
    return dsum;
}

/* byte tables (256 subset sums of 8 channels, 512 bytes) of input pixel x, words j0..j0+nwc-1:
 * T8[b] = T[b & 15] + T'[b >> 4] from the two nibble tables, 8 SADD16 per high nibble */
static int32_t syq_cm_tab8_build(const int8_t *x, int32_t in_c, int32_t zp, size_t j0, size_t nwc, uint32_t *t) {
    const uint32_t zp2 = ((uint32_t)zp & 0xFFFFu) * 0x00010001u, zpb = ((uint32_t)zp & 0xFFu) * 0x01010101u;
    const int32_t cend = (int32_t)(32u * (j0 + nwc)), c1 = cend < in_c ? cend : in_c;
    int32_t c = (int32_t)(32u * j0), dsum = 0, h;
    uint32_t lo[8], hi[8];
    for (; c < c1; c += 8) {
        const uint16_t *hh = (const uint16_t *)(const void *)hi;
        uint32_t l0, l1, l2, l3, l4, l5, l6, l7;
        dsum += syq_cm_tab4(syq_cm_x4(x, c, c1, zpb), zp2, lo);
        dsum += syq_cm_tab4(syq_cm_x4(x, c + 4, c1, zpb), zp2, hi);
        l0 = lo[0]; l1 = lo[1]; l2 = lo[2]; l3 = lo[3]; l4 = lo[4]; l5 = lo[5]; l6 = lo[6]; l7 = lo[7];
        for (h = 0; h < 16; ++h, t += 8) {
            const uint32_t d = (uint32_t)hh[h] * 0x00010001u;
            const uint32_t e0 = (uint32_t)__sadd16(l0, d), e1 = (uint32_t)__sadd16(l1, d);
            const uint32_t e2 = (uint32_t)__sadd16(l2, d), e3 = (uint32_t)__sadd16(l3, d);
            const uint32_t e4 = (uint32_t)__sadd16(l4, d), e5 = (uint32_t)__sadd16(l5, d);
            const uint32_t e6 = (uint32_t)__sadd16(l6, d), e7 = (uint32_t)__sadd16(l7, d);
            t[0] = e0;
            t[1] = e1;
            t[2] = e2;
            t[3] = e3;
            t[4] = e4;
            t[5] = e5;
            t[6] = e6;
            t[7] = e7;
        }
    }
    return dsum;
}

#define SYQ_TL(tk, v, k) ((int32_t)(tk)[((v) >> (4 * (k))) & 0xFu])
#define SYQ_TS(k, NR)                                                                              \
    do {                                                                                           \
        const int16_t *tk = t + 16 * (k);                                                          \
        if (tern) {                                                                                \
            a0 += SYQ_TL(tk, z0, k) - 2 * SYQ_TL(tk, s0, k);                                       \
            if (NR > 1) a1 += SYQ_TL(tk, z1, k) - 2 * SYQ_TL(tk, s1, k);                           \
        } else {                                                                                   \
            a0 += SYQ_TL(tk, s0, k);                                                               \
            if (NR > 1) a1 += SYQ_TL(tk, s1, k);                                                   \
            if (NR > 2) a2 += SYQ_TL(tk, s2, k);                                                   \
            if (NR > 3) a3 += SYQ_TL(tk, s3, k);                                                   \
        }                                                                                          \
    } while (0)
#define SYQ_TW(cw, NR)                                                                             \
    const uint32_t s0 = (cw)[0], z0 = tern ? (cw)[nw] : 0u;                                        \
    const uint32_t s1 = NR > 1 ? (cw)[pw] : 0u, z1 = NR > 1 && tern ? (cw)[pw + nw] : 0u;          \
    const uint32_t s2 = NR > 2 ? (cw)[2 * pw] : 0u, z2 = NR > 2 && tern ? (cw)[2 * pw + nw] : 0u;  \
    const uint32_t s3 = NR > 3 ? (cw)[3 * pw] : 0u;                                                \
    (void)z0; (void)z1; (void)z2; (void)s1; (void)s2; (void)s3

/* what the table path reads per output channel, loaded once per call */
typedef struct {
    const syq_conv_params *p;
    const uint32_t *codes;
    const uint8_t *mag;
    const int32_t *bias, *mult, *shift;
    size_t nw, pw, ms;
    int32_t oc, zp, lo, hi, fast;
} syq_tq;

/* int32 accumulator of output channel o (multiplier mu, shift sh) -> int8 (q: a local copy, out of
 * reach of the output stores) */
SYQ_CINLINE int8_t syq_cm_out2(const syq_tq *q, int32_t o, int32_t mu, int32_t sh, int32_t acc) {
    int32_t v;
    if (!q->fast) return syq_requantize(q->p, o, acc);
    v = syq_cm_rq(acc, mu, sh) + q->zp;
    return (int8_t)(v < q->lo ? q->lo : (v > q->hi ? q->hi : v));
}
SYQ_CINLINE int8_t syq_cm_out(const syq_tq *q, int32_t o, int32_t acc) {
    return syq_cm_out2(q, o, q->mult[o], q->shift[o], acc);
}

/* sums s (sum_i c_i d_i, binary: sum over the sign bits) of output channel o -> out[o] */
SYQ_CINLINE void syq_cm_tab_out(const syq_tq *q, int32_t o, int32_t s, int32_t dsum, int8_t *out, const int tern) {
    if (!tern) s = dsum - 2 * s;
    out[o] = syq_cm_out(q, o, (int32_t)((uint32_t)q->mag[(size_t)o * q->ms] * (uint32_t)s +
                                        (q->bias ? (uint32_t)q->bias[o] : 0u)));
}

/* NR output channels from o: their sums over words 0..nwc-1 of the tables t (the last word with
 * ng groups) into a0..a3 */
#define SYQ_TROWS(NRV)                                                                             \
    do {                                                                                           \
        const uint32_t *cw = cw0 + (size_t)o * pw;                                                 \
        const int16_t *t = tab;                                                                    \
        size_t j;                                                                                  \
        for (j = last; j < nwc; ++j, t += 128, ++cw) {                                             \
            SYQ_TW(cw, NRV);                                                                       \
            SYQ_TS(0, NRV); SYQ_TS(1, NRV); SYQ_TS(2, NRV); SYQ_TS(3, NRV);                        \
            SYQ_TS(4, NRV); SYQ_TS(5, NRV); SYQ_TS(6, NRV); SYQ_TS(7, NRV);                        \
        }                                                                                          \
        if (last) {                                                                                \
            SYQ_TW(cw, NRV);                                                                       \
            switch (ng) { /* groups past in_c: nibbles 0, skipped */                               \
            case 8: SYQ_TS(7, NRV); /* fall through */                                             \
            case 7: SYQ_TS(6, NRV); /* fall through */                                             \
            case 6: SYQ_TS(5, NRV); /* fall through */                                             \
            case 5: SYQ_TS(4, NRV); /* fall through */                                             \
            case 4: SYQ_TS(3, NRV); /* fall through */                                             \
            case 3: SYQ_TS(2, NRV); /* fall through */                                             \
            case 2: SYQ_TS(1, NRV); /* fall through */                                             \
            default: SYQ_TS(0, NRV);                                                               \
            }                                                                                      \
        }                                                                                          \
    } while (0)

/* byte tables: 8 channels per load (t: 256 entries per group, 4 groups per word) */
#define SYQ_TL8(tk, v, k) ((int32_t)(tk)[((v) >> (8 * (k))) & 0xFFu])
#define SYQ_TB(k, NR)                                                                              \
    do {                                                                                           \
        const int16_t *tk = t + 256 * (k);                                                         \
        if (tern) {                                                                                \
            a0 += SYQ_TL8(tk, z0, k) - 2 * SYQ_TL8(tk, s0, k);                                     \
            if (NR > 1) a1 += SYQ_TL8(tk, z1, k) - 2 * SYQ_TL8(tk, s1, k);                         \
            if (NR > 2) a2 += SYQ_TL8(tk, z2, k) - 2 * SYQ_TL8(tk, s2, k);                         \
        } else {                                                                                   \
            a0 += SYQ_TL8(tk, s0, k);                                                              \
            if (NR > 1) a1 += SYQ_TL8(tk, s1, k);                                                  \
            if (NR > 2) a2 += SYQ_TL8(tk, s2, k);                                                  \
            if (NR > 3) a3 += SYQ_TL8(tk, s3, k);                                                  \
        }                                                                                          \
    } while (0)
#define SYQ_TROWS8(NRV)                                                                            \
    do {                                                                                           \
        const uint32_t *cw = cw0 + (size_t)o * pw;                                                 \
        const int16_t *t = tab;                                                                    \
        size_t j;                                                                                  \
        for (j = last; j < nwc; ++j, t += 1024, ++cw) {                                            \
            SYQ_TW(cw, NRV);                                                                       \
            SYQ_TB(0, NRV); SYQ_TB(1, NRV); SYQ_TB(2, NRV); SYQ_TB(3, NRV);                        \
        }                                                                                          \
        if (last) {                                                                                \
            SYQ_TW(cw, NRV);                                                                       \
            switch ((ng + 1) / 2) {                                                                \
            case 4: SYQ_TB(3, NRV); /* fall through */                                             \
            case 3: SYQ_TB(2, NRV); /* fall through */                                             \
            case 2: SYQ_TB(1, NRV); /* fall through */                                             \
            default: SYQ_TB(0, NRV);                                                               \
            }                                                                                      \
        }                                                                                          \
    } while (0)

/* all output channels of one input pixel, words j0..j0+nwc-1 of its tables tab (the last of them
 * with ng groups): partial sums of a chunk of words in sums (the first chunk starts them, the last
 * requantizes them) */
SYQ_CINLINE void syq_cm_tab_pixel(const syq_tq *qp, const int16_t *tab, size_t j0, size_t nwc, int ng, int first,
                                  int last, int32_t dsum, int32_t *sums, int8_t *out, const int tern,
                                  const int byte) {
    const syq_tq qc = *qp, *q = &qc;
    const int32_t NR0 = tern ? SYQ_TNR2 : SYQ_TNR, oc = q->oc;
    const size_t nw = q->nw, pw = q->pw;
    const uint32_t *cw0 = q->codes + j0;
    int32_t o = 0;
    while (o < oc) {
        const int32_t nr = oc - o >= NR0 ? NR0 : 1;
        int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        if (!first) { /* the sums so far */
            a0 = sums[o];
            if (nr > 1) a1 = sums[o + 1];
            if (nr > 2) a2 = sums[o + 2];
            if (nr > 3) a3 = sums[o + 3];
        }
        if (byte) {
            if (nr == 1) SYQ_TROWS8(1);
            else if (tern) SYQ_TROWS8(SYQ_TNR2);
            else SYQ_TROWS8(SYQ_TNR);
        } else {
            if (nr == 1) SYQ_TROWS(1);
            else if (tern) SYQ_TROWS(SYQ_TNR2);
            else SYQ_TROWS(SYQ_TNR);
        }
        if (!last) {
            sums[o] = a0;
            if (nr > 1) sums[o + 1] = a1;
            if (nr > 2) sums[o + 2] = a2;
            if (nr > 3) sums[o + 3] = a3;
            o += nr;
            continue;
        }
        syq_cm_tab_out(q, o, a0, dsum, out, tern);
        if (nr > 1) syq_cm_tab_out(q, o + 1, a1, dsum, out, tern);
        if (nr > 2) syq_cm_tab_out(q, o + 2, a2, dsum, out, tern);
        if (nr > 3) syq_cm_tab_out(q, o + 3, a3, dsum, out, tern);
        o += nr;
    }
}

static void syq_cm_tab_pixel_b(const syq_tq *q, const int16_t *t, size_t j0, size_t nwc, int ng, int first, int last,
                                int32_t dsum, int32_t *sums, int8_t *out) {
    syq_cm_tab_pixel(q, t, j0, nwc, ng, first, last, dsum, sums, out, 0, 0);
}
static void syq_cm_tab_pixel_t(const syq_tq *q, const int16_t *t, size_t j0, size_t nwc, int ng, int first, int last,
                                int32_t dsum, int32_t *sums, int8_t *out) {
    syq_cm_tab_pixel(q, t, j0, nwc, ng, first, last, dsum, sums, out, 1, 0);
}

static void syq_cm_tab_pixel_t8(const syq_tq *q, const int16_t *t, size_t j0, size_t nwc, int ng, int first, int last,
                                int32_t dsum, int32_t *sums, int8_t *out) {
    syq_cm_tab_pixel(q, t, j0, nwc, ng, first, last, dsum, sums, out, 1, 1);
}

/* ---- 1x1 convolutions with rows of >= 4 output pixels ----------------------------------------
 * The masks of a code nibble are shared by 4 pixels (as syq_cm_block, without the kernel-pixel loop
 * and its per-group multiply: 1x1 layers have one group per output channel): the input pixels are
 * copied once, in output order, as u = x + 128 (x XOR 0x80), 32 * nw bytes each (channels past in_c
 * 0); nibbles past in_c are skipped; the correction (zero point, USADA8's 255 per -1, bias) comes
 * from syq_cm_corr. */
static void syq_cm_pw_copy(const syq_cctx *c, const int8_t *img, uint8_t *u) {
    const syq_conv_params *p = c->p;
    const int32_t in_c = c->w->in_c, n4 = in_c / 4;
    size_t oy, ox;
    int32_t k;
    for (oy = 0; oy < (size_t)p->out_h; ++oy)
        for (ox = 0; ox < (size_t)p->out_w; ++ox, u += c->ip) {
            const int8_t *x = img + (oy * (size_t)p->stride_h * (size_t)p->in_w + ox * (size_t)p->stride_w) * (size_t)in_c;
            uint32_t *d = (uint32_t *)(void *)u;
            for (k = 0; k < n4; ++k) {
                uint32_t v;
                __builtin_memcpy(&v, x + 4 * k, 4);
                d[k] = v ^ 0x80808080u;
            }
            for (k = 4 * n4; k < (int32_t)c->ip; ++k) u[k] = k < in_c ? (uint8_t)(x[k] ^ 0x80) : 0u;
        }
}

/* all output channels of NP (1 or 4) pixels SW bytes apart in u; out: the first pixel's outputs */
SYQ_CINLINE void syq_cm_pw_block(const syq_tq *qp, const int32_t *corr, const uint8_t *u, int ng, int8_t *out,
                                 const size_t SW, const int NP, const int tern) {
    const syq_tq qc = *qp, *q = &qc;
    const size_t nw = q->nw, pw = q->pw, oc = (size_t)q->oc;
    int32_t o;
    for (o = 0; o < q->oc; ++o) {
        const uint32_t *sg = q->codes + (size_t)o * pw;
        const uint8_t *xb = u;
        const uint32_t m = q->mag[(size_t)o * q->ms], cr = (uint32_t)corr[o];
        uint32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        size_t j;
        for (j = 1; j < nw; ++j, ++sg, xb += 32) {
            const uint32_t s = sg[0], z = tern ? sg[nw] : 0u;
            SYQ_CM_NIB(0); SYQ_CM_NIB(1); SYQ_CM_NIB(2); SYQ_CM_NIB(3);
            SYQ_CM_NIB(4); SYQ_CM_NIB(5); SYQ_CM_NIB(6); SYQ_CM_NIB(7);
        }
        {
            const uint32_t s = sg[0], z = tern ? sg[nw] : 0u;
            switch (ng) { /* nibbles past in_c are 0 (u there is 0 too), skipped */
            case 8: SYQ_CM_NIB(7); /* fall through */
            case 7: SYQ_CM_NIB(6); /* fall through */
            case 6: SYQ_CM_NIB(5); /* fall through */
            case 5: SYQ_CM_NIB(4); /* fall through */
            case 4: SYQ_CM_NIB(3); /* fall through */
            case 3: SYQ_CM_NIB(2); /* fall through */
            case 2: SYQ_CM_NIB(1); /* fall through */
            default: SYQ_CM_NIB(0);
            }
        }
        {
            const int32_t mu = q->mult[o], sh = q->shift[o];
            const int8_t r0 = syq_cm_out2(q, o, mu, sh, (int32_t)(m * a0 - cr));
            if (NP > 1) {
                const int8_t r1 = syq_cm_out2(q, o, mu, sh, (int32_t)(m * a1 - cr));
                const int8_t r2 = syq_cm_out2(q, o, mu, sh, (int32_t)(m * a2 - cr));
                const int8_t r3 = syq_cm_out2(q, o, mu, sh, (int32_t)(m * a3 - cr));
                out[oc + (size_t)o] = r1;
                out[2 * oc + (size_t)o] = r2;
                out[3 * oc + (size_t)o] = r3;
            }
            out[o] = r0;
        }
    }
}

typedef void (*syq_cm_pw_fn)(const syq_tq *, const int32_t *, const uint8_t *, int, int8_t *, size_t);
#define SYQ_CM_PW(name, SWC, NP, TERN)                                                             \
    static void name(const syq_tq *q, const int32_t *corr, const uint8_t *u, int ng, int8_t *out, size_t sw) { \
        syq_cm_pw_block(q, corr, u, ng, out, (SWC) ? (size_t)(SWC) : sw, NP, TERN);                \
    }
SYQ_CM_PW(syq_cm_pwb4_32, 32, 4, 0)
SYQ_CM_PW(syq_cm_pwb4, 0, 4, 0)
SYQ_CM_PW(syq_cm_pwb1, 0, 1, 0)
SYQ_CM_PW(syq_cm_pwt4_32, 32, 4, 1)
SYQ_CM_PW(syq_cm_pwt4, 0, 4, 1)
SYQ_CM_PW(syq_cm_pwt1, 0, 1, 1)

static void syq_conv2d_cm_pw(const syq_cctx *c, const syq_tq *q, const int8_t *input, int8_t *output) {
    const syq_conv_params *p = c->p;
    const syq_packed_weights *w = c->w;
    const int tern = w->bits == 2;
    const size_t npix = (size_t)p->out_h * (size_t)p->out_w, oc = (size_t)w->out_c, ip = c->ip;
    const int ng = (w->in_c + 3) / 4 - (int)(8u * (c->nw - 1u));
    const syq_cm_pw_fn f4 = tern ? (ip == 32u ? syq_cm_pwt4_32 : syq_cm_pwt4) : (ip == 32u ? syq_cm_pwb4_32 : syq_cm_pwb4);
    const syq_cm_pw_fn f1 = tern ? syq_cm_pwt1 : syq_cm_pwb1;
    size_t n, i;
    syq_cm_corr(c);
    for (n = 0; n < (size_t)p->batch; ++n) {
        int8_t *out = output + n * npix * oc;
        syq_cm_pw_copy(c, input + n * (size_t)p->in_h * (size_t)p->in_w * (size_t)w->in_c, c->u);
        for (i = 0; i + 4u <= npix; i += 4u) f4(q, c->corr, c->u + i * ip, ng, out + i * oc, ip);
        for (; i < npix; ++i) f1(q, c->corr, c->u + i * ip, ng, out + i * oc, ip);
    }
}

#if SYQ_HAVE_MVE
static void syq_mve_fc(const syq_cctx *c, const syq_tq *q, const int8_t *input, int8_t *output);
#endif

/* 1x1 kernel: returns 0 (nothing done) when the scratch cannot hold one word's tables */
static int syq_conv2d_cm_tab(const syq_cctx *c, const int8_t *input, int8_t *output) {
    const syq_conv_params *p = c->p;
    const syq_packed_weights *w = c->w;
    const size_t nw = c->nw, oc = (size_t)w->out_c;
    const size_t room = SYQ_ALIGN64(c->hp * c->wp * c->ip) + SYQ_ALIGN64(c->ip); /* tables; sums after */
    size_t cwmax = room / 256u;
    const int32_t groups = (w->in_c + 3) / 4;
    uint32_t *tab = (uint32_t *)(void *)c->u;
    int32_t *sums = (int32_t *)(void *)(c->u + room);
    int byte;
    void (*fn)(const syq_tq *, const int16_t *, size_t, size_t, int, int, int, int32_t, int32_t *, int8_t *);
    syq_tq q;
    size_t n, oy, ox, j0;
    int32_t o;
    if (cwmax == 0 && p->out_w < 4 && !SYQ_HAVE_MVE) return 0;
    q.p = p;
    q.codes = w->codes;
    q.mag = w->mag;
    q.bias = p->bias;
    q.mult = p->out_multiplier;
    q.shift = p->out_shift;
    q.nw = nw;
    q.pw = nw * (size_t)w->bits;
    q.ms = w->granularity == SYQ_GRAN_LAYER ? 0u : 1u; /* 1x1: pixel granularity indexes as channel */
    q.oc = w->out_c;
    q.zp = p->output_zero_point;
    q.lo = p->act_min;
    q.hi = p->act_max;
    q.fast = 1;
    for (o = 0; o < w->out_c; ++o) q.fast &= syq_cm_rq_ok(p->out_multiplier[o], p->out_shift[o]);
#if SYQ_HAVE_MVE
    if (p->out_w < 4) { /* Helium: predicated sums, no tables */
        syq_mve_fc(c, &q, input, output);
        return 1;
    }
#endif
    if (p->out_w >= 4) { /* pixels to share the masks with */
        syq_conv2d_cm_pw(c, &q, input, output);
        return 1;
    }
    byte = w->bits == 2 && w->out_c >= SYQ_T8_MIN_OC && cwmax >= 8u;
    if (byte) {
        cwmax /= 8u;
        fn = syq_cm_tab_pixel_t8;
    } else {
        fn = w->bits == 2 ? syq_cm_tab_pixel_t : syq_cm_tab_pixel_b;
    }
    for (n = 0; n < (size_t)p->batch; ++n)
        for (oy = 0; oy < (size_t)p->out_h; ++oy)
            for (ox = 0; ox < (size_t)p->out_w; ++ox) {
                const int8_t *x = input + (((n * (size_t)p->in_h + oy * (size_t)p->stride_h) * (size_t)p->in_w) +
                                           ox * (size_t)p->stride_w) * (size_t)w->in_c;
                int8_t *out = output + ((n * (size_t)p->out_h + oy) * (size_t)p->out_w + ox) * oc;
                int32_t dsum = 0;
                for (j0 = 0; j0 < nw; j0 += cwmax) {
                    const size_t nwc = nw - j0 < cwmax ? nw - j0 : cwmax;
                    const int last = j0 + nwc == nw;
                    dsum += (byte ? syq_cm_tab8_build : syq_cm_tab_build)(x, w->in_c, p->input_zero_point, j0, nwc, tab);
                    fn(&q, (const int16_t *)(const void *)tab, j0, nwc, last ? groups - (int32_t)(8u * (nw - 1u)) : 8,
                       j0 == 0, last, dsum, sums, out);
                }
            }
    return 1;
}

#if SYQ_HAVE_MVE
/* ---- Helium (MVE, Cortex-M55/M85): level 6 -----------------------------------------------
 * Convolutions with rows of >= 4 outputs: as the NEON path, the image copied once as signed x
 * (padding = zero point, channels past in_c = 0), the codes of one output channel expanded once per
 * image into int8 m_g * c (|.| <= 127; from the nibble table, four at a time; scratch, k_h * k_w * 32
 * * nw bytes) and reused by blocks of 4 positions: VMLADAVA.S8 adds 16 products to a scalar
 * accumulator per instruction, over each kernel row's k_w pixels at once (contiguous in both).  sum c (x - zp) = sum c x - zp sum c (weights-only
 * term once per call).  Narrow outputs (FullyConnected) take the DSP path: with one position there
 * is nothing to share the expansion with. */
#include <arm_mve.h>

static void syq_mve_pad(const syq_cctx *c, const int8_t *img) {
    const syq_conv_params *p = c->p;
    const int32_t in_c = c->w->in_c;
    int8_t *x = (int8_t *)(void *)c->u;
    size_t py, px;
    int32_t ch;
    for (py = 0; py < c->hp; ++py) {
        const int32_t iy = (int32_t)py - p->pad_top;
        for (px = 0; px < c->wp; ++px) {
            const int32_t ix = (int32_t)px - p->pad_left;
            int8_t *dst = x + (py * c->wp + px) * c->ip;
            if (iy >= 0 && iy < p->in_h && ix >= 0 && ix < p->in_w) {
                const int8_t *src = img + ((size_t)iy * p->in_w + ix) * in_c;
                for (ch = 0; ch < in_c; ++ch) dst[ch] = src[ch];
            } else {
                for (ch = 0; ch < in_c; ++ch) dst[ch] = (int8_t)p->input_zero_point;
            }
            for (ch = in_c; ch < (int32_t)c->ip; ++ch) dst[ch] = 0;
        }
    }
}

/* corr[o] = sum_pix m zp (n_nonzero - 2 n_neg) - bias[o], modulo 2^32 */
static void syq_mve_corr(const syq_cctx *c) {
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w, zp = c->p->input_zero_point;
    const size_t pw = c->nw * (size_t)w->bits;
    int32_t o, pix;
    size_t j;
    for (o = 0; o < w->out_c; ++o) {
        uint32_t total = 0;
        for (pix = 0; pix < kk; ++pix) {
            const uint32_t *sg = w->codes + ((size_t)o * kk + pix) * pw;
            uint32_t nneg = 0, nnz = w->bits == 2 ? 0u : (uint32_t)w->in_c;
            for (j = 0; j < c->nw; ++j) {
                nneg = __usada8(syq_cm_bytecount(sg[j]), 0u, nneg);
                if (w->bits == 2) nnz = __usada8(syq_cm_bytecount(sg[c->nw + j]), 0u, nnz);
            }
            total += (uint32_t)w->mag[syq_mag_index(w, o, pix)] * (uint32_t)zp * (nnz - 2u * nneg);
        }
        c->corr[o] = (int32_t)(total - (uint32_t)(c->p->bias ? c->p->bias[o] : 0));
    }
}

/* m_g * code of output channel o (|.| <= 127: int8) for every kernel pixel and channel */
static void syq_mve_expand(const syq_cctx *c, int32_t o, uint32_t *e) {
    const syq_packed_weights *w = c->w;
    const size_t n = (size_t)w->k_h * (size_t)w->k_w, nw = c->nw, pw = nw * (size_t)w->bits;
    const uint32_t *sg = w->codes + (size_t)o * n * pw;
    size_t pix, j;
    int g;
    for (pix = 0; pix < n; ++pix, sg += pw) {
        const uint32_t m = w->mag[syq_mag_index(w, o, (int32_t)pix)];
        const uint32_t pos = m * 0x01010101u, neg = ((256u - m) & 0xFFu) * 0x01010101u;
        for (j = 0; j < nw; ++j) {
            const uint32_t s = sg[j], z = w->bits == 2 ? sg[nw + j] : 0xFFFFFFFFu;
            for (g = 0; g < 8; ++g) {
                const uint32_t sm = syq_mask4[(s >> (4 * g)) & 0xFu], zm = syq_mask4[(z >> (4 * g)) & 0xFu];
                *e++ = ((pos & ~sm) | (neg & sm)) & zm;
            }
        }
    }
}

/* sum_pix m_pix sum_i c_i x_i of NP positions sw bytes apart (the magnitudes are in e): the
 * k_w pixels of a kernel row are contiguous in e and in the padded image */
SYQ_CINLINE void syq_mve_block(const syq_cctx *c, const int8_t *e, const int8_t *base, size_t sw, uint32_t *res,
                               const int NP) {
    const syq_packed_weights *w = c->w;
    const size_t nch = (size_t)w->k_w * c->ip / 16u, row_step = c->wp * c->ip;
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, ky;
    size_t k;
    for (ky = 0; ky < w->k_h; ++ky, base += row_step) {
        const int8_t *x0 = base, *x1 = base + sw, *x2 = base + 2 * sw, *x3 = base + 3 * sw;
        for (k = 0; k < nch; ++k) { /* one pointer per position: post-incremented loads */
            const int8x16_t cv = vld1q_s8(e);
            e += 16;
            a0 = vmladavaq_s8(a0, vld1q_s8(x0), cv);
            x0 += 16;
            if (NP > 1) {
                a1 = vmladavaq_s8(a1, vld1q_s8(x1), cv);
                a2 = vmladavaq_s8(a2, vld1q_s8(x2), cv);
                a3 = vmladavaq_s8(a3, vld1q_s8(x3), cv);
                x1 += 16;
                x2 += 16;
                x3 += 16;
            }
        }
    }
    res[0] = (uint32_t)a0;
    if (NP > 1) {
        res[1] = (uint32_t)a1;
        res[2] = (uint32_t)a2;
        res[3] = (uint32_t)a3;
    }
}

static void syq_mve_block4(const syq_cctx *c, const int8_t *e, const int8_t *b, size_t sw, uint32_t *r) {
    syq_mve_block(c, e, b, sw, r, 4);
}
static void syq_mve_block1(const syq_cctx *c, const int8_t *e, const int8_t *b, size_t sw, uint32_t *r) {
    syq_mve_block(c, e, b, sw, r, 1);
}

static int syq_conv2d_mve(syq_cctx *cp, const int8_t *input, int8_t *output) {
    const syq_cctx c = *cp;
    const syq_conv_params *p = c.p;
    const syq_packed_weights *w = c.w;
    int8_t *e = (int8_t *)c.corr + SYQ_ALIGN64((size_t)w->out_c * sizeof(int32_t));
    const size_t sw = (size_t)p->stride_w * c.ip, oc = (size_t)w->out_c;
    size_t oy, ox;
    int32_t n, o, q;
    syq_mve_corr(&c);
    for (n = 0; n < p->batch; ++n) {
        int8_t *img_out = output + (size_t)n * p->out_h * p->out_w * w->out_c;
        syq_mve_pad(&c, input + (size_t)n * p->in_h * p->in_w * w->in_c);
        for (o = 0; o < w->out_c; ++o) {
            const uint32_t corr = (uint32_t)c.corr[o];
            syq_mve_expand(&c, o, (uint32_t *)(void *)e);
            for (oy = 0; oy < (size_t)p->out_h; ++oy) {
                const int8_t *rowp = (const int8_t *)c.u + oy * (size_t)p->stride_h * c.wp * c.ip;
                int8_t *out = img_out + oy * (size_t)p->out_w * oc + (size_t)o;
                for (ox = 0; ox < (size_t)p->out_w;) {
                    uint32_t r[4] = {0u, 0u, 0u, 0u};
                    const int np = (size_t)p->out_w - ox >= 4u ? 4 : 1;
                    if (np == 4) syq_mve_block4(&c, e, rowp + ox * sw, sw, r);
                    else syq_mve_block1(&c, e, rowp + ox * sw, sw, r);
                    for (q = 0; q < np; ++q, ++ox) out[ox * oc] = syq_cm_requant(p, o, (int32_t)(r[q] - corr));
                }
            }
        }
    }
    return SYQ_OK;
}

/* 1x1 layers with rows of < 4 output pixels (FullyConnected): per output channel and 16 input
 * channels the codes as int8 lanes c in {-1, 0, +1} selected (VPSEL) by predicates straight from the
 * code bits (VMSR P0), VMLADAVA.S8 adds the 16 products c x and VADDVA the 16 codes:
 *   sum_i c_i (x_i - zp) = sum_i c_i x_i - zp sum_i c_i.
 * The input pixel is copied once into scratch, zero-padded to 32 * nw channels. */
SYQ_CINLINE void syq_mve_fc_k(const syq_cctx *c, const syq_tq *qp, const int8_t *input, int8_t *output,
                              const int tern) {
    const syq_tq qc = *qp, *q = &qc;
    const syq_conv_params *p = c->p;
    const syq_packed_weights *w = c->w;
    const size_t nw = c->nw, pw = q->pw, oc = (size_t)w->out_c;
    const int32_t zp = p->input_zero_point, in_c = w->in_c;
    const int8x16_t one = vdupq_n_s8(1), mone = vdupq_n_s8(-1), zero = vdupq_n_s8(0);
    int8_t *xs = (int8_t *)(void *)c->u;
    size_t n, oy, ox, j;
    int32_t o, k;
    for (n = 0; n < (size_t)p->batch; ++n)
        for (oy = 0; oy < (size_t)p->out_h; ++oy)
            for (ox = 0; ox < (size_t)p->out_w; ++ox) {
                const int8_t *x = input + (((n * (size_t)p->in_h + oy * (size_t)p->stride_h) * (size_t)p->in_w) +
                                           ox * (size_t)p->stride_w) * (size_t)in_c;
                int8_t *out = output + ((n * (size_t)p->out_h + oy) * (size_t)p->out_w + ox) * oc;
                for (k = 0; k < (int32_t)(32u * nw); k += 16) /* lanes past in_c: not read, 0 */
                    vst1q_s8(xs + k, vld1q_z_s8(x + k, vctp8q((uint32_t)(in_c - k > 0 ? in_c - k : 0))));
                for (o = 0; o < w->out_c; ++o) {
                    const uint32_t *sg = w->codes + (size_t)o * pw;
                    int32_t sx = 0, sc = 0;
                    for (j = 0; j < nw; ++j) {
                        const uint32_t neg = sg[j], nz = tern ? sg[nw + j] : 0u;
                        const int8x16_t x0 = vld1q_s8(xs + 32u * j), x1 = vld1q_s8(xs + 32u * j + 16u);
                        int8x16_t c0 = vpselq_s8(mone, one, (mve_pred16_t)(neg & 0xFFFFu));
                        int8x16_t c1 = vpselq_s8(mone, one, (mve_pred16_t)(neg >> 16));
                        if (tern) {
                            c0 = vpselq_s8(c0, zero, (mve_pred16_t)(nz & 0xFFFFu));
                            c1 = vpselq_s8(c1, zero, (mve_pred16_t)(nz >> 16));
                        }
                        sx = vmladavaq_s8(sx, x0, c0);
                        sx = vmladavaq_s8(sx, x1, c1);
                        sc = vaddvaq_s8(sc, c0);
                        sc = vaddvaq_s8(sc, c1);
                    }
                    if (!tern) sc -= (int32_t)(32u * nw) - in_c; /* the padding's +1 codes (x = 0 there) */
                    out[o] = syq_cm_out(q, o, (int32_t)((uint32_t)q->mag[(size_t)o * q->ms] *
                                                            ((uint32_t)sx - (uint32_t)zp * (uint32_t)sc) +
                                                        (q->bias ? (uint32_t)q->bias[o] : 0u)));
                }
            }
}
static void syq_mve_fc_b(const syq_cctx *c, const syq_tq *q, const int8_t *in, int8_t *out) {
    syq_mve_fc_k(c, q, in, out, 0);
}
static void syq_mve_fc_t(const syq_cctx *c, const syq_tq *q, const int8_t *in, int8_t *out) {
    syq_mve_fc_k(c, q, in, out, 1);
}
static void syq_mve_fc(const syq_cctx *c, const syq_tq *q, const int8_t *input, int8_t *output) {
    (c->w->bits == 2 ? syq_mve_fc_t : syq_mve_fc_b)(c, q, input, output);
}
#endif

/* Arguments and scratch checked by syq_conv2d_opt (same scratch layout as the portable path). */
int syq_conv2d_cm(const syq_conv_params *p, const syq_packed_weights *w, const int8_t *input,
                  int8_t *output, void *scratch) {
    syq_cctx c;
    uint8_t *base = (uint8_t *)scratch;
    const int tern = w->bits == 2;
    const syq_cm_fn blk1 = tern ? syq_cm_t1 : syq_cm_b1, blk2 = tern ? syq_cm_t2 : syq_cm_b2;
    syq_cm_fn blk4;
    size_t oy, ox, sw;
    int32_t n;
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
    blk4 = syq_cm_pick4(sw, c.nw, tern);
    if (w->k_h == 1 && w->k_w == 1 && syq_conv2d_cm_tab(&c, input, output)) return SYQ_OK;
#if SYQ_HAVE_MVE
    if (p->out_w >= 4) return syq_conv2d_mve(&c, input, output);
#endif
    syq_cm_corr(&c);
    for (n = 0; n < p->batch; ++n) {
        int8_t *img_out = output + (size_t)n * p->out_h * p->out_w * w->out_c;
        syq_cm_pad(&c, input + (size_t)n * p->in_h * p->in_w * w->in_c);
        for (oy = 0; oy < (size_t)p->out_h; ++oy) {
            const uint8_t *rowp = c.u + oy * (size_t)p->stride_h * c.wp * c.ip;
            int8_t *out = img_out + oy * (size_t)p->out_w * w->out_c;
            for (ox = 0; ox < (size_t)p->out_w;) {
                const size_t left = (size_t)p->out_w - ox;
                const int np = left >= SYQ_CNP ? SYQ_CNP : left >= 2 ? 2 : 1;
                (np == SYQ_CNP ? blk4 : np == 2 ? blk2 : blk1)(&c, rowp + ox * sw, sw, out + ox * (size_t)w->out_c);
                ox += (size_t)np;
            }
        }
    }
    return SYQ_OK;
}
#else
typedef int syq_cm_unused; /* ISO C: no empty translation unit */
#endif
