/* Optimized packed kernels: masked byte sums, output blocking, AVX2 with a portable fallback.
 *
 * Trick: with u = x + 128 in 0..255 (uint8), a code c in {-1,0,+1} per channel and the packed
 * sign plane S (bit = code -1) and non-zero plane Z, the byte  ((u AND Z) XOR S)  equals
 *   u        for code +1,   255 - u   for code -1,   0   for code 0.
 * Summing these bytes (SAD against zero on x86, 16-bit SWAR lanes elsewhere) gives
 *   raw = sum_i c_i u_i + 255 * n_neg
 * and sum_i c_i (x_i - zp) = raw - 255 * n_neg - (zp + 128) * (n_nonzero - 2 n_neg).
 * The correction depends on the weights only (the input is padded with zp), so it is computed once
 * per call and output channel.  No multiply per weight: one multiply per group m_g.
 */
#include "syq_internal.h"

#if !defined(SYQ_NO_SIMD) && (defined(__GNUC__) || defined(__clang__)) && \
    (defined(__x86_64__) || defined(__i386__))
#define SYQ_HAVE_AVX2 1
#include <immintrin.h>
#else
#define SYQ_HAVE_AVX2 0
#endif

#define SYQ_BLOCK 4 /* output positions computed together (mask expansion amortised) */

static int syq_portable_forced = 0;

int syq_force_portable(int force) {
    int prev = syq_portable_forced;
    syq_portable_forced = force ? 1 : 0;
    return prev;
}

int syq_simd_level(void) {
#if SYQ_HAVE_AVX2
    if (!syq_portable_forced && __builtin_cpu_supports("avx2")) return 2;
#endif
    return 0;
}

typedef struct {
    const syq_conv_params *p;
    const syq_packed_weights *w;
    size_t nw;      /* words per kernel pixel and plane */
    size_t ip;      /* padded channel stride in bytes (nw * 32) */
    size_t wp;      /* padded image width */
    size_t hp;      /* padded image height */
    const uint8_t *u; /* padded uint8 image */
    const int32_t *corr;
} syq_ctx;

static size_t syq_align(size_t v) { return (v + 63u) & ~(size_t)63u; }

size_t syq_conv2d_scratch_bytes(const syq_conv_params *p, const syq_packed_weights *w) {
    size_t hp, wp, ip;
    if (!p || !w || w->in_c <= 0 || w->out_c <= 0 || p->out_h <= 0 || p->out_w <= 0) return 0;
    hp = (size_t)(p->out_h - 1) * (size_t)p->stride_h + (size_t)w->k_h;
    wp = (size_t)(p->out_w - 1) * (size_t)p->stride_w + (size_t)w->k_w;
    ip = syq_words_per_pixel(w->in_c) * 32u;
    return 64u + syq_align(hp * wp * ip) + syq_align((size_t)w->out_c * sizeof(int32_t));
}

