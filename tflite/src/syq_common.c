/* Packing, requantization and the reference kernels (C99, no libc calls, no allocation). */
#include "syq_internal.h"

size_t syq_words_per_pixel(int32_t in_c) { return in_c > 0 ? ((size_t)in_c + 31u) / 32u : 0u; }

size_t syq_packed_words(int32_t bits, int32_t out_c, int32_t k_h, int32_t k_w, int32_t in_c) {
    if ((bits != 1 && bits != 2) || out_c <= 0 || k_h <= 0 || k_w <= 0 || in_c <= 0) return 0;
    return (size_t)out_c * (size_t)k_h * (size_t)k_w * syq_words_per_pixel(in_c) * (size_t)bits;
}

size_t syq_mag_count(int32_t granularity, int32_t out_c, int32_t k_h, int32_t k_w) {
    if (granularity == SYQ_GRAN_LAYER) return 1;
    if (granularity == SYQ_GRAN_CHANNEL) return (size_t)out_c;
    if (granularity == SYQ_GRAN_PIXEL) return (size_t)out_c * (size_t)k_h * (size_t)k_w;
    return 0;
}

int syq_pack(const int8_t *codes, int32_t bits, int32_t out_c, int32_t k_h, int32_t k_w,
             int32_t in_c, uint32_t *out) {
    size_t nw = syq_words_per_pixel(in_c), pixels, px, i, j;
    if (!codes || !out || syq_packed_words(bits, out_c, k_h, k_w, in_c) == 0) return SYQ_ERR_ARG;
    pixels = (size_t)out_c * (size_t)k_h * (size_t)k_w;
    for (px = 0; px < pixels; ++px) {
        const int8_t *c = codes + px * (size_t)in_c;
        uint32_t *sign = out + px * nw * (size_t)bits;
        uint32_t *nz = sign + nw; /* ternary only */
        for (j = 0; j < nw * (size_t)bits; ++j) sign[j] = 0u;
        for (i = 0; i < (size_t)in_c; ++i) {
            uint32_t bit = (uint32_t)1u << (i % 32u);
            if (c[i] == -1) {
                sign[i / 32u] |= bit;
                if (bits == 2) nz[i / 32u] |= bit;
            } else if (c[i] == 1) {
                if (bits == 2) nz[i / 32u] |= bit;
            } else if (!(c[i] == 0 && bits == 2)) {
                return SYQ_ERR_CODE;
            }
        }
    }
    return SYQ_OK;
}

int syq_unpack(const uint32_t *packed, int32_t bits, int32_t out_c, int32_t k_h, int32_t k_w,
               int32_t in_c, int8_t *codes) {
    size_t nw = syq_words_per_pixel(in_c), pixels, px, i;
    if (!codes || !packed || syq_packed_words(bits, out_c, k_h, k_w, in_c) == 0) return SYQ_ERR_ARG;
    pixels = (size_t)out_c * (size_t)k_h * (size_t)k_w;
    for (px = 0; px < pixels; ++px) {
        const uint32_t *sign = packed + px * nw * (size_t)bits;
        const uint32_t *nz = sign + nw;
        int8_t *c = codes + px * (size_t)in_c;
        for (i = 0; i < (size_t)in_c; ++i) {
            int s = (int)((sign[i / 32u] >> (i % 32u)) & 1u);
            int n = bits == 2 ? (int)((nz[i / 32u] >> (i % 32u)) & 1u) : 1;
            if (s && !n) return SYQ_ERR_CODE; /* sign bit without non-zero bit */
            c[i] = (int8_t)(n ? (s ? -1 : 1) : 0);
        }
    }
    return SYQ_OK;
}

/* ---- requantization ---------------------------------------------------------------------- */

void syq_quantize_multiplier(double real, int32_t *multiplier, int32_t *shift) {
    /* frexp without libm: real = q * 2^e, |q| in [0.5, 1); exact (scaling by 2). */
    int e = 0, neg = real < 0.0;
    double q = neg ? -real : real;
    int64_t q_fixed;
    if (!multiplier || !shift) return;
    if (!(q > 0.0) || q > 1.7976931348623157e308) { /* 0, NaN, inf: no multiplier (never loop on inf) */
        *multiplier = 0;
        *shift = 0;
        return;
    }
    while (q >= 1.0) { q *= 0.5; ++e; }
    while (q < 0.5) { q *= 2.0; --e; }
    q_fixed = (int64_t)(q * 2147483648.0 + 0.5); /* round half away from zero (q > 0) */
    if (q_fixed == ((int64_t)1 << 31)) { q_fixed /= 2; ++e; }
    if (e < -31) { e = 0; q_fixed = 0; }
    *multiplier = (int32_t)(neg ? -q_fixed : q_fixed);
    *shift = (int32_t)e;
}

static int32_t syq_srdhm(int32_t a, int32_t b) { /* SaturatingRoundingDoublingHighMul */
    int64_t ab, nudge;
    if (a == b && a == INT32_MIN) return INT32_MAX;
    ab = (int64_t)a * (int64_t)b;
    nudge = ab >= 0 ? ((int64_t)1 << 30) : (1 - ((int64_t)1 << 30));
    return (int32_t)((ab + nudge) / ((int64_t)1 << 31)); /* C99 '/' truncates toward zero */
}

