/* Optimized packed kernels: AVX2 (vpmaddubsw on expanded codes) with a portable fallback.
 *
 * Portable trick: with u = x + 128 in 0..255 (uint8), a code c in {-1,0,+1} per channel and the packed
 * sign plane S (bit = code -1) and non-zero plane Z, the byte  ((u AND Z) XOR S)  equals
 *   u        for code +1,   255 - u   for code -1,   0   for code 0.
 * Summing these bytes (SAD against zero on x86, 16-bit SWAR lanes elsewhere) gives
 *   raw = sum_i c_i u_i + 255 * n_neg
 * and sum_i c_i (x_i - zp) = raw - 255 * n_neg - (zp + 128) * (n_nonzero - 2 n_neg).
 * The correction depends on the weights only (the input is padded with zp), so it is computed once
 * per call and output channel.  No multiply per weight: one multiply per group m_g.
 *
 * AVX2 (portable path and its corrections unchanged), rows of >= 4 outputs: the codes of one output channel are expanded once per band of output
 * rows into int8 {-1,0,+1} vectors (c = 2*S - Z with S, Z the 0/-1 byte masks; scratch, k_h*k_w*
 * 32*nw bytes) and reused by every output position of the band: per 32 channels and position one
 * load, one vpmaddubsw (u * c, pairs, |.| <= 510) and one 16-bit add; 16-bit lanes are flushed with
 * vpmaddwd by m_g (pixel granularity: one multiply per group, per lane pair) or by 1 at most every
 * 64 words.  This gives raw = sum_i c_i u_i and sum_i c_i (x_i - zp) = raw - (zp+128)(n_nonzero -
 * 2 n_neg).  8 output positions per block (register blocking), 32-bit sums reduced with vphaddd,
 * requantization vectorised over the 8 positions.  Narrow outputs (rows of < 4 positions, e.g.
 * FullyConnected with batch < 4): 1x1 kernels by syq_image_fc (8 output channels per pass over the
 * input, see there), others the same sums with the codes expanded in registers.
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
#if SYQ_HAVE_NEON
    if (!syq_portable_forced) return syq_neon_level();
#endif
#if SYQ_HAVE_CM_DSP
    if (!syq_portable_forced) return syq_cm_level();
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
    return 64u + syq_align(hp * wp * ip) + syq_align((size_t)w->out_c * sizeof(int32_t)) +
           syq_align((size_t)w->k_h * (size_t)w->k_w * ip);
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

/* corr[o] = sum_pix m * (255 n_neg + (zp + 128)(n_nonzero - 2 n_neg)) - bias[o] for the masked byte
 * sums (portable path); the AVX2 path (vpmaddubsw) drops the 255 n_neg term.  Computed modulo
 * 2^32 (unsigned): the kernels' sums wrap the same way and the true accumulator fits int32 as in
 * TFLite. */