/* zero-point padded, +128 shifted copy of one image; unused channel bytes are 0. */
static void syq_pad_image(const syq_ctx *c, const int8_t *img, uint8_t *u) {
    const syq_conv_params *p = c->p;
    const int32_t in_c = c->w->in_c;
    const uint8_t pad = (uint8_t)(p->input_zero_point + 128);
    size_t py, px;
    int32_t ch;
    for (py = 0; py < c->hp; ++py) {
        const int32_t iy = (int32_t)py - p->pad_top;
        for (px = 0; px < c->wp; ++px) {
            const int32_t ix = (int32_t)px - p->pad_left;
            uint8_t *dst = u + (py * c->wp + px) * c->ip;
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

/* corr[o] = sum_pix m * (255 n_neg + (zp + 128)(n_nonzero - 2 n_neg)) - bias[o] */
static void syq_corrections(const syq_ctx *c, int32_t *corr) {
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w, zc = c->p->input_zero_point + 128;
    int32_t o, pix;
    size_t j;
    for (o = 0; o < w->out_c; ++o) {
        int32_t total = 0;
        for (pix = 0; pix < kk; ++pix) {
            const uint32_t *sg = w->codes + ((size_t)o * kk + pix) * c->nw * w->bits;
            int32_t nneg = 0, nnz = 0;
            for (j = 0; j < c->nw; ++j) {
                nneg += syq_popcount32(sg[j]);
                nnz += w->bits == 2 ? syq_popcount32(sg[c->nw + j]) : 0;
            }
            if (w->bits == 1) nnz = w->in_c;
            total += (int32_t)w->mag[syq_mag_index(w, o, pix)] * (255 * nneg + zc * (nnz - 2 * nneg));
        }
        corr[o] = total - (c->p->bias ? c->p->bias[o] : 0);
    }
}

/* ---- portable path: 64-bit SWAR ---------------------------------------------------------- */

static uint64_t syq_expand8(uint32_t b) { /* 8 mask bits -> 8 bytes of 0x00 / 0xFF */
    uint64_t t = ((uint64_t)(b & 0xFFu) * 0x0101010101010101ull) & 0x8040201008040201ull;
    t = (((t & 0x7F7F7F7F7F7F7F7Full) + 0x7F7F7F7F7F7F7F7Full) | t) & 0x8080808080808080ull;
    return (t >> 7) * 0xFFull;
}

static uint64_t syq_load64(const uint8_t *b) { /* little-endian load, alignment-free */
    return (uint64_t)b[0] | ((uint64_t)b[1] << 8) | ((uint64_t)b[2] << 16) |
           ((uint64_t)b[3] << 24) | ((uint64_t)b[4] << 32) | ((uint64_t)b[5] << 40) |
           ((uint64_t)b[6] << 48) | ((uint64_t)b[7] << 56);
}

static int64_t syq_lanes16(uint64_t l) {
    return (int64_t)((l & 0xFFFFu) + ((l >> 16) & 0xFFFFu) + ((l >> 32) & 0xFFFFu) + (l >> 48));
}

static void syq_block_portable(const syq_ctx *c, size_t oy, size_t ox0, int np, int8_t *out) {
    const syq_conv_params *p = c->p;
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w, pixel = w->granularity == SYQ_GRAN_PIXEL;
    const size_t sw = (size_t)p->stride_w * c->ip;
    const uint8_t *base = c->u + (oy * (size_t)p->stride_h * c->wp + ox0 * (size_t)p->stride_w) * c->ip;
    int32_t o, pix, q;
    for (o = 0; o < w->out_c; ++o) {
        int64_t tot[SYQ_BLOCK] = {0};
        const uint32_t *sg = w->codes + (size_t)o * kk * c->nw * w->bits;
        const uint8_t *row = base;
        int32_t kx = 0;
        for (pix = 0; pix < kk; ++pix, sg += c->nw * w->bits) {
            const uint8_t *xb = row + (size_t)kx * c->ip;
            uint64_t lanes[SYQ_BLOCK] = {0};
            int64_t acc[SYQ_BLOCK] = {0};
            size_t j;
            int k;
            if (++kx == w->k_w) { kx = 0; row += c->wp * c->ip; }
            for (j = 0; j < c->nw; ++j) {
                const uint32_t s32 = sg[j], z32 = w->bits == 2 ? sg[c->nw + j] : 0xFFFFFFFFu;
                for (k = 0; k < 4; ++k) {
                    const uint64_t ms = syq_expand8(s32 >> (8 * k)), mz = syq_expand8(z32 >> (8 * k));
                    for (q = 0; q < np; ++q) {
                        const uint64_t v = (syq_load64(xb + q * sw + j * 32u + 8u * (size_t)k) & mz) ^ ms;
                        lanes[q] += (v & 0x00FF00FF00FF00FFull) + ((v >> 8) & 0x00FF00FF00FF00FFull);
                    }
                }
                if ((j & 31u) == 31u) /* 128 chunks of <= 510 per 16-bit lane: flush */
                    for (q = 0; q < np; ++q) { acc[q] += syq_lanes16(lanes[q]); lanes[q] = 0; }
            }
            for (q = 0; q < np; ++q) acc[q] += syq_lanes16(lanes[q]);
            if (pixel) {
                const int64_t m = w->mag[syq_mag_index(w, o, pix)];
                for (q = 0; q < np; ++q) tot[q] += m * acc[q];
            } else {
                for (q = 0; q < np; ++q) tot[q] += acc[q];
            }
        }
        for (q = 0; q < np; ++q) {
            int64_t a = pixel ? tot[q] : (int64_t)w->mag[syq_mag_index(w, o, 0)] * tot[q];
            out[(size_t)q * w->out_c + o] = syq_requantize(p, o, (int32_t)(a - c->corr[o]));
        }
    }
}

/* ---- AVX2 path --------------------------------------------------------------------------- */
#if SYQ_HAVE_AVX2
#define SYQ_AVX2 __attribute__((target("avx2")))

static inline SYQ_AVX2 __m256i syq_expand32(uint32_t m) {
    const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)m), shuf);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
}

