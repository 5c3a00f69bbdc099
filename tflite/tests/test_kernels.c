/* Self-checking C test of syq_kernels (run under -fsanitize=address,undefined from pytest).
 * Randomized layers: pack/unpack round trip, reference kernel vs a naive int8 convolution with
 * explicit multiplies (w_int8 = m * code), optimized kernel (SIMD and portable) vs reference.
 * Also built for AArch64 (qemu-aarch64) and Cortex-M (qemu-system-arm, semihosting) by tflite/arm/run.sh
 * (int32_t is long there: printf arguments are cast to int). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "syq_kernels.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng >> 33);
}
static int32_t rint_in(int32_t lo, int32_t hi) { return lo + (int32_t)(rnd() % (uint32_t)(hi - lo + 1)); }

static int failures = 0;
#define CHECK(cond, ...)                                                 \
    do {                                                                 \
        if (!(cond)) {                                                   \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);         \
            fprintf(stderr, __VA_ARGS__);                                \
            fprintf(stderr, "\n");                                       \
            ++failures;                                                  \
        }                                                                \
    } while (0)

/* naive TFLite-style int8 conv with multiplications, for cross-checking */
static void naive_conv(const syq_conv_params *p, const int8_t *wq, int32_t oc, int32_t kh, int32_t kw,
                       int32_t ic, const int8_t *in, int8_t *out) {
    int32_t n, oy, ox, o, ky, kx, i;
    for (n = 0; n < p->batch; ++n)
        for (oy = 0; oy < p->out_h; ++oy)
            for (ox = 0; ox < p->out_w; ++ox)
                for (o = 0; o < oc; ++o) {
                    int32_t acc = p->bias ? p->bias[o] : 0, v;
                    for (ky = 0; ky < kh; ++ky)
                        for (kx = 0; kx < kw; ++kx) {
                            int32_t iy = oy * p->stride_h - p->pad_top + ky, ix = ox * p->stride_w - p->pad_left + kx;
                            if (iy < 0 || iy >= p->in_h || ix < 0 || ix >= p->in_w) continue;
                            for (i = 0; i < ic; ++i)
                                acc += (int32_t)wq[((o * kh + ky) * kw + kx) * ic + i] *
                                       ((int32_t)in[((n * p->in_h + iy) * p->in_w + ix) * ic + i] - p->input_zero_point);
                        }
                    v = syq_multiply_by_quantized_multiplier(acc, p->out_multiplier[o], p->out_shift[o]) + p->output_zero_point;
                    v = v < p->act_min ? p->act_min : (v > p->act_max ? p->act_max : v);
                    out[((n * p->out_h + oy) * p->out_w + ox) * oc + o] = (int8_t)v;
                }
}

