/* Calling the packed kernels from firmware: everything static, no malloc, no OS, no libc needed
 * by the kernels.  A 3x3 ternary conv (8x8x20 -> 8x8x16, SAME, per-pixel magnitudes) followed by
 * a binary fully connected layer (1024 -> 10).  In a real project the packed codes, magnitudes,
 * bias and requantization constants come from the exported model (syq_tf.kernels.PackedLayer:
 * .codes, .mag, .bias, .multiplier, .shift, zero points); here they are filled synthetically.
 *
 *   firmware:  cc -std=c99 -Wall -Werror -ffreestanding -c -I../include firmware_example.c ../src/syq_common.c ../src/syq_opt.c
 *   host demo: cc -std=c99 -DSYQ_HOST_DEMO -I../include firmware_example.c ../src/syq_common.c ../src/syq_opt.c && ./a.out
 */
#include "syq_kernels.h"

#define IN_H 8
#define IN_W 8
#define IN_C 20
#define OUT_C 16
#define K 3
#define FC_IN (IN_H * IN_W * OUT_C)
#define FC_OUT 10

/* ternary: 2 bits per weight, packed along input channels (ceil(20/32) = 1 word per plane) */
static uint32_t conv_codes[OUT_C * K * K * 1 * 2];
static uint8_t conv_mag[OUT_C * K * K]; /* SYQ_GRAN_PIXEL */
static int32_t conv_bias[OUT_C], conv_mult[OUT_C], conv_shift[OUT_C];
/* binary: 1 bit per weight, 32 words per output row */
static uint32_t fc_codes[FC_OUT * ((FC_IN + 31) / 32)];
static uint8_t fc_mag[1]; /* SYQ_GRAN_LAYER */
static int32_t fc_mult[FC_OUT], fc_shift[FC_OUT];

static int8_t input[IN_H * IN_W * IN_C];
static int8_t hidden[IN_H * IN_W * OUT_C];
static int8_t logits[FC_OUT];
/* one scratch buffer, sized at compile time for the larger of the two layers */
#define CONV_SCRATCH SYQ_CONV2D_SCRATCH_BYTES(IN_H, IN_W, 1, 1, K, K, IN_C, OUT_C)
#define FC_SCRATCH SYQ_FC_SCRATCH_BYTES(1, FC_IN, FC_OUT)
static uint64_t scratch[((CONV_SCRATCH > FC_SCRATCH ? CONV_SCRATCH : FC_SCRATCH) + 7) / 8];

static uint32_t lcg(uint32_t *s) { *s = *s * 1664525u + 1013904223u; return *s; }

static void init_model(void) {
    uint32_t s = 1u;
    size_t i;
    for (i = 0; i < OUT_C * K * K; ++i) { /* sign plane subset of the non-zero plane */
        uint32_t nz = lcg(&s) & 0xFFFFFu, sign = lcg(&s) & nz;
        conv_codes[2 * i] = sign;
        conv_codes[2 * i + 1] = nz;
        conv_mag[i] = (uint8_t)(60u + lcg(&s) % 68u);
    }
    for (i = 0; i < OUT_C; ++i) {
        conv_bias[i] = (int32_t)(lcg(&s) % 2001u) - 1000;
        syq_quantize_multiplier(0.0007, &conv_mult[i], &conv_shift[i]);
    }
    for (i = 0; i < sizeof fc_codes / sizeof fc_codes[0]; ++i) fc_codes[i] = lcg(&s);
    fc_mag[0] = 127;
    for (i = 0; i < FC_OUT; ++i) syq_quantize_multiplier(0.0002, &fc_mult[i], &fc_shift[i]);
    for (i = 0; i < sizeof input; ++i) input[i] = (int8_t)(lcg(&s) >> 24);
}

/* returns the arg-max class, or a negative error code */
int run_inference(void) {
    syq_packed_weights cw = {2, SYQ_GRAN_PIXEL, OUT_C, K, K, IN_C, conv_codes, conv_mag};
    syq_conv_params cp = {1, IN_H, IN_W, IN_H, IN_W, 1, 1, 1, 1, /* zp in, out */ -3, -128,
                          /* ReLU */ -128, 127, conv_bias, conv_mult, conv_shift};
    syq_packed_weights fw = {1, SYQ_GRAN_LAYER, FC_OUT, 1, 1, FC_IN, fc_codes, fc_mag};
    syq_conv_params fp = {1, 0, 0, 0, 0, 0, 0, 0, 0, -128, 5, -128, 127, 0, fc_mult, fc_shift};
    int rc, best = 0, i;
    rc = syq_conv2d_opt(&cp, &cw, input, hidden, scratch, sizeof scratch);
    if (rc != SYQ_OK) return rc;
    rc = syq_fully_connected_opt(&fp, &fw, hidden, logits, scratch, sizeof scratch);
    if (rc != SYQ_OK) return rc;
    for (i = 1; i < FC_OUT; ++i)
        if (logits[i] > logits[best]) best = i;
    return best;
}

#ifdef SYQ_HOST_DEMO
#include <stdio.h>
#include <string.h>
int main(void) {
    int8_t ref_hidden[sizeof hidden], ref_logits[sizeof logits];
    int best;
    init_model();
    best = run_inference();
    memcpy(ref_hidden, hidden, sizeof hidden);
    memcpy(ref_logits, logits, sizeof logits);
    { /* same layers through the reference kernels */
        syq_packed_weights cw = {2, SYQ_GRAN_PIXEL, OUT_C, K, K, IN_C, conv_codes, conv_mag};
        syq_conv_params cp = {1, IN_H, IN_W, IN_H, IN_W, 1, 1, 1, 1, -3, -128, -128, 127,
                              conv_bias, conv_mult, conv_shift};
        syq_packed_weights fw = {1, SYQ_GRAN_LAYER, FC_OUT, 1, 1, FC_IN, fc_codes, fc_mag};
        syq_conv_params fp = {1, 0, 0, 0, 0, 0, 0, 0, 0, -128, 5, -128, 127, 0, fc_mult, fc_shift};
        if (syq_conv2d_ref(&cp, &cw, input, hidden) || syq_fully_connected_ref(&fp, &fw, hidden, logits)) return 2;
    }
    printf("class %d, scratch %u bytes, conv weights %u bytes (int8: %u)\n", best,
           (unsigned)sizeof scratch, (unsigned)(sizeof conv_codes + sizeof conv_mag),
           (unsigned)(OUT_C * K * K * IN_C));
    if (best < 0 || memcmp(ref_hidden, hidden, sizeof hidden) || memcmp(ref_logits, logits, sizeof logits)) {
        printf("optimized and reference kernels disagree\n");
        return 1;
    }
    printf("optimized == reference\n");
    return 0;
}
#else
int main(void) { /* firmware entry point (or call run_inference from your scheduler) */
    init_model();
    for (;;) {
        volatile int cls = run_inference();
        (void)cls;
    }
}
#endif