static int32_t syq_floor_shift(int32_t x, int e) { /* x >> e, arithmetic, portable */
    if (e <= 0) return x;
    if (x >= 0) return x >> e;
    return -(int32_t)((uint32_t)(-(x + 1)) >> e) - 1;
}

static int32_t syq_rdbpot(int32_t x, int e) { /* RoundingDivideByPOT */
    uint32_t mask;
    int32_t remainder, threshold;
    if (e <= 0) return x;
    mask = e >= 32 ? 0xFFFFFFFFu : (((uint32_t)1 << e) - 1u);
    remainder = (int32_t)((uint32_t)x & mask);
    threshold = (int32_t)(mask >> 1) + (x < 0 ? 1 : 0);
    return syq_floor_shift(x, e) + (remainder > threshold ? 1 : 0);
}

int32_t syq_multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int32_t shift) {
    /* TFLite's shifts are -31..31; others are clamped so the shifts below stay defined (a left
     * shift of 32 already saturates every x != 0, a right shift of 31 rounds every x to 0 or -1) */
    int left = shift > 0 ? (shift > 32 ? 32 : shift) : 0;
    int right = shift > 0 ? 0 : (shift < -31 ? 31 : -shift);
    int64_t scaled = (int64_t)x * ((int64_t)1 << left);
    if (scaled > INT32_MAX) scaled = INT32_MAX; /* TFLite wraps here; never reached in practice */
    if (scaled < INT32_MIN) scaled = INT32_MIN;
    return syq_rdbpot(syq_srdhm((int32_t)scaled, multiplier), right);
}

/* ---- argument checks --------------------------------------------------------------------- */

int syq_check_args(const syq_conv_params *p, const syq_packed_weights *w, const void *input,
                   const void *output) {
    if (!p || !w || !input || !output || !w->codes || !w->mag || !p->out_multiplier ||
        !p->out_shift)
        return SYQ_ERR_ARG;
    if (w->bits != 1 && w->bits != 2) return SYQ_ERR_ARG;
    if (syq_mag_count(w->granularity, w->out_c, w->k_h, w->k_w) == 0) return SYQ_ERR_ARG;
    if (w->out_c <= 0 || w->in_c <= 0 || w->k_h <= 0 || w->k_w <= 0) return SYQ_ERR_ARG;
    if (p->batch <= 0 || p->in_h <= 0 || p->in_w <= 0 || p->out_h <= 0 || p->out_w <= 0)
        return SYQ_ERR_ARG;
    if (p->stride_h <= 0 || p->stride_w <= 0 || p->pad_top < 0 || p->pad_left < 0)
        return SYQ_ERR_ARG;
    if (p->pad_top >= w->k_h || p->pad_left >= w->k_w) return SYQ_ERR_ARG;
    if (p->input_zero_point < -128 || p->input_zero_point > 127) return SYQ_ERR_ARG;
    if (p->output_zero_point < -128 || p->output_zero_point > 127) return SYQ_ERR_ARG;
    if (p->act_min < -128 || p->act_max > 127 || p->act_min > p->act_max) return SYQ_ERR_ARG;
    /* every output window must start inside the padded input */
    if ((int64_t)(p->out_h - 1) * p->stride_h - p->pad_top >= p->in_h) return SYQ_ERR_ARG;
    if ((int64_t)(p->out_w - 1) * p->stride_w - p->pad_left >= p->in_w) return SYQ_ERR_ARG;
    /* every extent the kernels index (with int32 or size_t arithmetic) below 2^31: input, output,
     * weights, the padded image of the optimized path, the window reach (oy * stride + k) */
    {
        const int64_t lim = (int64_t)1 << 31, ip = (int64_t)syq_words_per_pixel(w->in_c) * 32;
        const int64_t hp = (int64_t)(p->out_h - 1) * p->stride_h + w->k_h;
        const int64_t wp = (int64_t)(p->out_w - 1) * p->stride_w + w->k_w;
        int32_t o;
        if (hp >= lim || wp >= lim || hp * wp >= lim || hp * wp * ip >= lim) return SYQ_ERR_ARG;
        if ((int64_t)p->batch * p->in_h * p->in_w >= lim ||
            (int64_t)p->batch * p->in_h * p->in_w * w->in_c >= lim)
            return SYQ_ERR_ARG;
        if ((int64_t)p->batch * p->out_h * p->out_w >= lim ||
            (int64_t)p->batch * p->out_h * p->out_w * w->out_c >= lim)
            return SYQ_ERR_ARG;
        if ((int64_t)w->out_c * w->k_h * w->k_w >= lim ||
            (int64_t)w->out_c * w->k_h * w->k_w * ip >= lim)
            return SYQ_ERR_ARG;
        /* TFLite shifts: -31..31 (a larger left shift would overflow the int64 scaling) */
        for (o = 0; o < w->out_c; ++o)
            if (p->out_shift[o] < -31 || p->out_shift[o] > 31) return SYQ_ERR_ARG;
    }
    return SYQ_OK;
}