static void one_case(int t) {
    const int32_t bits = rint_in(1, 2), gran = rint_in(0, 2);
    /* every 16th case: > 64 words per output channel (16-bit lane flushes of the AVX2 path) */
    const int big = t % 16 == 15;
    const int32_t kh = rint_in(1, 3), kw = rint_in(1, 3), ic = big ? rint_in(2048, 2300) : rint_in(1, 80);
    const int32_t oc = big ? rint_in(1, 3) : rint_in(1, 20);
    const int wide = big || t % 8 == 5; /* rows of >= 8 outputs: vectorised requantization */
    const int32_t ih = big ? rint_in(1, 3) : rint_in(1, 9), iw = wide ? rint_in(8, 12) : rint_in(1, 11);
    const int32_t sh = rint_in(1, 2), sw = wide ? 1 : rint_in(1, 3);
    const int same = ih >= kh && iw >= kw ? (int)rint_in(0, 1) : 1;
    syq_conv_params p;
    syq_packed_weights w;
    int32_t oh, ow, o, k, nm;
    size_t nwts, nin, nout, npk, scratch_bytes, i;
    int8_t *codes, *codes2, *wq, *in, *o_ref, *o_naive, *o_opt, *o_port;
    uint8_t *mag;
    uint32_t *packed;
    int32_t *bias, *mult, *shift;
    void *scratch;

    memset(&p, 0, sizeof p);
    oh = same ? (ih + sh - 1) / sh : (ih - kh) / sh + 1;
    ow = same ? (iw + sw - 1) / sw : (iw - kw) / sw + 1;
    p.batch = rint_in(1, 2); p.in_h = ih; p.in_w = iw; p.out_h = oh; p.out_w = ow;
    p.stride_h = sh; p.stride_w = sw;
    if (same) {
        int32_t th = (oh - 1) * sh + kh - ih, tw = (ow - 1) * sw + kw - iw;
        p.pad_top = th > 0 ? th / 2 : 0; p.pad_left = tw > 0 ? tw / 2 : 0;
    }
    p.input_zero_point = rint_in(-128, 127);
    p.output_zero_point = rint_in(-128, 127);
    p.act_min = rint_in(0, 1) ? -128 : p.output_zero_point;
    p.act_max = 127;

    nwts = (size_t)oc * kh * kw * ic;
    nin = (size_t)p.batch * ih * iw * ic;
    nout = (size_t)p.batch * oh * ow * oc;
    npk = syq_packed_words(bits, oc, kh, kw, ic);
    nm = (int32_t)syq_mag_count(gran, oc, kh, kw);
    codes = malloc(nwts); codes2 = malloc(nwts); wq = malloc(nwts); in = malloc(nin);
    o_ref = malloc(nout); o_naive = malloc(nout); o_opt = malloc(nout); o_port = malloc(nout);
    packed = malloc(npk * sizeof *packed); mag = malloc((size_t)nm);
    bias = malloc(oc * sizeof *bias); mult = malloc(oc * sizeof *mult); shift = malloc(oc * sizeof *shift);
    for (i = 0; i < nwts; ++i) codes[i] = (int8_t)(bits == 1 ? (rnd() & 1 ? 1 : -1) : rint_in(-1, 1));
    if (big && t % 32 == 31) /* worst case for 16-bit lanes: every product 255 * (+1) */
        for (i = 0; i < nwts; ++i) codes[i] = 1;
    for (k = 0; k < nm; ++k) mag[k] = (uint8_t)rint_in(0, 127);
    for (i = 0; i < nwts; ++i) {
        int32_t oo = (int32_t)(i / ((size_t)kh * kw * ic)), pix = (int32_t)((i / ic) % ((size_t)kh * kw));
        int32_t mi = gran == SYQ_GRAN_LAYER ? 0 : gran == SYQ_GRAN_CHANNEL ? oo : oo * kh * kw + pix;
        wq[i] = (int8_t)(mag[mi] * codes[i]);
    }
    for (i = 0; i < nin; ++i) in[i] = (int8_t)(big && t % 32 == 31 ? 127 : rint_in(-128, 127));
    for (o = 0; o < oc; ++o) {
        /* mostly < 1 (right shifts); 1 layer in 8 with multipliers > 1 (left shifts) */
        double real = (double)rint_in(1, 1000) / (double)(t % 8 == 3 ? rint_in(300, 5000) : rint_in(20000, 20000000));
        if (t % 8 == 5) real = 1.0 / (double)(1 << rint_in(1, 12)); /* multiplier 2^30: rounding ties */
        bias[o] = rint_in(-20000, 20000);
        syq_quantize_multiplier(real, &mult[o], &shift[o]);
    }
    p.bias = rint_in(0, 3) ? bias : NULL;
    p.out_multiplier = mult; p.out_shift = shift;

    CHECK(syq_pack(codes, bits, oc, kh, kw, ic, packed) == SYQ_OK, "pack case %d", t);
    CHECK(syq_unpack(packed, bits, oc, kh, kw, ic, codes2) == SYQ_OK, "unpack case %d", t);
    CHECK(memcmp(codes, codes2, nwts) == 0, "pack/unpack round trip case %d", t);

    w.bits = bits; w.granularity = gran; w.out_c = oc; w.k_h = kh; w.k_w = kw; w.in_c = ic;
    w.codes = packed; w.mag = mag;
    naive_conv(&p, wq, oc, kh, kw, ic, in, o_naive);
    CHECK(syq_conv2d_ref(&p, &w, in, o_ref) == SYQ_OK, "ref rc case %d", t);
    CHECK(memcmp(o_ref, o_naive, nout) == 0, "ref vs naive case %d (bits %d gran %d k %dx%d ic %d)", t, (int)bits, (int)gran, (int)kh,
          (int)kw, (int)ic);
    scratch_bytes = syq_conv2d_scratch_bytes(&p, &w);
    scratch = malloc(scratch_bytes);
    CHECK(syq_conv2d_opt(&p, &w, in, o_opt, scratch, scratch_bytes - 1) == SYQ_ERR_SCRATCH, "scratch check");
    CHECK(syq_conv2d_opt(&p, &w, in, o_opt, scratch, scratch_bytes) == SYQ_OK, "opt rc case %d", t);
    CHECK(memcmp(o_ref, o_opt, nout) == 0, "opt (simd %d) vs ref case %d", syq_simd_level(), t);
    syq_force_portable(1);
    CHECK(syq_conv2d_opt(&p, &w, in, o_port, scratch, scratch_bytes) == SYQ_OK, "portable rc");
    CHECK(memcmp(o_ref, o_port, nout) == 0, "portable vs ref case %d", t);
    syq_force_portable(0);

    if (kh == 1 && kw == 1) { /* the same weights as a fully connected layer over batch*ih*iw rows */
        syq_conv_params f = p;
        f.batch = p.batch * ih * iw;
        {
            size_t fb;
            void *fs;
            int8_t *fo = malloc((size_t)f.batch * oc), *fo2 = malloc((size_t)f.batch * oc);
            int8_t *fn = malloc((size_t)f.batch * oc);
            syq_conv_params c1 = p;
            c1.stride_h = c1.stride_w = 1; c1.out_h = ih; c1.out_w = iw; c1.pad_top = c1.pad_left = 0;
            naive_conv(&c1, wq, oc, 1, 1, ic, in, fn);
            CHECK(syq_fully_connected_ref(&f, &w, in, fo) == SYQ_OK, "fc ref rc");
            CHECK(memcmp(fo, fn, (size_t)f.batch * oc) == 0, "fc ref vs naive case %d", t);
            fb = syq_fully_connected_scratch_bytes(&f, &w);
            fs = malloc(fb);
            CHECK(syq_fully_connected_opt(&f, &w, in, fo2, fs, fb) == SYQ_OK, "fc opt rc");
            CHECK(memcmp(fo, fo2, (size_t)f.batch * oc) == 0, "fc opt vs ref case %d", t);
            free(fs); free(fo); free(fo2); free(fn);
        }
    }
    free(scratch); free(codes); free(codes2); free(wq); free(in); free(o_ref); free(o_naive);
    free(o_opt); free(o_port); free(packed); free(mag); free(bias); free(mult); free(shift);
}

