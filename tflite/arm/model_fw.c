/* Firmware example: the whole demo CNN (exported int8 model, generated as model.h by gen_model.py)
 * on a Cortex-M, static buffers only.  Packed binary/ternary layers run on our packed kernels, the
 * float-trained first conv and the logits layer on our int8 kernel, plus int8 max pool and the
 * per-channel MUL of the BatchNorm scale (TFLite reference arithmetic).  Checks the int8 logits of
 * each image against LiteRT BUILTIN_REF's and prints the cost of each op (SysTick ticks, see
 * startup.c).  For a real board: compile this file, the kernel sources and model.h with the board's
 * start-up code instead of startup.c, and provide syq_arm_ticks() (e.g. from DWT->CYCCNT). */
#include <stdio.h>
#include <string.h>

#include "syq_kernels.h"
#include "int8_ref.h"

uint64_t syq_arm_ticks(void);

/* MAX_POOL_2D, VALID padding */
static void syq_max_pool(const int8_t *x, int32_t n, int32_t h, int32_t w, int32_t c, int32_t fh, int32_t fw,
                         int32_t sh, int32_t sw, int32_t oh, int32_t ow, int32_t lo, int32_t hi, int8_t *y) {
    int32_t b, oy, ox, ch, ky, kx;
    for (b = 0; b < n; ++b)
        for (oy = 0; oy < oh; ++oy)
            for (ox = 0; ox < ow; ++ox)
                for (ch = 0; ch < c; ++ch) {
                    int32_t m = -128;
                    for (ky = 0; ky < fh; ++ky)
                        for (kx = 0; kx < fw; ++kx) {
                            const int32_t v = x[(((size_t)b * h + oy * sh + ky) * w + ox * sw + kx) * c + ch];
                            m = v > m ? v : m;
                        }
                    y[(((size_t)b * oh + oy) * ow + ox) * c + ch] = (int8_t)(m < lo ? lo : (m > hi ? hi : m));
                }
}

/* MUL of [rows, c] by a per-channel constant k[c] (int8, TFLite reference arithmetic) */
static void syq_mul_channel(const int8_t *x, int32_t rows, int32_t c, const int8_t *k, int32_t zx, int32_t zk,
                            int32_t zy, int32_t mult, int32_t shift, int32_t lo, int32_t hi, int8_t *y) {
    int32_t r, ch;
    for (r = 0; r < rows; ++r)
        for (ch = 0; ch < c; ++ch) {
            const int32_t prod = ((int32_t)x[(size_t)r * c + ch] - zx) * ((int32_t)k[ch] - zk);
            const int32_t v = syq_multiply_by_quantized_multiplier(prod, mult, shift) + zy;
            y[(size_t)r * c + ch] = (int8_t)(v < lo ? lo : (v > hi ? hi : v));
        }
}

/* ADD of a per-channel constant k[c] to [rows, c] (int8, TFLite reference: both inputs rescaled to a
 * common scale with a left shift of 20, summed, requantized) */
static void syq_add_channel(const int8_t *x, int32_t rows, int32_t c, const int8_t *k, int32_t zx, int32_t zk,
                            int32_t zy, int32_t m1, int32_t s1, int32_t m2, int32_t s2, int32_t mo, int32_t so,
                            int32_t lo, int32_t hi, int8_t *y) {
    int32_t r, ch;
    for (r = 0; r < rows; ++r)
        for (ch = 0; ch < c; ++ch) {
            const int32_t a = syq_multiply_by_quantized_multiplier(((int32_t)x[(size_t)r * c + ch] - zx) * (1 << 20), m1, s1);
            const int32_t b = syq_multiply_by_quantized_multiplier(((int32_t)k[ch] - zk) * (1 << 20), m2, s2);
            const int32_t v = syq_multiply_by_quantized_multiplier(a + b, mo, so) + zy;
            y[(size_t)r * c + ch] = (int8_t)(v < lo ? lo : (v > hi ? hi : v));
        }
}

#include "model.h"

static int8_t syq_model_buf_a[SYQ_MODEL_ACT_BYTES], syq_model_buf_b[SYQ_MODEL_ACT_BYTES];

int main(int argc, char **argv) {
    int img, i, failures = 0;
    uint64_t ticks[SYQ_MODEL_OPS], total[SYQ_MODEL_OPS];
    (void)argc;
    (void)argv;
    memset(total, 0, sizeof total);
    printf("MODEL %s, simd level %d\n", SYQ_MODEL_SOURCE, syq_simd_level());
    for (img = 0; img < SYQ_MODEL_IMAGES; ++img) {
        const int8_t *logits = 0;
        int ok, rc;
        memcpy(syq_model_buf_a, syq_model_images + (size_t)img * SYQ_MODEL_IN_BYTES, SYQ_MODEL_IN_BYTES);
        rc = syq_model_run(syq_model_buf_a, syq_model_buf_b, ticks, &logits);
        ok = rc == 0 && memcmp(logits, syq_model_expected + (size_t)img * SYQ_MODEL_OUT_BYTES, SYQ_MODEL_OUT_BYTES) == 0;
        failures += !ok;
        printf("IMAGE %d logits", img);
        for (i = 0; i < (int)SYQ_MODEL_OUT_BYTES; ++i) printf(" %d", (int)logits[i]);
        printf(" : %s\n", ok ? "equal to LiteRT BUILTIN_REF" : "DIFFERENT from LiteRT BUILTIN_REF");
        for (i = 0; i < SYQ_MODEL_OPS; ++i) total[i] += ticks[i];
    }
    for (i = 0; i < SYQ_MODEL_OPS; ++i)
        printf("OP %s ticks_per_image=%lu\n", syq_model_op_names[i], (unsigned long)(total[i] / SYQ_MODEL_IMAGES));
    printf("SUMMARY images=%d failures=%d\n", SYQ_MODEL_IMAGES, failures);
    return failures ? 1 : 0;
}