/* ---- reference kernels ------------------------------------------------------------------- */

int syq_conv2d_ref(const syq_conv_params *p, const syq_packed_weights *w, const int8_t *input,
                   int8_t *output) {
    int32_t n, oy, ox, o, ky, kx, i;
    const size_t nw = syq_words_per_pixel(w ? w->in_c : 0);
    const int32_t zp = p ? p->input_zero_point : 0;
    int rc = syq_check_args(p, w, input, output);
    if (rc != SYQ_OK) return rc;
    for (n = 0; n < p->batch; ++n) {
        const int8_t *img = input + (size_t)n * p->in_h * p->in_w * w->in_c;
        for (oy = 0; oy < p->out_h; ++oy) {
            for (ox = 0; ox < p->out_w; ++ox) {
                int8_t *out = output + (((size_t)n * p->out_h + oy) * p->out_w + ox) * w->out_c;
                for (o = 0; o < w->out_c; ++o) {
                    /* sums modulo 2^32 (unsigned), as the optimized kernels: a bias near the int32
                     * limits (a crafted file) wraps as in TFLite builds instead of being undefined */
                    uint32_t acc = 0, group_sum = 0;
                    for (ky = 0; ky < w->k_h; ++ky) {
                        const int32_t iy = oy * p->stride_h - p->pad_top + ky;
                        if (iy < 0 || iy >= p->in_h) continue; /* padding: x - zp = 0 */
                        for (kx = 0; kx < w->k_w; ++kx) {
                            const int32_t ix = ox * p->stride_w - p->pad_left + kx;
                            const int32_t pix = ky * w->k_w + kx;
                            const uint32_t *sign, *nz;
                            const int8_t *x;
                            uint32_t s = 0;
                            if (ix < 0 || ix >= p->in_w) continue;
                            sign = w->codes + ((size_t)o * w->k_h * w->k_w + pix) * nw * w->bits;
                            nz = sign + nw;
                            x = img + ((size_t)iy * p->in_w + ix) * w->in_c;
                            for (i = 0; i < w->in_c; ++i) {
                                const uint32_t bit = (uint32_t)1u << (i % 32);
                                const uint32_t v = (uint32_t)((int32_t)x[i] - zp);
                                if (w->bits == 2 && !(nz[i / 32] & bit)) continue;
                                if (sign[i / 32] & bit) s -= v; else s += v;
                            }
                            if (w->granularity == SYQ_GRAN_PIXEL)
                                acc += (uint32_t)w->mag[syq_mag_index(w, o, pix)] * s;
                            else
                                group_sum += s;
                        }
                    }
                    if (w->granularity != SYQ_GRAN_PIXEL)
                        acc = (uint32_t)w->mag[syq_mag_index(w, o, 0)] * group_sum;
                    if (p->bias) acc += (uint32_t)p->bias[o];
                    out[o] = syq_requantize(p, o, (int32_t)acc);
                }
            }
        }
    }
    return SYQ_OK;
}

/* FC as a 1x1 convolution over a 1 x batch "image" (batch rows become output positions). */
static int syq_fc_as_conv(const syq_conv_params *p, const syq_packed_weights *w,
                          syq_conv_params *cp, syq_packed_weights *cw) {
    if (!p || !w) return SYQ_ERR_ARG;
    if (w->k_h != 1 || w->k_w != 1) return SYQ_ERR_ARG;
    *cp = *p;
    *cw = *w;
    cp->in_h = cp->out_h = 1;
    cp->in_w = cp->out_w = p->batch;
    cp->batch = 1;
    cp->stride_h = cp->stride_w = 1;
    cp->pad_top = cp->pad_left = 0;
    if (cw->granularity == SYQ_GRAN_PIXEL) cw->granularity = SYQ_GRAN_CHANNEL;
    return SYQ_OK;
}

int syq_fully_connected_ref(const syq_conv_params *p, const syq_packed_weights *w,
                            const int8_t *input, int8_t *output) {
    syq_conv_params cp;
    syq_packed_weights cw;
    int rc = syq_fc_as_conv(p, w, &cp, &cw);
    return rc != SYQ_OK ? rc : syq_conv2d_ref(&cp, &cw, input, output);
}

size_t syq_fully_connected_scratch_bytes(const syq_conv_params *p, const syq_packed_weights *w) {
    syq_conv_params cp;
    syq_packed_weights cw;
    if (syq_fc_as_conv(p, w, &cp, &cw) != SYQ_OK) return 0;
    return syq_conv2d_scratch_bytes(&cp, &cw);
}

int syq_fully_connected_opt(const syq_conv_params *p, const syq_packed_weights *w,
                            const int8_t *input, int8_t *output, void *scratch,
                            size_t scratch_bytes) {
    syq_conv_params cp;
    syq_packed_weights cw;
    int rc = syq_fc_as_conv(p, w, &cp, &cw);
    return rc != SYQ_OK ? rc : syq_conv2d_opt(&cp, &cw, input, output, scratch, scratch_bytes);
}