/* FullyConnected layers (the 1x1 narrow-output AVX2 kernel: blocks of 8 channels, overlapping last
 * block, single channels below 8, odd/even word counts, > 64 words per flush, left shifts; the
 * Cortex-M tables: chunks of input words, byte tables from 48 output channels) */
static void fc_case(int t) {
    const int32_t bits = rint_in(1, 2), gran = rint_in(0, 2);
    const int big = t % 4 == 3, extreme = t % 16 == 15;
    const int32_t ic = big ? rint_in(2040, 2600) : rint_in(1, 400), batch = rint_in(1, 5);
    const int32_t oc = t % 8 == 7 ? rint_in(48, 80) : rint_in(1, 40); /* >= 48: Cortex-M ternary byte tables */
    syq_conv_params p;
    syq_packed_weights w;
    size_t nwts = (size_t)oc * ic, nin = (size_t)batch * ic, nout = (size_t)batch * oc, i, fb;
    int32_t o, nm = (int32_t)syq_mag_count(gran, oc, 1, 1);
    int8_t *codes = malloc(nwts), *wq = malloc(nwts), *in = malloc(nin);
    int8_t *o_naive = malloc(nout), *o_ref = malloc(nout), *o_opt = malloc(nout), *o_port = malloc(nout);
    uint32_t *packed = malloc(syq_packed_words(bits, oc, 1, 1, ic) * sizeof *packed);
    uint8_t *mag = malloc((size_t)nm);
    int32_t *bias = malloc(oc * sizeof *bias), *mult = malloc(oc * sizeof *mult), *shift = malloc(oc * sizeof *shift);
    void *fs;
    memset(&p, 0, sizeof p);
    p.batch = batch; p.in_h = p.in_w = p.out_h = p.out_w = 1; p.stride_h = p.stride_w = 1;
    p.input_zero_point = rint_in(-128, 127);
    p.output_zero_point = rint_in(-128, 127);
    p.act_min = rint_in(0, 1) ? -128 : p.output_zero_point;
    p.act_max = 127;
    for (i = 0; i < nwts; ++i) codes[i] = (int8_t)(bits == 1 ? (rnd() & 1 ? 1 : -1) : rint_in(-1, 1));
    for (i = 0; i < nin; ++i) in[i] = (int8_t)rint_in(-128, 127);
    if (extreme) { /* 16-bit lanes at their limit: |u| = 255 against one code everywhere */
        const int8_t code = (int8_t)(t % 32 == 31 ? -1 : 1), x = (int8_t)(code < 0 ? 127 : -128);
        for (i = 0; i < nwts; ++i) codes[i] = code;
        for (i = 0; i < nin; ++i) in[i] = (code < 0) == (t % 64 == 63) ? x : (int8_t)(code < 0 ? -128 : 127);
    }
    for (o = 0; o < nm; ++o) mag[o] = (uint8_t)rint_in(0, 127);
    for (i = 0; i < nwts; ++i) {
        int32_t oo = (int32_t)(i / (size_t)ic);
        wq[i] = (int8_t)(mag[gran == SYQ_GRAN_LAYER ? 0 : oo] * codes[i]);
    }
    for (o = 0; o < oc; ++o) {
        double real = (double)rint_in(1, 1000) / (double)(t % 8 == 3 ? rint_in(300, 5000) : rint_in(20000, 20000000));
        if (t % 8 == 5) real = 1.0 / (double)(1 << rint_in(1, 12));
        if (t % 8 == 6 && o % 3 == 1) real = (double)rint_in(1, 8); /* some channels with left shifts */
        bias[o] = rint_in(-20000, 20000);
        syq_quantize_multiplier(real, &mult[o], &shift[o]);
    }
    p.bias = rint_in(0, 3) ? bias : NULL;
    p.out_multiplier = mult; p.out_shift = shift;
    CHECK(syq_pack(codes, bits, oc, 1, 1, ic, packed) == SYQ_OK, "fc pack case %d", t);
    w.bits = bits; w.granularity = gran; w.out_c = oc; w.k_h = w.k_w = 1; w.in_c = ic;
    w.codes = packed; w.mag = mag;
    {
        syq_conv_params c1 = p;
        c1.batch = 1; c1.in_w = c1.out_w = batch;
        naive_conv(&c1, wq, oc, 1, 1, ic, in, o_naive);
    }
    CHECK(syq_fully_connected_ref(&p, &w, in, o_ref) == SYQ_OK, "fc ref rc case %d", t);
    CHECK(memcmp(o_ref, o_naive, nout) == 0, "fc ref vs naive case %d", t);
    fb = syq_fully_connected_scratch_bytes(&p, &w);
    fs = malloc(fb);
    CHECK(syq_fully_connected_opt(&p, &w, in, o_opt, fs, fb) == SYQ_OK, "fc opt rc case %d", t);
    CHECK(memcmp(o_ref, o_opt, nout) == 0, "fc opt (simd %d) vs ref case %d (bits %d gran %d ic %d oc %d batch %d)",
          syq_simd_level(), t, (int)bits, (int)gran, (int)ic, (int)oc, (int)batch);
    syq_force_portable(1);
    CHECK(syq_fully_connected_opt(&p, &w, in, o_port, fs, fb) == SYQ_OK, "fc portable rc case %d", t);
    CHECK(memcmp(o_ref, o_port, nout) == 0, "fc portable vs ref case %d", t);
    syq_force_portable(0);
    free(fs); free(codes); free(wq); free(in); free(o_naive); free(o_ref); free(o_opt); free(o_port);
    free(packed); free(mag); free(bias); free(mult); free(shift);
}

