/* Our adapter to CMSIS-NN's int8 kernels (benchmark column only; CMSIS-NN itself is not part of
 * this project: tflite/arm/run.sh builds it from a checkout named by CMSIS_NN_DIR).
 * Conv: arm_convolve_wrapper_s8 (what TFLite Micro calls; arm_convolve_s8 for general kernels,
 * the 1x1 / 1xN variants where they apply).  FC: arm_fully_connected_s8 (one multiplier for the
 * layer) or arm_fully_connected_per_channel_s8; the kernel sums CMSIS-NN wants in ctx.buf are computed
 * before the timed call (arm_vector_sum_s8), as TFLite Micro does once in Prepare. */
#include <string.h>

#include "arm_nnfunctions.h"
#include "check_vectors.h"

uint64_t syq_arm_ticks(void);

#define SYQ_CMSIS_BUF 65536
static int32_t cmsis_buf[SYQ_CMSIS_BUF / 4];
static int32_t mult[4096], shift[4096];

int syq_cmsis_run(const syq_vec *v, int8_t *out, uint64_t *ticks, uint32_t *buf_bytes);

int syq_cmsis_run(const syq_vec *v, int8_t *out, uint64_t *ticks, uint32_t *buf_bytes) {
    cmsis_nn_context ctx;
    cmsis_nn_per_channel_quant_params q;
    arm_cmsis_nn_status st;
    int32_t i, per_channel = 0, need;
    uint64_t t0;
    if (v->out_c > 4096) return -2;
    for (i = 0; i < v->out_c; ++i) {
        mult[i] = v->mult[i];
        shift[i] = v->shift[i];
        per_channel |= mult[i] != mult[0] || shift[i] != shift[0];
    }
    q.multiplier = mult;
    q.shift = shift;
    memset(&ctx, 0, sizeof ctx);
    if (!v->fc) {
        cmsis_nn_conv_params cp;
        cmsis_nn_dims in_d = {v->batch, v->in_h, v->in_w, v->in_c}, f_d = {v->out_c, v->k_h, v->k_w, v->in_c};
        cmsis_nn_dims b_d = {1, 1, 1, v->out_c}, o_d = {v->batch, v->out_h, v->out_w, v->out_c};
        memset(&cp, 0, sizeof cp);
        cp.input_offset = -v->input_zero_point;
        cp.output_offset = v->output_zero_point;
        cp.stride.h = v->stride_h; cp.stride.w = v->stride_w;
        cp.padding.h = v->pad_top; cp.padding.w = v->pad_left;
        cp.dilation.h = cp.dilation.w = 1;
        cp.activation.min = v->act_min; cp.activation.max = v->act_max;
        need = arm_convolve_wrapper_s8_get_buffer_size(&cp, &in_d, &f_d, &o_d);
        if (need > SYQ_CMSIS_BUF) return -3;
        ctx.buf = need > 0 ? cmsis_buf : NULL;
        ctx.size = need;
        t0 = syq_arm_ticks();
        st = arm_convolve_wrapper_s8(&ctx, &cp, &q, &in_d, v->input, &f_d, v->w_int8, &b_d, v->bias, &o_d, out);
        *ticks = syq_arm_ticks() - t0;
    } else {
        cmsis_nn_fc_params fp;
        cmsis_nn_dims in_d = {v->batch, 1, 1, v->in_c}, f_d = {v->in_c, 1, 1, v->out_c};
        cmsis_nn_dims b_d = {1, 1, 1, v->out_c}, o_d = {v->batch, 1, 1, v->out_c};
        memset(&fp, 0, sizeof fp);
        fp.input_offset = -v->input_zero_point;
        fp.filter_offset = 0;
        fp.output_offset = v->output_zero_point;
        fp.activation.min = v->act_min; fp.activation.max = v->act_max;
        need = arm_fully_connected_s8_get_buffer_size(&f_d);
        if (need > SYQ_CMSIS_BUF) return -3;
        if (need > 0) {
            ctx.buf = cmsis_buf;
            ctx.size = need;
            arm_vector_sum_s8(cmsis_buf, v->in_c, v->out_c, v->w_int8, -v->input_zero_point, 0, v->bias);
        }
        t0 = syq_arm_ticks();
        if (per_channel) {
            st = arm_fully_connected_per_channel_s8(&ctx, &fp, &q, &in_d, v->input, &f_d, v->w_int8, &b_d, v->bias,
                                                    &o_d, out);
        } else {
            cmsis_nn_per_tensor_quant_params pt;
            pt.multiplier = mult[0];
            pt.shift = shift[0];
            st = arm_fully_connected_s8(&ctx, &fp, &pt, &in_d, v->input, &f_d, v->w_int8, &b_d, v->bias, &o_d, out);
        }
        *ticks = syq_arm_ticks() - t0;
    }
    *buf_bytes = need > 0 ? (uint32_t)need : 0u;
    return st == ARM_CMSIS_NN_SUCCESS ? 0 : -1;
}