static void syq_corrections(const syq_ctx *c, int32_t *corr) {
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w, zc = c->p->input_zero_point + 128;
    int32_t o, pix;
    size_t j;
    for (o = 0; o < w->out_c; ++o) {
        uint32_t total = 0;
        for (pix = 0; pix < kk; ++pix) {
            const uint32_t *sg = w->codes + ((size_t)o * kk + pix) * c->nw * w->bits;
            int32_t nneg = 0, nnz = 0;
            for (j = 0; j < c->nw; ++j) {
                nneg += syq_popcount32(sg[j]);
                nnz += w->bits == 2 ? syq_popcount32(sg[c->nw + j]) : 0;
            }
            if (w->bits == 1) nnz = w->in_c;
            total += (uint32_t)w->mag[syq_mag_index(w, o, pix)] * (uint32_t)(255 * nneg + zc * (nnz - 2 * nneg));
        }
        corr[o] = (int32_t)(total - (uint32_t)(c->p->bias ? c->p->bias[o] : 0));
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

static SYQ_AVX2 __attribute__((target("popcnt"))) int32_t syq_popcnt_hw(uint32_t v) {
    return (int32_t)__builtin_popcount(v);
}

/* popcount of n consecutive words, 64 bits at a time */
static SYQ_AVX2 __attribute__((target("popcnt"))) int32_t syq_popcnt_run(const uint32_t *v, size_t n) {
    int32_t t = 0;
    size_t j = 0;
    for (; j + 2 <= n; j += 2) t += (int32_t)__builtin_popcountll((unsigned long long)v[j] |
                                                                  ((unsigned long long)v[j + 1] << 32));
    if (j < n) t += syq_popcnt_hw(v[j]);
    return t;
}

/* corr[o] = sum_pix m * (zp + 128)(n_nonzero - 2 n_neg) - bias[o] (AVX2 path), hardware popcount */
static SYQ_AVX2 __attribute__((target("popcnt"))) void syq_corrections_hw(const syq_ctx *c, int32_t *corr) {
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w, zc = c->p->input_zero_point + 128;
    const size_t nw = c->nw, pw = nw * (size_t)w->bits;
    int32_t o, pix;
    for (o = 0; o < w->out_c; ++o) {
        const uint32_t *sg = w->codes + (size_t)o * (size_t)kk * pw;
        uint32_t total = 0;
        if (w->granularity != SYQ_GRAN_PIXEL) { /* one magnitude: count over all pixels at once */
            int32_t nneg = 0, nnz = w->in_c * kk;
            if (w->bits == 1) {
                nneg = syq_popcnt_run(sg, (size_t)kk * nw);
            } else {
                for (pix = 0; pix < kk; ++pix, sg += pw) {
                    nneg += syq_popcnt_run(sg, nw);
                    nnz += syq_popcnt_run(sg + nw, nw) - w->in_c;
                }
            }
            total = (uint32_t)w->mag[syq_mag_index(w, o, 0)] * (uint32_t)(zc * (nnz - 2 * nneg));
        } else {
            for (pix = 0; pix < kk; ++pix, sg += pw) {
                const int32_t nneg = syq_popcnt_run(sg, nw);
                const int32_t nnz = w->bits == 2 ? syq_popcnt_run(sg + nw, nw) : w->in_c;
                total += (uint32_t)w->mag[syq_mag_index(w, o, pix)] * (uint32_t)(zc * (nnz - 2 * nneg));
            }
        }
        corr[o] = (int32_t)(total - (uint32_t)(c->p->bias ? c->p->bias[o] : 0));
    }
}

#define SYQ_NPX 8 /* output positions per register block */

/* codes of output channel o -> k_h*k_w*nw vectors of 32 int8 codes in {-1, 0, +1} */
static SYQ_AVX2 void syq_expand_channel(const syq_ctx *c, int32_t o, __m256i *e) {
    const syq_packed_weights *w = c->w;
    const size_t n = (size_t)w->k_h * (size_t)w->k_w * c->nw, nw = c->nw;
    const uint32_t *sg = w->codes + (size_t)o * n * (size_t)w->bits;
    const __m256i one = _mm256_set1_epi8(1);
    size_t pj, j;
    if (w->bits == 1) {
        for (j = 0; j < n; ++j) _mm256_store_si256(e + j, _mm256_or_si256(syq_expand32(sg[j]), one));
        return;
    }
    for (pj = 0; pj < n; pj += nw, sg += 2 * nw)
        for (j = 0; j < nw; ++j) {
            const __m256i ms = syq_expand32(sg[j]), mz = syq_expand32(sg[nw + j]);
            _mm256_store_si256(e + pj + j, _mm256_sub_epi8(_mm256_add_epi8(ms, ms), mz)); /* 2S - Z */
        }
}

/* 8 accumulators of one output channel -> int8, exactly syq_requantize (gemmlowp double rounding)
 * for multiplier >= 0 and -31 <= shift <= 0 (the caller falls back to the scalar code otherwise).
 * The multiplier is positive, so SaturatingRoundingDoublingHighMul works on |x| with the nudge
 * 2^30 - (x < 0) (ties toward zero for negative x, as the truncating division does). */
static inline SYQ_AVX2 __m256i syq_requant8(__m256i acc, int32_t mult, int32_t shift, int32_t zp,
                                            int32_t lo, int32_t hi) {
    const __m256i m = _mm256_set1_epi64x((long long)(uint32_t)mult);
    const __m256i ax = _mm256_abs_epi32(acc), neg = _mm256_srli_epi32(acc, 31);
    const __m256i half = _mm256_set1_epi64x((long long)1 << 30);
    const __m256i lo32 = _mm256_set1_epi64x(0xFFFFFFFFll);
    __m256i pe = _mm256_mul_epu32(ax, m), po = _mm256_mul_epu32(_mm256_srli_epi64(ax, 32), m);
    __m256i v, mask, rem, thr;
    const __m128i cnt = _mm_cvtsi32_si128(-shift);
    pe = _mm256_srli_epi64(_mm256_add_epi64(pe, _mm256_sub_epi64(half, _mm256_and_si256(neg, lo32))), 31);
    po = _mm256_srli_epi64(_mm256_add_epi64(po, _mm256_sub_epi64(half, _mm256_srli_epi64(neg, 32))), 31);
    v = _mm256_sign_epi32(_mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA), acc);
    /* RoundingDivideByPOT(v, -shift) */
    mask = _mm256_set1_epi32((int32_t)((-shift >= 31) ? 0x7FFFFFFFu : ((1u << -shift) - 1u)));
    rem = _mm256_and_si256(v, mask);
    thr = _mm256_add_epi32(_mm256_srli_epi32(mask, 1), _mm256_srli_epi32(v, 31));
    v = _mm256_sub_epi32(_mm256_sra_epi32(v, cnt), _mm256_cmpgt_epi32(rem, thr));
    v = _mm256_add_epi32(v, _mm256_set1_epi32(zp));
    return _mm256_min_epi32(_mm256_max_epi32(v, _mm256_set1_epi32(lo)), _mm256_set1_epi32(hi));
}

/* lane q of the result = sum of the 8 int32 lanes of a[q], q < NP (other lanes 0) */
static inline __attribute__((always_inline)) SYQ_AVX2 __m256i syq_reduce8(const __m256i *a, const int NP) {
    const __m256i z = _mm256_setzero_si256();
    const __m256i t0 = _mm256_hadd_epi32(a[0], NP > 1 ? a[1] : z);
    const __m256i t1 = NP > 2 ? _mm256_hadd_epi32(a[2], NP > 3 ? a[3] : z) : z;
    const __m256i t2 = NP > 4 ? _mm256_hadd_epi32(a[4], NP > 5 ? a[5] : z) : z;
    const __m256i t3 = NP > 6 ? _mm256_hadd_epi32(a[6], NP > 7 ? a[7] : z) : z;
    const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = NP > 4 ? _mm256_hadd_epi32(t2, t3) : z;
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

/* 32 codes as int8 {-1,0,+1} from the packed words (in registers) */
static inline __attribute__((always_inline)) SYQ_AVX2 __m256i syq_code_vec(const uint32_t *sg, size_t j,
                                                                          size_t nw, const int tern) {
    const __m256i ms = syq_expand32(sg[j]);
    if (!tern) return _mm256_or_si256(ms, _mm256_set1_epi8(1));
    return _mm256_sub_epi8(_mm256_add_epi8(ms, ms), syq_expand32(sg[nw + j]));
}

/* NP positions (oy, ox0..ox0+NP-1) of output channel o; codes from the expanded vectors e, or
 * (inreg) expanded in registers from the packed words.
 * pixel granularity: 32-bit sums += vpmaddwd(vpmaddubsw(u, c), m_g) per word;
 * otherwise 16-bit sums += vpmaddubsw(u, c), reduced every 64 words and at the end. */
static inline __attribute__((always_inline)) SYQ_AVX2 void
syq_block_exp_t(const syq_ctx *c, const __m256i *e, int32_t o, size_t oy, size_t ox0, int8_t *out,
                const int NP, const int pixel, const int inreg, const int tern) {
    const syq_conv_params *p = c->p;
    const syq_packed_weights *w = c->w;
    const int32_t kk = w->k_h * w->k_w;
    const size_t sw = (size_t)p->stride_w * c->ip, nw = c->nw;
    const uint8_t *row = c->u + (oy * (size_t)p->stride_h * c->wp + ox0 * (size_t)p->stride_w) * c->ip;
    const __m256i zero = _mm256_setzero_si256(), ones = _mm256_set1_epi16(1);
    const uint8_t *mag = w->mag + (pixel ? (size_t)o * (size_t)kk : 0);
    const size_t pw = nw * (tern ? 2u : 1u); /* packed words per kernel pixel (inreg) */
    const uint32_t *sg = w->codes + (inreg ? (size_t)o * (size_t)kk * pw : 0);
    __m256i acc[SYQ_NPX], sums = zero;
    int32_t pix, kx = 0, cnt = 0;
    int q;
    for (q = 0; q < NP; ++q) acc[q] = zero;
    for (pix = 0; pix < kk; ++pix, e += inreg ? 0 : nw, sg += inreg ? pw : 0) {
        const uint8_t *xb = row + (size_t)kx * c->ip;
        size_t j;
        if (++kx == w->k_w) { kx = 0; row += c->wp * c->ip; }
        if (pixel) {
            const __m256i m = _mm256_set1_epi16((short)mag[pix]);
            for (j = 0; j < nw; ++j) {
                const __m256i cv = inreg ? syq_code_vec(sg, j, nw, tern) : _mm256_load_si256(e + j);
                for (q = 0; q < NP; ++q) {
                    const __m256i u = _mm256_loadu_si256((const __m256i *)(const void *)(xb + q * sw + j * 32u));
                    acc[q] = _mm256_add_epi32(acc[q], _mm256_madd_epi16(_mm256_maddubs_epi16(u, cv), m));
                }
            }
        } else {
            for (j = 0; j < nw; ++j) {
                const __m256i cv = inreg ? syq_code_vec(sg, j, nw, tern) : _mm256_load_si256(e + j);
                for (q = 0; q < NP; ++q) {
                    const __m256i u = _mm256_loadu_si256((const __m256i *)(const void *)(xb + q * sw + j * 32u));
                    acc[q] = _mm256_add_epi16(acc[q], _mm256_maddubs_epi16(u, cv));
                }
                if (++cnt == 64) { /* 64 * 510 <= 32767: reduce the 16-bit lanes */
                    for (q = 0; q < NP; ++q) acc[q] = _mm256_madd_epi16(acc[q], ones);
                    sums = _mm256_add_epi32(sums, syq_reduce8(acc, NP));
                    for (q = 0; q < NP; ++q) acc[q] = zero;
                    cnt = 0;
                }
            }
        }
    }
    if (!pixel)
        for (q = 0; q < NP; ++q) acc[q] = _mm256_madd_epi16(acc[q], ones);
    sums = _mm256_add_epi32(sums, syq_reduce8(acc, NP));
    {
        const int32_t mult = p->out_multiplier[o], shift = p->out_shift[o];
        int32_t v[8];
        if (!pixel) sums = _mm256_mullo_epi32(sums, _mm256_set1_epi32((int32_t)w->mag[syq_mag_index(w, o, 0)]));
        sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(c->corr[o])); /* modulo 2^32 */
        if (mult >= 0 && shift <= 0 && shift >= -31) {
            _mm256_storeu_si256((__m256i *)(void *)v,
                                syq_requant8(sums, mult, shift, p->output_zero_point, p->act_min, p->act_max));
            for (q = 0; q < NP; ++q) out[(size_t)q * w->out_c] = (int8_t)v[q];
        } else {
            _mm256_storeu_si256((__m256i *)(void *)v, sums);
            for (q = 0; q < NP; ++q) out[(size_t)q * w->out_c] = syq_requantize(p, o, v[q]);
        }
    }
}

static SYQ_AVX2 void syq_block_exp(const syq_ctx *c, const __m256i *e, int32_t o, size_t oy, size_t ox0,
                                   int np, int8_t *out) {
    const int pixel = c->w->granularity == SYQ_GRAN_PIXEL;
    if (np == SYQ_NPX) {
        if (pixel) syq_block_exp_t(c, e, o, oy, ox0, out, SYQ_NPX, 1, 0, 0);
        else syq_block_exp_t(c, e, o, oy, ox0, out, SYQ_NPX, 0, 0, 0);
    } else if (np >= 4) {
        if (pixel) syq_block_exp_t(c, e, o, oy, ox0, out, 4, 1, 0, 0);
        else syq_block_exp_t(c, e, o, oy, ox0, out, 4, 0, 0, 0);
        if (np > 4) syq_block_exp(c, e, o, oy, ox0 + 4, np - 4, out + 4 * (size_t)c->w->out_c);
    } else {
        int q;
        for (q = 0; q < np; ++q) {
            if (pixel) syq_block_exp_t(c, e, o, oy, ox0 + q, out + (size_t)q * c->w->out_c, 1, 1, 0, 0);
            else syq_block_exp_t(c, e, o, oy, ox0 + q, out + (size_t)q * c->w->out_c, 1, 0, 0, 0);
        }
    }
}

/* One image: bands of output rows whose padded input rows fit ~32 KB; per band and output channel
 * the codes are expanded once (scratch) and used by every position of the band. */
static SYQ_AVX2 void syq_image_exp(const syq_ctx *c, __m256i *e, int8_t *output) {
    const syq_conv_params *p = c->p;
    const syq_packed_weights *w = c->w;
    const size_t row_bytes = c->wp * c->ip, oh = (size_t)p->out_h, ow = (size_t)p->out_w;
    size_t band = 1, oy0, oy, ox;
    int32_t o;
    if (row_bytes * (size_t)w->k_h < 32768u)
        band = (32768u / row_bytes - (size_t)w->k_h) / (size_t)p->stride_h + 1u;
    for (oy0 = 0; oy0 < oh; oy0 += band) {
        const size_t oy1 = oy0 + band < oh ? oy0 + band : oh;
        for (o = 0; o < w->out_c; ++o) {
            syq_expand_channel(c, o, e);
            for (oy = oy0; oy < oy1; ++oy)
                for (ox = 0; ox < ow; ox += SYQ_NPX) {
                    const int np = ow - ox < SYQ_NPX ? (int)(ow - ox) : SYQ_NPX;
                    syq_block_exp(c, e, o, oy, ox, np, output + (oy * ow + ox) * (size_t)w->out_c + o);
                }
        }
    }
}

/* Narrow outputs (rows of < 4 positions, e.g. FullyConnected with batch < 4): codes expanded in
 * registers (vpbroadcastd from memory, vpshufb, vpcmpeqb) and used once per position. */
static SYQ_AVX2 void syq_image_narrow(const syq_ctx *c, int8_t *output) {
    const syq_packed_weights *w = c->w;
    const int pixel = w->granularity == SYQ_GRAN_PIXEL, tern = w->bits == 2;
    const size_t oh = (size_t)c->p->out_h, ow = (size_t)c->p->out_w;
    size_t oy, ox;
    int32_t o;
    for (oy = 0; oy < oh; ++oy)
        for (o = 0; o < w->out_c; ++o)
            for (ox = 0; ox < ow; ++ox) {
                int8_t *out = output + (oy * ow + ox) * (size_t)w->out_c + o;
                if (tern) {
                    if (pixel) syq_block_exp_t(c, 0, o, oy, ox, out, 1, 1, 1, 1);
                    else syq_block_exp_t(c, 0, o, oy, ox, out, 1, 0, 1, 1);
                } else {
                    if (pixel) syq_block_exp_t(c, 0, o, oy, ox, out, 1, 1, 1, 0);
                    else syq_block_exp_t(c, 0, o, oy, ox, out, 1, 0, 1, 0);
                }
            }
}

/* ---- 1x1 kernels on narrow outputs (FullyConnected, batch < 4) ------------------------------
 * One input position against SYQ_FC_R output channels at a time; the codes are expanded in registers
 * and each 32-byte load of the input is used by the SYQ_FC_R channels.  Expansion of one packed word
 * W: vpbroadcastd + vpsllvd by (0, 1, ..., 7) puts bit 8b + 7 - k of W into the top bit of byte
 * 4k + b, so the input u = x + 128 is stored once per position in that byte order (syq_fc_input) and
 * vpcmpgtb(0, .) gives the 0/-1 byte mask.  Binary: A = sum vpmaddubsw(u, S) = -sum_{c=-1} u, so
 * sum_i c_i u_i = U + 2A with U = sum_i u_i; ternary: A = sum vpmaddubsw(u, vpblendvb(Z mask, 1, S))
 * = -sum_i c_i u_i (vpblendvb reads the top bit of the shifted sign word directly).  Two words per
 * step, 16-bit lanes flushed with vpmaddwd every 64 words (64 * 510 <= 32767) into one vector of
 * SYQ_FC_R 32-bit sums.  The weight-only term (zp + 128) * sum_i c_i comes from 64-bit popcounts of
 * the same words (integer ports, in the shadow of the vector work: no pass over all codes per call);
 * requantization is vectorised over the SYQ_FC_R channels (per-lane multiplier and shift). */
#define SYQ_FC_R 8

/* syq_requant8 with per-lane multiplier (>= 0) and shift (-31..0) */
static inline SYQ_AVX2 __m256i syq_requant8v(__m256i acc, __m256i mult, __m256i shift, int32_t zp,
                                             int32_t lo, int32_t hi) {
    const __m256i ax = _mm256_abs_epi32(acc), neg = _mm256_srli_epi32(acc, 31);
    const __m256i half = _mm256_set1_epi64x((long long)1 << 30);
    const __m256i lo32 = _mm256_set1_epi64x(0xFFFFFFFFll);
    const __m256i rs = _mm256_sub_epi32(_mm256_setzero_si256(), shift); /* 0..31 */
    const __m256i one = _mm256_set1_epi32(1);
    __m256i pe = _mm256_mul_epu32(ax, mult);
    __m256i po = _mm256_mul_epu32(_mm256_srli_epi64(ax, 32), _mm256_srli_epi64(mult, 32));
    __m256i v, mask, rem, thr;
    pe = _mm256_srli_epi64(_mm256_add_epi64(pe, _mm256_sub_epi64(half, _mm256_and_si256(neg, lo32))), 31);
    po = _mm256_srli_epi64(_mm256_add_epi64(po, _mm256_sub_epi64(half, _mm256_srli_epi64(neg, 32))), 31);
    v = _mm256_sign_epi32(_mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA), acc);
    /* RoundingDivideByPOT(v, rs): mask 2^rs - 1 (rs = 31: 0x7FFFFFFF) */
    mask = _mm256_sub_epi32(_mm256_sllv_epi32(one, rs), one);
    rem = _mm256_and_si256(v, mask);
    thr = _mm256_add_epi32(_mm256_srli_epi32(mask, 1), _mm256_srli_epi32(v, 31));
    v = _mm256_sub_epi32(_mm256_srav_epi32(v, rs), _mm256_cmpgt_epi32(rem, thr));
    v = _mm256_add_epi32(v, _mm256_set1_epi32(zp));
    return _mm256_min_epi32(_mm256_max_epi32(v, _mm256_set1_epi32(lo)), _mm256_set1_epi32(hi));
}

