/* Runs every test-vector layer (vectors.h, from gen_vectors.py) on the target and checks each output
 * byte against LiteRT's BUILTIN_REF output: our reference kernel, the optimized kernel (the target's
 * SIMD path: NEON/SDOT on AArch64, DSP on Cortex-M), the portable path, and for layers marked bench
 * our straightforward int8 kernel (int8 weights, one multiply per weight) and, when built with
 * -DSYQ_WITH_CMSIS_NN, CMSIS-NN's arm_convolve_s8 / arm_fully_connected_s8 on the same int8 weights.
 *
 * Static buffers only.  On bare metal (default) each kernel call is timed with syq_arm_ticks()
 * (startup.c); a calibration loop of a known instruction count converts ticks to instructions under
 * qemu -icount.  -DSYQ_HOSTED (qemu-aarch64, Linux) checks outputs without timing.
 * Output: one "VEC ..." line per layer, then "SUMMARY ..."; exit status 0 iff every output is equal. */
#include <stdio.h>
#include <string.h>

#include "syq_kernels.h"
#include "vectors.h"
#include "int8_ref.h"

#ifdef SYQ_HOSTED
static uint64_t syq_arm_ticks(void) { return 0; }
#else
uint64_t syq_arm_ticks(void);
#endif

#ifdef SYQ_WITH_CMSIS_NN
/* cmsis_adapter.c: 0 ok (out written), < 0 CMSIS-NN refused; *ticks = the call's duration */
int syq_cmsis_run(const syq_vec *v, int8_t *out, uint64_t *ticks, uint32_t *buf_bytes);
#endif

static uint8_t scratch[SYQ_VEC_SCRATCH_BYTES] __attribute__((aligned(64)));
static int8_t out[SYQ_VEC_MAX_OUT];

static void params_of(const syq_vec *v, syq_conv_params *p, syq_packed_weights *w) {
    memset(p, 0, sizeof *p);
    p->batch = v->batch; p->in_h = v->in_h; p->in_w = v->in_w; p->out_h = v->out_h; p->out_w = v->out_w;
    p->stride_h = v->stride_h; p->stride_w = v->stride_w; p->pad_top = v->pad_top; p->pad_left = v->pad_left;
    p->input_zero_point = v->input_zero_point; p->output_zero_point = v->output_zero_point;
    p->act_min = v->act_min; p->act_max = v->act_max;
    p->bias = v->bias; p->out_multiplier = v->mult; p->out_shift = v->shift;
    w->bits = v->bits; w->granularity = v->granularity; w->out_c = v->out_c; w->k_h = v->k_h; w->k_w = v->k_w;
    w->in_c = v->in_c; w->codes = v->codes; w->mag = v->mag;
}

static int same(const syq_vec *v) { return memcmp(out, v->expected, v->out_bytes) == 0; }

static unsigned long lu(uint64_t t) { return (unsigned long)t; }

/* 2 instructions per iteration (subs + bne): ticks per instruction under -icount */
static void calib_loop(uint32_t n) {
#ifdef SYQ_HOSTED
    (void)n;
#else
    __asm__ volatile("1: subs %0, %0, #1\n bne 1b" : "+r"(n)::"cc");
#endif
}

int main(int argc, char **argv) {
    int i, failures = 0;
    (void)argc;
    (void)argv;
    uint64_t t0, t1;
    t0 = syq_arm_ticks();
    calib_loop(1000000u);
    t1 = syq_arm_ticks();
    printf("CALIB simd=%d loop_instructions=2000000 ticks=%lu\n", syq_simd_level(), lu(t1 - t0));
    for (i = 0; i < SYQ_VEC_COUNT; ++i) {
        const syq_vec *v = &syq_vecs[i];
        syq_conv_params p;
        syq_packed_weights w;
        size_t need;
        int ok_ref, ok_opt, ok_port, rc;
        uint64_t t_opt, t_port, t_ref;
        params_of(v, &p, &w);
        need = v->fc ? syq_fully_connected_scratch_bytes(&p, &w) : syq_conv2d_scratch_bytes(&p, &w);
        if (need > sizeof scratch) {
            printf("VEC %s scratch %lu > %lu\n", v->name, (unsigned long)need, (unsigned long)sizeof scratch);
            ++failures;
            continue;
        }
        memset(out, 0x5A, v->out_bytes);
        t0 = syq_arm_ticks();
        rc = v->fc ? syq_fully_connected_ref(&p, &w, v->input, out) : syq_conv2d_ref(&p, &w, v->input, out);
        t_ref = syq_arm_ticks() - t0;
        ok_ref = rc == SYQ_OK && same(v);
        memset(out, 0x5A, v->out_bytes);
        t0 = syq_arm_ticks();
        rc = v->fc ? syq_fully_connected_opt(&p, &w, v->input, out, scratch, need)
                   : syq_conv2d_opt(&p, &w, v->input, out, scratch, need);
        t_opt = syq_arm_ticks() - t0;
        ok_opt = rc == SYQ_OK && same(v);
        syq_force_portable(1);
        memset(out, 0x5A, v->out_bytes);
        t0 = syq_arm_ticks();
        rc = v->fc ? syq_fully_connected_opt(&p, &w, v->input, out, scratch, need)
                   : syq_conv2d_opt(&p, &w, v->input, out, scratch, need);
        t_port = syq_arm_ticks() - t0;
        ok_port = rc == SYQ_OK && same(v);
        syq_force_portable(0);
        failures += !ok_ref + !ok_opt + !ok_port;
        printf("VEC %s fc=%d bits=%d macs=%lu scratch=%lu ref=%s opt=%s portable=%s t_ref=%lu t_opt=%lu t_portable=%lu",
               v->name, (int)v->fc, (int)v->bits,
               (unsigned long)((uint32_t)v->out_bytes * (uint32_t)(v->k_h * v->k_w * v->in_c)), (unsigned long)need,
               ok_ref ? "ok" : "FAIL", ok_opt ? "ok" : "FAIL", ok_port ? "ok" : "FAIL", lu(t_ref), lu(t_opt),
               lu(t_port));
        if (v->bench) {
            syq_conv_params c = p;
            int ok8;
            if (v->fc) { c.batch = 1; c.in_h = c.out_h = 1; c.in_w = c.out_w = v->batch; c.stride_h = c.stride_w = 1; }
            memset(out, 0x5A, v->out_bytes);
            t0 = syq_arm_ticks();
            syq_int8_conv(&c, v->w_int8, v->out_c, v->k_h, v->k_w, v->in_c, v->input, out);
            t1 = syq_arm_ticks() - t0;
            ok8 = same(v);
            failures += !ok8;
            printf(" int8=%s t_int8=%lu", ok8 ? "ok" : "FAIL", lu(t1));
#ifdef SYQ_WITH_CMSIS_NN
            {
                uint32_t bb = 0;
                memset(out, 0x5A, v->out_bytes);
                rc = syq_cmsis_run(v, out, &t1, &bb);
                if (rc == 0) {
                    const int okc = same(v);
                    failures += !okc;
                    printf(" cmsis=%s t_cmsis=%lu cmsis_buf=%lu", okc ? "ok" : "FAIL", lu(t1), (unsigned long)bb);
                } else {
                    printf(" cmsis=refused(%d)", rc);
                }
            }
#endif
        }
        printf("\n");
    }
    printf("SUMMARY layers=%d simd=%d failures=%d\n", SYQ_VEC_COUNT, syq_simd_level(), failures);
    return failures ? 1 : 0;
}