static inline SYQ_AVX2 int64_t syq_hsum64(__m256i v) {
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

/* NP positions, ternary or not, pixel granularity or not: constants after inlining. */
static inline __attribute__((always_inline)) SYQ_AVX2 void
syq_block_avx2_t(const syq_ctx *c, size_t oy, size_t ox0, int8_t *out, const int NP,
                 const int tern, const int pixel) {
    const syq_conv_params *p = c->p;
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w;
    const size_t sw = (size_t)p->stride_w * c->ip, nw = c->nw;
    const uint8_t *base = c->u + (oy * (size_t)p->stride_h * c->wp + ox0 * (size_t)p->stride_w) * c->ip;
    const __m256i zero = _mm256_setzero_si256();
    int32_t o, pix;
    int q;
    for (o = 0; o < w->out_c; ++o) {
        __m256i tot[SYQ_BLOCK], acc[SYQ_BLOCK];
        for (q = 0; q < NP; ++q) tot[q] = acc[q] = zero;
        const uint32_t *sg = w->codes + (size_t)o * kk * nw * (tern ? 2u : 1u);
        const uint8_t *row = base;
        int32_t kx = 0;
        for (pix = 0; pix < kk; ++pix, sg += nw * (tern ? 2u : 1u)) {
            const uint8_t *xb = row + (size_t)kx * c->ip;
            size_t j;
            if (++kx == w->k_w) { kx = 0; row += c->wp * c->ip; }
            for (j = 0; j < nw; ++j) {
                const __m256i ms = syq_expand32(sg[j]);
                const __m256i mz = tern ? syq_expand32(sg[nw + j]) : zero;
                for (q = 0; q < NP; ++q) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(xb + q * sw + j * 32u));
                    if (tern) v = _mm256_and_si256(v, mz);
                    acc[q] = _mm256_add_epi64(acc[q], _mm256_sad_epu8(_mm256_xor_si256(v, ms), zero));
                }
            }
            if (pixel) { /* one multiply per group (o, pixel) */
                const __m256i m = _mm256_set1_epi64x((long long)w->mag[syq_mag_index(w, o, pix)]);
                for (q = 0; q < NP; ++q) {
                    tot[q] = _mm256_add_epi64(tot[q], _mm256_mul_epu32(acc[q], m));
                    acc[q] = zero;
                }
            }
        }
        for (q = 0; q < NP; ++q) {
            int64_t a = pixel ? syq_hsum64(tot[q])
                              : (int64_t)w->mag[syq_mag_index(w, o, 0)] * syq_hsum64(acc[q]);
            out[(size_t)q * w->out_c + o] = syq_requantize(p, o, (int32_t)(a - c->corr[o]));
        }
    }
}

static SYQ_AVX2 void syq_block_avx2(const syq_ctx *c, size_t oy, size_t ox0, int np, int8_t *out) {
    const int tern = c->w->bits == 2, pixel = c->w->granularity == SYQ_GRAN_PIXEL;
    if (np == SYQ_BLOCK) {
        if (tern) {
            if (pixel) syq_block_avx2_t(c, oy, ox0, out, SYQ_BLOCK, 1, 1);
            else syq_block_avx2_t(c, oy, ox0, out, SYQ_BLOCK, 1, 0);
        } else {
            if (pixel) syq_block_avx2_t(c, oy, ox0, out, SYQ_BLOCK, 0, 1);
            else syq_block_avx2_t(c, oy, ox0, out, SYQ_BLOCK, 0, 0);
        }
    } else {
        int q;
        for (q = 0; q < np; ++q) {
            int8_t *o1 = out + (size_t)q * c->w->out_c;
            if (tern) {
                if (pixel) syq_block_avx2_t(c, oy, ox0 + q, o1, 1, 1, 1);
                else syq_block_avx2_t(c, oy, ox0 + q, o1, 1, 1, 0);
            } else {
                if (pixel) syq_block_avx2_t(c, oy, ox0 + q, o1, 1, 0, 1);
                else syq_block_avx2_t(c, oy, ox0 + q, o1, 1, 0, 0);
            }
        }
    }
}
#endif

int syq_conv2d_opt(const syq_conv_params *p, const syq_packed_weights *w, const int8_t *input,
                   int8_t *output, void *scratch, size_t scratch_bytes) {
    syq_ctx c;
    uint8_t *base;
    int32_t *corr;
    size_t need, oy, ox;
    int32_t n;
    int simd;
    int rc = syq_check_args(p, w, input, output);
    if (rc != SYQ_OK) return rc;
    need = syq_conv2d_scratch_bytes(p, w);
    if (!scratch || scratch_bytes < need) return SYQ_ERR_SCRATCH;
    c.p = p;
    c.w = w;
    c.nw = syq_words_per_pixel(w->in_c);
    c.ip = c.nw * 32u;
    c.hp = (size_t)(p->out_h - 1) * (size_t)p->stride_h + (size_t)w->k_h;
    c.wp = (size_t)(p->out_w - 1) * (size_t)p->stride_w + (size_t)w->k_w;
    base = (uint8_t *)scratch;
    base += (64u - (size_t)((uintptr_t)base & 63u)) & 63u;
    corr = (int32_t *)(void *)(base + syq_align(c.hp * c.wp * c.ip));
    c.u = base;
    c.corr = corr;
    syq_corrections(&c, corr);
    simd = syq_simd_level();
    for (n = 0; n < p->batch; ++n) {
        syq_pad_image(&c, input + (size_t)n * p->in_h * p->in_w * w->in_c, base);
        for (oy = 0; oy < (size_t)p->out_h; ++oy) {
            for (ox = 0; ox < (size_t)p->out_w; ox += SYQ_BLOCK) {
                const size_t left = (size_t)p->out_w - ox;
                const int np = left < SYQ_BLOCK ? (int)left : SYQ_BLOCK;
                int8_t *out = output + (((size_t)n * p->out_h + oy) * p->out_w + ox) * w->out_c;
#if SYQ_HAVE_AVX2
                if (simd == 2) { syq_block_avx2(&c, oy, ox, np, out); continue; }
#endif
                (void)simd;
                syq_block_portable(&c, oy, ox, np, out);
            }
        }
    }
    return SYQ_OK;
}