/* 32 int8 inputs -> u = x + 128 in the expansion's byte order (byte 4k + b <- input 8b + 7 - k) */
static inline SYQ_AVX2 __m256i syq_fc_perm(__m256i x) {
    const __m256i sel = _mm256_setr_epi8(7, 15, 6, 14, 5, 13, 4, 12, 3, 11, 2, 10, 1, 9, 0, 8,
                                         7, 15, 6, 14, 5, 13, 4, 12, 3, 11, 2, 10, 1, 9, 0, 8);
    const __m256i t = _mm256_shuffle_epi8(_mm256_xor_si256(x, _mm256_set1_epi8((char)0x80)), sel);
    const __m256i s = _mm256_permute4x64_epi64(t, 0x4E); /* 128-bit halves swapped */
    return _mm256_permute2x128_si256(_mm256_unpacklo_epi16(t, s), _mm256_unpackhi_epi16(t, s), 0x20);
}

/* in_c int8 inputs -> ip bytes of permuted u (0 past in_c); returns U = sum of u */
static SYQ_AVX2 int32_t syq_fc_input(const int8_t *x, int32_t in_c, size_t nw, uint8_t *u) {
    __m256i t = _mm256_setzero_si256();
    size_t j, full = (size_t)in_c / 32u;
    for (j = 0; j < nw; ++j) {
        __m256i v;
        if (j < full) {
            v = _mm256_loadu_si256((const __m256i *)(const void *)(x + 32u * j));
        } else { /* tail: -128 (u = 0) past in_c */
            int8_t tmp[32];
            int32_t i;
            for (i = 0; i < 32; ++i) tmp[i] = (int32_t)(32u * j) + i < in_c ? x[32u * j + (size_t)i] : (int8_t)-128;
            v = _mm256_loadu_si256((const __m256i *)(const void *)tmp);
        }
        v = syq_fc_perm(v);
        _mm256_store_si256((__m256i *)(void *)(u + 32u * j), v);
        t = _mm256_add_epi64(t, _mm256_sad_epu8(v, _mm256_setzero_si256()));
    }
    {
        const __m128i h = _mm_add_epi64(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        return (int32_t)(_mm_cvtsi128_si64(h) + _mm_extract_epi64(h, 1));
    }
}

/* top bit of byte 4k + b = bit 8b + 7 - k of the word */
static inline __attribute__((always_inline)) SYQ_AVX2 __m256i syq_fc_bits(const uint32_t *wp, __m256i sh) {
    return _mm256_sllv_epi32(_mm256_set1_epi32((int)*wp), sh);
}

/* words j (and j + 1 if two) of one code row sg (sg[nw..]: ternary non-zero plane) against the
 * inputs u0 (u1): *acc += vpmaddubsw(u, mask), *pc += popcount (n_neg binary, n_pos - n_neg
 * ternary). */
static inline __attribute__((always_inline)) SYQ_AVX2 __attribute__((target("popcnt"))) void
syq_fc_row(const uint32_t *sg, size_t nw, __m256i u0, __m256i u1, __m256i *acc, int64_t *pc,
           const int tern, const int two) {
    const __m256i zero = _mm256_setzero_si256(), one8 = _mm256_set1_epi8(1);
    const __m256i sh = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    unsigned long long qs = sg[0];
    if (two) __builtin_memcpy(&qs, sg, 8);
    if (tern) { /* -c = Z ? (S ? +1 : -1) : 0 = blendv(Z mask, 1, S) */
        unsigned long long qz = sg[nw];
        __m256i a;
        if (two) __builtin_memcpy(&qz, sg + nw, 8);
        *pc += (int64_t)__builtin_popcountll(qz) - 2 * (int64_t)__builtin_popcountll(qs);
        a = _mm256_maddubs_epi16(u0, _mm256_blendv_epi8(_mm256_cmpgt_epi8(zero, syq_fc_bits(sg + nw, sh)), one8,
                                                        syq_fc_bits(sg, sh)));
        if (two)
            a = _mm256_add_epi16(a, _mm256_maddubs_epi16(u1, _mm256_blendv_epi8(
                                        _mm256_cmpgt_epi8(zero, syq_fc_bits(sg + nw + 1, sh)), one8, syq_fc_bits(sg + 1, sh))));
        *acc = _mm256_add_epi16(*acc, a);
    } else { /* vpmaddubsw(u, S mask) = -(u_a + u_b) over code -1 */
        __m256i a = _mm256_maddubs_epi16(u0, _mm256_cmpgt_epi8(zero, syq_fc_bits(sg, sh)));
        *pc += (int64_t)__builtin_popcountll(qs);
        if (two) a = _mm256_add_epi16(a, _mm256_maddubs_epi16(u1, _mm256_cmpgt_epi8(zero, syq_fc_bits(sg + 1, sh))));
        *acc = _mm256_add_epi16(*acc, a);
    }
}

/* syq_fc_row for R rows of base, pw words apart (unrolled: accumulators stay in registers) */
static inline __attribute__((always_inline)) SYQ_AVX2 void
syq_fc_step(const uint32_t *base, size_t pw, size_t nw, size_t j, __m256i u0, __m256i u1, __m256i *acc,
            int64_t *pc, const int R, const int tern, const int two) {
    syq_fc_row(base + j, nw, u0, u1, &acc[0], &pc[0], tern, two);
    if (R > 1) {
        syq_fc_row(base + pw + j, nw, u0, u1, &acc[1], &pc[1], tern, two);
        syq_fc_row(base + 2 * pw + j, nw, u0, u1, &acc[2], &pc[2], tern, two);
        syq_fc_row(base + 3 * pw + j, nw, u0, u1, &acc[3], &pc[3], tern, two);
    }
    if (R > 4) {
        syq_fc_row(base + 4 * pw + j, nw, u0, u1, &acc[4], &pc[4], tern, two);
        syq_fc_row(base + 5 * pw + j, nw, u0, u1, &acc[5], &pc[5], tern, two);
        syq_fc_row(base + 6 * pw + j, nw, u0, u1, &acc[6], &pc[6], tern, two);
        syq_fc_row(base + 7 * pw + j, nw, u0, u1, &acc[7], &pc[7], tern, two);
    }
}

/* R channels o0..o0+R-1 (consecutive code rows) at one input position u (permuted, sum U).
 * The codes' popcounts run on the integer ports in the shadow of the vector work. */
static inline __attribute__((always_inline)) SYQ_AVX2 __attribute__((target("popcnt"))) void
syq_fc_block_t(const syq_ctx *c, const uint8_t *u, int32_t U, int32_t o0, int8_t *out, const int R,
               const int tern) {
    const syq_conv_params *p = c->p;
    const syq_packed_weights *w = c->w;
    const size_t nw = c->nw, pw = nw * (tern ? 2u : 1u);
    const int32_t zc = p->input_zero_point + 128;
    const __m256i zero = _mm256_setzero_si256(), ones16 = _mm256_set1_epi16(1);
    const uint32_t *base = w->codes + (size_t)o0 * pw;
    __m256i acc[SYQ_FC_R], sums = zero;
    int64_t pc[SYQ_FC_R];
    int32_t cnt[SYQ_FC_R], mag[SYQ_FC_R], bias[SYQ_FC_R], mult[SYQ_FC_R], shift[SYQ_FC_R];
    int32_t r, vec_ok = 1;
    size_t j0, j;
    for (r = 0; r < R; ++r) {
        acc[r] = zero;
        pc[r] = 0;
    }
    for (j0 = 0; j0 < nw; j0 += 64) { /* 64 words: |16-bit lane| <= 64 * 510 */
        const size_t j1 = j0 + 64 < nw ? j0 + 64 : nw;
        for (j = j0; j + 2 <= j1; j += 2)
            syq_fc_step(base, pw, nw, j, _mm256_load_si256((const __m256i *)(const void *)(u + 32u * j)),
                        _mm256_load_si256((const __m256i *)(const void *)(u + 32u * j + 32u)), acc, pc, R, tern, 1);
        if (j < j1)
            syq_fc_step(base, pw, nw, j, _mm256_load_si256((const __m256i *)(const void *)(u + 32u * j)), zero,
                        acc, pc, R, tern, 0);
        for (r = 0; r < R; ++r) acc[r] = _mm256_madd_epi16(acc[r], ones16);
        sums = _mm256_add_epi32(sums, syq_reduce8(acc, R));
        for (r = 0; r < R; ++r) acc[r] = zero;
    }
    for (r = 0; r < SYQ_FC_R; ++r) {
        const int32_t o = o0 + (r < R ? r : 0);
        cnt[r] = tern ? (int32_t)pc[r < R ? r : 0] : w->in_c - 2 * (int32_t)pc[r < R ? r : 0]; /* sum of codes */
        mag[r] = (int32_t)w->mag[syq_mag_index(w, o, 0)];
        bias[r] = p->bias ? p->bias[o] : 0;
        mult[r] = p->out_multiplier[o];
        shift[r] = p->out_shift[o];
        if (mult[r] < 0 || shift[r] > 0 || shift[r] < -31) vec_ok = 0;
    }
    {
        const __m256i vcnt = _mm256_loadu_si256((const __m256i *)(const void *)cnt);
        const __m256i vmag = _mm256_loadu_si256((const __m256i *)(const void *)mag);
        const __m256i vbias = _mm256_loadu_si256((const __m256i *)(const void *)bias);
        /* sum_i c_i u_i: binary U + 2A, ternary -A */
        __m256i s = tern ? _mm256_sub_epi32(zero, sums) : _mm256_add_epi32(_mm256_set1_epi32(U), _mm256_add_epi32(sums, sums));
        int32_t v[SYQ_FC_R];
        s = _mm256_sub_epi32(s, _mm256_mullo_epi32(vcnt, _mm256_set1_epi32(zc))); /* sum c (x - zp) */
        s = _mm256_add_epi32(_mm256_mullo_epi32(s, vmag), vbias);                  /* modulo 2^32 */
        if (vec_ok) {
            _mm256_storeu_si256((__m256i *)(void *)v,
                                syq_requant8v(s, _mm256_loadu_si256((const __m256i *)(const void *)mult),
                                              _mm256_loadu_si256((const __m256i *)(const void *)shift),
                                              p->output_zero_point, p->act_min, p->act_max));
            for (r = 0; r < R; ++r) out[r] = (int8_t)v[r];
        } else {
            _mm256_storeu_si256((__m256i *)(void *)v, s);
            for (r = 0; r < R; ++r) out[r] = syq_requantize(p, o0 + r, v[r]);
        }
    }
}

static SYQ_AVX2 void syq_fc_bin8(const syq_ctx *c, const uint8_t *u, int32_t U, int32_t o0, int8_t *out) {
    syq_fc_block_t(c, u, U, o0, out, SYQ_FC_R, 0);
}
static SYQ_AVX2 void syq_fc_tern8(const syq_ctx *c, const uint8_t *u, int32_t U, int32_t o0, int8_t *out) {
    syq_fc_block_t(c, u, U, o0, out, SYQ_FC_R, 1);
}
static SYQ_AVX2 void syq_fc_bin1(const syq_ctx *c, const uint8_t *u, int32_t U, int32_t o0, int8_t *out) {
    syq_fc_block_t(c, u, U, o0, out, 1, 0);
}
static SYQ_AVX2 void syq_fc_tern1(const syq_ctx *c, const uint8_t *u, int32_t U, int32_t o0, int8_t *out) {
    syq_fc_block_t(c, u, U, o0, out, 1, 1);
}

/* 1x1 kernel (no padding), rows of < 4 outputs (FullyConnected with batch < 4): per output position
 * the permuted input in scratch, then blocks of SYQ_FC_R channels (the last block overlaps the one
 * before it when out_c is no multiple of SYQ_FC_R; single channels when out_c < SYQ_FC_R). */
static SYQ_AVX2 void syq_image_fc(const syq_ctx *c, const int8_t *img, uint8_t *u, int8_t *output) {
    const syq_conv_params *p = c->p;
    const syq_packed_weights *w = c->w;
    const size_t oh = (size_t)p->out_h, ow = (size_t)p->out_w;
    const int tern = w->bits == 2;
    size_t oy, ox;
    int32_t o;
    for (oy = 0; oy < oh; ++oy)
        for (ox = 0; ox < ow; ++ox) {
            const int8_t *x = img + ((oy * (size_t)p->stride_h) * (size_t)p->in_w + ox * (size_t)p->stride_w) * (size_t)w->in_c;
            int8_t *out = output + (oy * ow + ox) * (size_t)w->out_c;
            const int32_t U = syq_fc_input(x, w->in_c, c->nw, u);
            if (w->out_c < SYQ_FC_R) {
                for (o = 0; o < w->out_c; ++o) {
                    if (tern) syq_fc_tern1(c, u, U, o, out + o);
                    else syq_fc_bin1(c, u, U, o, out + o);
                }
                continue;
            }
            for (o = 0; o < w->out_c; o += SYQ_FC_R) {
                const int32_t o0 = o + SYQ_FC_R <= w->out_c ? o : w->out_c - SYQ_FC_R;
                if (tern) syq_fc_tern8(c, u, U, o0, out + o0);
                else syq_fc_bin8(c, u, U, o0, out + o0);
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
    simd = syq_simd_level();
#if SYQ_HAVE_NEON
    if (simd >= 3) return syq_conv2d_neon(p, w, input, output, scratch, simd); /* syq_neon.c */
#endif
#if SYQ_HAVE_CM_DSP
    if (simd >= 5) return syq_conv2d_cm(p, w, input, output, scratch); /* syq_cm.c */
#endif
#if SYQ_HAVE_AVX2
    if (simd == 2) {
        /* expanded-code path for rows of >= 4 outputs, codes expanded in registers otherwise */
        __m256i *e = (__m256i *)(void *)((uint8_t *)corr + syq_align((size_t)w->out_c * sizeof(int32_t)));
        const int fc = p->out_w < 4 && w->k_h == 1 && w->k_w == 1; /* 1x1, narrow: syq_image_fc */
        if (!fc) syq_corrections_hw(&c, corr);
        for (n = 0; n < p->batch; ++n) {
            const int8_t *img = input + (size_t)n * p->in_h * p->in_w * w->in_c;
            int8_t *img_out = output + (size_t)n * p->out_h * p->out_w * w->out_c;
            if (fc) {
                syq_image_fc(&c, img, base, img_out);
                continue;
            }
            syq_pad_image(&c, img, base);
            if (p->out_w >= 4) syq_image_exp(&c, e, img_out);
            else syq_image_narrow(&c, img_out);
        }
        return SYQ_OK;
    }
#endif
    (void)simd;
    syq_corrections(&c, corr);
    for (n = 0; n < p->batch; ++n) {
        syq_pad_image(&c, input + (size_t)n * p->in_h * p->in_w * w->in_c, base);
        for (oy = 0; oy < (size_t)p->out_h; ++oy) {
            for (ox = 0; ox < (size_t)p->out_w; ox += SYQ_BLOCK) {
                const size_t left = (size_t)p->out_w - ox;
                const int np = left < SYQ_BLOCK ? (int)left : SYQ_BLOCK;
                int8_t *out = output + (((size_t)n * p->out_h + oy) * p->out_w + ox) * w->out_c;
                syq_block_portable(&c, oy, ox, np, out);
            }
        }
    }
    return SYQ_OK;
}