static void misc(void) {
    int32_t m, s;
    int8_t bad = 0;
    uint32_t word;
    syq_quantize_multiplier(0.5, &m, &s);
    CHECK(m == 1073741824 && s == 0, "qm(0.5) = %d, %d", (int)m, (int)s);
    syq_quantize_multiplier(0.0, &m, &s);
    CHECK(m == 0 && s == 0, "qm(0)");
    syq_quantize_multiplier(1.0 - 1e-12, &m, &s);
    CHECK(m == 1073741824 && s == 1, "qm(1-eps) = %d, %d", (int)m, (int)s);
    CHECK(syq_multiply_by_quantized_multiplier(100, 1073741824, 0) == 50, "mbqm 0.5*100");
    CHECK(syq_multiply_by_quantized_multiplier(-3, 1073741824, 0) == -1, "mbqm 0.5*-3 (gemmlowp nudge)");
    CHECK(syq_multiply_by_quantized_multiplier(5, 1073741824, -1) == 2, "mbqm 0.25*5 (double rounding)");
    CHECK(syq_multiply_by_quantized_multiplier(INT32_MIN, INT32_MIN, 0) == INT32_MAX, "saturation");
    CHECK(syq_pack(&bad, 1, 1, 1, 1, 1, &word) == SYQ_ERR_CODE, "binary code 0 rejected");
    CHECK(syq_packed_words(3, 1, 1, 1, 1) == 0, "bits 3 rejected");
    CHECK(syq_packed_words(1, 2, 3, 3, 33) == 2 * 9 * 2, "packed words");
    CHECK(syq_conv2d_ref(NULL, NULL, NULL, NULL) == SYQ_ERR_ARG, "NULL rejected");
}

int main(int argc, char **argv) {
    int t, n = argc > 1 ? atoi(argv[1]) : 300;
    misc();
    for (t = 0; t < n; ++t) one_case(t);
    for (t = 0; t < n / 2; ++t) fc_case(t);
    printf("syq_kernels C test: %d random layers + %d FC layers, simd level %d: %s\n", n, n / 2, syq_simd_level(),
           failures ? "FAILED" : "ok");
    printf("%d passed, %d failed\n", failures ? 0 : 1, failures ? 1 : 0);
    return failures ? 1 : 0;
}
