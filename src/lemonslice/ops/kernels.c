/* Quantized matrix kernels for lemonslice, loaded with ctypes (see kernels.py).
 *
 * ls_qmatmul: Y[t, r] = sum_c W[r, c] * X[t, c] with W kept as ggml blocks. Each block is
 * decoded into a small scratch and multiplied into lane-wise accumulators, so the weight is
 * read once and never expanded.
 * ls_qmatmul_q8: the same product with the activations rounded to 8 bits per block, as
 * llama.cpp does: integer dot products of weight codes and activation codes, one float
 * scale per block (see the section "8-bit activations" below).
 * ls_dequant: rows of ggml blocks to float32, equal bit for bit to ggml/gguf-py
 * (built with -ffp-contract=off so products are rounded as theirs are).
 */
#include "kernels_common.h"
#if defined(__SSE__)
#include <xmmintrin.h> /* _mm_setcsr: the delta rule flushes denormals */
#endif


/* ---- block decoders: one block of bytes -> float32 values (ggml's arithmetic) ---- */

static void deq_q4_0(const uint8_t *b, float *y) {
    const float d = f16_to_f32(rd16(b));
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = (float)((int)(qs[j] & 0xF) - 8) * d;
        y[j + 16] = (float)((int)(qs[j] >> 4) - 8) * d;
    }
}

static void deq_q4_1(const uint8_t *b, float *y) {
    const float d = f16_to_f32(rd16(b)), m = f16_to_f32(rd16(b + 2));
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        y[j] = (float)(qs[j] & 0xF) * d + m;
        y[j + 16] = (float)(qs[j] >> 4) * d + m;
    }
}

static void deq_q5_0(const uint8_t *b, float *y) {
    const float d = f16_to_f32(rd16(b));
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        const int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (float)(((qs[j] & 0xF) | h0) - 16) * d;
        y[j + 16] = (float)(((qs[j] >> 4) | h1) - 16) * d;
    }
}

static void deq_q5_1(const uint8_t *b, float *y) {
    const float d = f16_to_f32(rd16(b)), m = f16_to_f32(rd16(b + 2));
    uint32_t qh;
    memcpy(&qh, b + 4, 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        const int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (float)((qs[j] & 0xF) | h0) * d + m;
        y[j + 16] = (float)((qs[j] >> 4) | h1) * d + m;
    }
}

static void deq_q8_0(const uint8_t *b, float *y) {
    const float d = f16_to_f32(rd16(b));
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = (float)qs[j] * d;
}

static void deq_q4_k(const uint8_t *b, float *y) {
    const float d = f16_to_f32(rd16(b)), dmin = f16_to_f32(rd16(b + 2));
    const uint8_t *scales = b + 4, *q = b + 16;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
        uint8_t sc, m;
        scale_min_k4(is, scales, &sc, &m);
        const float d1 = d * sc, m1 = dmin * m;
        scale_min_k4(is + 1, scales, &sc, &m);
        const float d2 = d * sc, m2 = dmin * m;
        for (int l = 0; l < 32; l++) y[j + l] = d1 * (float)(q[l] & 0xF) - m1;
        for (int l = 0; l < 32; l++) y[j + 32 + l] = d2 * (float)(q[l] >> 4) - m2;
    }
}

static void deq_q5_k(const uint8_t *b, float *y) {
    const float d = f16_to_f32(rd16(b)), dmin = f16_to_f32(rd16(b + 2));
    const uint8_t *scales = b + 4, *qh = b + 16, *ql = b + 48;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0, is = 0; j < 256; j += 64, is += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
        uint8_t sc, m;
        scale_min_k4(is, scales, &sc, &m);
        const float d1 = d * sc, m1 = dmin * m;
        scale_min_k4(is + 1, scales, &sc, &m);
        const float d2 = d * sc, m2 = dmin * m;
        for (int l = 0; l < 32; l++) y[j + l] = d1 * (float)((ql[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
        for (int l = 0; l < 32; l++) y[j + 32 + l] = d2 * (float)((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    }
}

static void deq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = f16_to_f32(rd16(b + 208));
    for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8) {
        for (int is = 0; is < 2; is++) {  /* halves of 16 share one scale each */
            const float d1 = d * sc[is], d2 = d * sc[is + 2], d3 = d * sc[is + 4], d4 = d * sc[is + 6];
            for (int l = 16 * is; l < 16 * is + 16; l++) {
                const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[n + l] = d1 * q1;
                y[n + l + 32] = d2 * q2;
                y[n + l + 64] = d3 * q3;
                y[n + l + 96] = d4 * q4;
            }
        }
    }
}

static void deq_f16(const uint8_t *b, float *y) { y[0] = f16_to_f32(rd16(b)); }
static void deq_bf16(const uint8_t *b, float *y) { y[0] = bf16_to_f32(rd16(b)); }
static void deq_f32(const uint8_t *b, float *y) { memcpy(y, b, 4); }

static int type_info(int type, int *block, int *bytes, deq_fn *fn) {
    switch (type) {
    case T_F32: *block = 1; *bytes = 4; *fn = deq_f32; return 0;
    case T_F16: *block = 1; *bytes = 2; *fn = deq_f16; return 0;
    case T_BF16: *block = 1; *bytes = 2; *fn = deq_bf16; return 0;
    case T_Q4_0: *block = 32; *bytes = 18; *fn = deq_q4_0; return 0;
    case T_Q4_1: *block = 32; *bytes = 20; *fn = deq_q4_1; return 0;
    case T_Q5_0: *block = 32; *bytes = 22; *fn = deq_q5_0; return 0;
    case T_Q5_1: *block = 32; *bytes = 24; *fn = deq_q5_1; return 0;
    case T_Q8_0: *block = 32; *bytes = 34; *fn = deq_q8_0; return 0;
    case T_Q4_K: *block = 256; *bytes = 144; *fn = deq_q4_k; return 0;
    case T_Q5_K: *block = 256; *bytes = 176; *fn = deq_q5_k; return 0;
    case T_Q6_K: *block = 256; *bytes = 210; *fn = deq_q6_k; return 0;
    default: return types_info(type, block, bytes, fn);
    }
}

int ls_supported(int type) {
    int block, bytes;
    deq_fn fn;
    return type_info(type, &block, &bytes, &fn) == 0;
}

/* Rows [nrows] of `ncols` values each (row stride `row_bytes`) -> dst [nrows, ncols]. */
int ls_dequant(int type, const uint8_t *src, int64_t row_bytes, int64_t nrows, int64_t ncols,
               float *dst, int nthreads) {
    int block, bytes;
    deq_fn fn;
    if (type_info(type, &block, &bytes, &fn) || ncols % block) return -1;
    const int64_t nb = ncols / block;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < nrows; r++) {
        const uint8_t *row = src + r * row_bytes;
        float *y = dst + r * ncols;
        for (int64_t i = 0; i < nb; i++) fn(row + i * bytes, y + i * block);
    }
    return 0;
}

/* ---- fused dot products: one weight row against T activation rows ---- */

#if defined(__AVX2__) && defined(__FMA__)
/* A[t][0..3] += w[0..31] * x_t[0..31] for every activation row, w = scale * code - minus
   for the 32 int8 or uint8 codes in qb. */
static inline void acc32(__m256 A[][4], const uint8_t *qb, int is_signed, __m256 scale, __m256 minus,
                         const float *X, int64_t ldx, int64_t c0, int T) {
    __m256 w[4];
    for (int k = 0; k < 4; k++) {
        const __m128i q8 = _mm_loadl_epi64((const __m128i *)(qb + 8 * k));
        const __m256i q32 = is_signed ? _mm256_cvtepi8_epi32(q8) : _mm256_cvtepu8_epi32(q8);
        w[k] = _mm256_fmsub_ps(scale, _mm256_cvtepi32_ps(q32), minus);
    }
    for (int t = 0; t < T; t++) {
        const float *x = X + t * ldx + c0;
        for (int k = 0; k < 4; k++) A[t][k] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + 8 * k), A[t][k]);
    }
}

static inline void hsum_rows(__m256 A[][4], int T, float *acc) {
    for (int t = 0; t < T; t++) {
        float v[8];
        _mm256_storeu_ps(v, _mm256_add_ps(_mm256_add_ps(A[t][0], A[t][1]), _mm256_add_ps(A[t][2], A[t][3])));
        acc[t] += ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    }
}

/* Q8_0 with AVX2: widen 8 int8 at a time to float, scale by d, accumulate with FMA. */
static void row_q8_0_avx2(const uint8_t *row, int64_t nb, const float *X, int64_t ldx, int T, float *acc) {
    __m256 A[MAXT][4];
    for (int t = 0; t < T; t++)
        for (int k = 0; k < 4; k++) A[t][k] = _mm256_setzero_ps();
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = row + i * 34;
        acc32(A, b + 2, 1, _mm256_set1_ps(f16_to_f32(rd16(b))), zero, X, ldx, i * 32, T);
    }
    hsum_rows(A, T, acc);
}

/* Q5_0 with AVX2: nibbles plus the fifth bit, minus 16, as 32 int8; then as Q8_0. */
static void row_q5_0_avx2(const uint8_t *row, int64_t nb, const float *X, int64_t ldx, int T, float *acc) {
    __m256 A[MAXT][4];
    for (int t = 0; t < T; t++)
        for (int k = 0; k < 4; k++) A[t][k] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F), b16 = _mm256_set1_epi8(0x10);
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = row + i * 22;
        const __m256 d = _mm256_set1_ps(f16_to_f32(rd16(b)));
        uint32_t qh;
        memcpy(&qh, b + 2, 4);
        const __m128i qs = _mm_loadu_si128((const __m128i *)(b + 6));
        /* bytes 0..15: low nibbles (values 0..15); bytes 16..31: high nibbles (values 16..31) */
        const __m256i nib = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), low4);
        const __m256i hi = _mm256_and_si256(bits_to_bytes(qh), b16);
        const __m256i q = _mm256_sub_epi8(_mm256_or_si256(nib, hi), b16);  /* int8 in [-16, 15] */
        int8_t qb[32];
        _mm256_storeu_si256((__m256i *)qb, q);
        acc32(A, (const uint8_t *)qb, 1, d, zero, X, ldx, i * 32, T);
    }
    hsum_rows(A, T, acc);
}

/* Q4_K with AVX2: per 64 values, low nibbles (scale 1) and high nibbles (scale 2), each value d*sc*q - dmin*m. */
static void row_q4_k_avx2(const uint8_t *row, int64_t nb, const float *X, int64_t ldx, int T, float *acc) {
    __m256 A[MAXT][4];
    for (int t = 0; t < T; t++)
        for (int k = 0; k < 4; k++) A[t][k] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    uint8_t qb[64];
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = row + i * 144;
        const float d = f16_to_f32(rd16(b)), dmin = f16_to_f32(rd16(b + 2));
        const uint8_t *scales = b + 4, *qs = b + 16;
        for (int k = 0; k < 4; k++, qs += 32) {
            uint8_t sc1, m1, sc2, m2;
            scale_min_k4(2 * k, scales, &sc1, &m1);
            scale_min_k4(2 * k + 1, scales, &sc2, &m2);
            const __m256i q = _mm256_loadu_si256((const __m256i *)qs);
            _mm256_storeu_si256((__m256i *)qb, _mm256_and_si256(q, low4));
            _mm256_storeu_si256((__m256i *)(qb + 32), _mm256_and_si256(_mm256_srli_epi16(q, 4), low4));
            const int64_t c0 = i * 256 + k * 64;
            acc32(A, qb, 0, _mm256_set1_ps(d * sc1), _mm256_set1_ps(dmin * m1), X, ldx, c0, T);
            acc32(A, qb + 32, 0, _mm256_set1_ps(d * sc2), _mm256_set1_ps(dmin * m2), X, ldx, c0 + 32, T);
        }
    }
    hsum_rows(A, T, acc);
}

/* Q6_K with AVX2: 6-bit codes (4 low bits in ql, 2 high in qh) minus 32, one int8 scale per 16. */
static void row_q6_k_avx2(const uint8_t *row, int64_t nb, const float *X, int64_t ldx, int T, float *acc) {
    __m256 A[MAXT][4];
    for (int t = 0; t < T; t++)
        for (int k = 0; k < 4; k++) A[t][k] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03), b32 = _mm256_set1_epi8(32);
    int8_t qb[128];
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = row + i * 210;
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        const float d = f16_to_f32(rd16(b + 208));
        for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
            const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(h, two), 4);
            const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), two), 4);
            const __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), two), 4);
            const __m256i h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), two), 4);
            _mm256_storeu_si256((__m256i *)qb, _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(l0, low4), h0), b32));
            _mm256_storeu_si256((__m256i *)(qb + 32),
                                _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(l1, low4), h1), b32));
            _mm256_storeu_si256((__m256i *)(qb + 64),
                                _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), h2), b32));
            _mm256_storeu_si256((__m256i *)(qb + 96),
                                _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4), h3), b32));
            /* qb[32*g + l]: group g of 32 values uses scale sc[2*g + l/16] */
            for (int g = 0; g < 4; g++) {
                const int64_t c0 = i * 256 + n + 32 * g;
                __m256 w[4];
                for (int k = 0; k < 4; k++) {
                    const __m128i q8 = _mm_loadl_epi64((const __m128i *)(qb + 32 * g + 8 * k));
                    const __m256 s = _mm256_set1_ps(d * sc[2 * g + k / 2]);
                    w[k] = _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
                }
                for (int t = 0; t < T; t++) {
                    const float *x = X + t * ldx + c0;
                    for (int k = 0; k < 4; k++) A[t][k] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + 8 * k), A[t][k]);
                }
            }
        }
    }
    hsum_rows(A, T, acc);
}
#endif

/* Y [T, nrows] = X [T, ncols] @ W.T, W = nrows rows of ggml blocks (stride row_bytes). T <= MAXT. */
int ls_qmatmul(int type, const uint8_t *W, int64_t row_bytes, int64_t nrows, int64_t ncols,
               const float *X, int64_t T, float *Y, int nthreads) {
    int block, bytes;
    deq_fn fn;
    if (type_info(type, &block, &bytes, &fn) || block == 1 || ncols % block || T < 1 || T > MAXT) return -1;
    const int64_t nb = ncols / block;
    /* Dynamic chunks: a thread that the OS preempts does not hold the whole product back. */
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
    for (int64_t r = 0; r < nrows; r++) {
        float acc[MAXT] = {0};
        const uint8_t *row = W + r * row_bytes;
        switch (type) {
#if defined(__AVX2__) && defined(__FMA__)
        case T_Q8_0: row_q8_0_avx2(row, nb, X, ncols, (int)T, acc); break;
#else
        case T_Q8_0: row_any(deq_q8_0, 32, 34, row, nb, X, ncols, (int)T, acc); break;
#endif
#if defined(__AVX2__) && defined(__FMA__)
        case T_Q5_0: row_q5_0_avx2(row, nb, X, ncols, (int)T, acc); break;
#else
        case T_Q5_0: row_any(deq_q5_0, 32, 22, row, nb, X, ncols, (int)T, acc); break;
#endif
        case T_Q4_0: row_any(deq_q4_0, 32, 18, row, nb, X, ncols, (int)T, acc); break;
        case T_Q4_1: row_any(deq_q4_1, 32, 20, row, nb, X, ncols, (int)T, acc); break;
        case T_Q5_1: row_any(deq_q5_1, 32, 24, row, nb, X, ncols, (int)T, acc); break;
#if defined(__AVX2__) && defined(__FMA__)
        case T_Q4_K: row_q4_k_avx2(row, nb, X, ncols, (int)T, acc); break;
        case T_Q6_K: row_q6_k_avx2(row, nb, X, ncols, (int)T, acc); break;
#else
        case T_Q4_K: row_any(deq_q4_k, 256, 144, row, nb, X, ncols, (int)T, acc); break;
        case T_Q6_K: row_any(deq_q6_k, 256, 210, row, nb, X, ncols, (int)T, acc); break;
#endif
        case T_Q5_K: row_any(deq_q5_k, 256, 176, row, nb, X, ncols, (int)T, acc); break;
        default: types_row_f32(type, row, nb, X, ncols, (int)T, acc); break;
        }
        for (int64_t t = 0; t < T; t++) Y[t * nrows + r] = acc[t];
    }
    return 0;
}

/* ---- 8-bit activations ----
 *
 * Each activation row is rounded per block to int8 codes q = round_half_even(x * 127 / amax)
 * with scale d = amax / 127: blocks of 32 for the 32-value weight types (Q4_0, Q5_0, Q8_0),
 * blocks of 256 with int16 sums per 16 codes for the K-quants. A weight block times an
 * activation block is then an exact integer sum, scaled once in float. The torch twin is
 * qlinear.linear_q8_ref, which rounds the activations the same way.
 */
#if defined(__AVX2__) && defined(__FMA__)
static inline float amax_avx(const float *x, int n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    float v[8];
    _mm256_storeu_ps(v, m);
    float r = 0.f;
    for (int j = 0; j < 8; j++) r = v[j] > r ? v[j] : r;
    return r;
}

/* n (a multiple of 8) values -> int8 codes at scale 127/amax, rounded half to even. */
static inline void round_codes(const float *x, int n, float id, int8_t *q) {
    const __m256 s = _mm256_set1_ps(id);
    for (int j = 0; j < n; j += 8) {
        const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), s),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i i = _mm256_cvtps_epi32(v);
        int32_t w[8];
        _mm256_storeu_si256((__m256i *)w, i);
        for (int k = 0; k < 8; k++) q[j + k] = (int8_t)w[k];
    }
}

static void quant_x32(const float *x, int64_t n, xq32 *out) {
    for (int64_t i = 0; i < n / 32; i++) {
        const float amax = amax_avx(x + 32 * i, 32);
        out[i].d = amax / 127.0f;
        round_codes(x + 32 * i, 32, amax > 0.f ? 127.0f / amax : 0.f, out[i].q);
        int s = 0;
        for (int j = 0; j < 32; j++) s += out[i].q[j];
        out[i].sum = s;
    }
}

static void quant_x256(const float *x, int64_t n, xq256 *out) {
    for (int64_t i = 0; i < n / 256; i++) {
        const float amax = amax_avx(x + 256 * i, 256);
        out[i].d = amax / 127.0f;
        round_codes(x + 256 * i, 256, amax > 0.f ? 127.0f / amax : 0.f, out[i].q);
        for (int j = 0; j < 16; j++) {
            int s = 0;
            for (int k = 0; k < 16; k++) s += out[i].q[16 * j + k];
            out[i].bsum[j] = (int16_t)s;
        }
    }
}


static int q8_block(int type) {
    switch (type) {
    case T_Q4_0: case T_Q5_0: case T_Q8_0: return 32;
    case T_Q4_K: case T_Q5_K: case T_Q6_K: return 256;
    default: return types_q8_block(type);
    }
}

int ls_q8_supported(int type) { return q8_block(type) != 0; }

/* Rows [W, W + nr) (nr <= 8, or 16 where pack8_group_rows says so; row_bytes apart) times quantized
   X [T rows] -> Y[t * ldy + k], k < nr. The main types go 8 or 16 rows at a time (kernels_pack8.c,
   scratch `buf`); the others row by row. */
static void rows_to(int type, const uint8_t *W, int64_t row_bytes, int nr, int64_t ncols, const void *XQ, int64_t T,
                    float *Y, int64_t ldy, void *buf) {
    if (pack8_supported(type)) {
        pack8_group(type, W, row_bytes, nr, ncols, XQ, T, Y, ldy, buf);
        return;
    }
    const int xb = q8_block(type);
    const int64_t nb = ncols / xb;
    const size_t xs = xb == 32 ? sizeof(xq32) : sizeof(xq256);
    /* Decode, and 2-3 rows where decoding a block again costs less (an expert's tokens in a prompt):
       up to 8 weight rows side by side per activation row, the sums of 8 rows reduced at once. */
    if (T <= types_rows_one_max(type)) {
        float out[8];
        int done = 0;
        for (int64_t t = 0; t < T && done == 0; t++)
            for (int k = 0; k < nr && done == 0; k += 8) {
                const int n = nr - k < 8 ? nr - k : 8;
                done = types_rows_one(type, W + k * row_bytes, row_bytes, n, nb, (const char *)XQ + (size_t)(t * nb) * xs, out);
                for (int r = 0; r < n && done == 0; r++) Y[t * ldy + k + r] = out[r];
            }
        if (done == 0) return;
    }
    const int step = types_q8_rows(type);
    for (int k = 0; k < nr; k++)
        for (int64_t t0 = 0; t0 < T; t0 += step) {
            const int n = (int)(T - t0 < step ? T - t0 : step);
            float acc[Q8_ROWS_GRID] = {0};
            types_row_q8(type, W + k * row_bytes, nb, (const char *)XQ + (size_t)(t0 * nb) * xs, nb, n, acc);
            for (int t = 0; t < n; t++) Y[(t0 + t) * ldy + k] = acc[t];
        }
}

static void quant_rows(int xb, const float *X, int64_t T, int64_t ncols, void *XQ) {
    const int64_t nb = ncols / xb;
    for (int64_t t = 0; t < T; t++) {
        if (xb == 32) quant_x32(X + t * ncols, ncols, (xq32 *)XQ + t * nb);
        else quant_x256(X + t * ncols, ncols, (xq256 *)XQ + t * nb);
    }
}

/* A thread's scratch of at least `bytes`, kept for its next call: a fresh allocation past malloc's
   mmap threshold (128 KiB: a group of 8 rows of 9216 values) was mapped, faulted in and unmapped
   on every call, which cost the product of such rows 1.8x its time. */
static void *scratch(size_t bytes) {
    static __thread void *buf;
    static __thread size_t size;
    if (!buf || bytes > size) { /* never NULL on success, also for 0 bytes (types that need none) */
        free(buf);
        size = (bytes / 4096 + 1) * 4096;
        buf = aligned_alloc(64, size);
        if (!buf) size = 0;
    }
    return buf;
}

/* Y [T, nrows] = round8(X) [T, ncols] @ W.T for any T; -1 for a type without an 8-bit path.
   Prompt chunks of the main types go through AMX tiles where the CPU has them (kernels_amx.c). */
int ls_qmatmul_q8(int type, const uint8_t *W, int64_t row_bytes, int64_t nrows, int64_t ncols,
                  const float *X, int64_t T, float *Y, int nthreads) {
    const int xb = q8_block(type);
    if (!xb || ncols % xb || T < 1) return -1;
    const int64_t nb = ncols / xb;
    const size_t xsize = xb == 32 ? sizeof(xq32) : sizeof(xq256);
    const int amx = amx_supported(type, T);
    const int64_t tp = amx ? (T + 15) / 16 * 16 : T; /* activation rows, padded for the tiles */
    void *XQ = malloc((size_t)(tp * nb) * xsize);
    const size_t xa_bytes = amx ? amx_x_bytes(type, tp, ncols) : 0; /* 0: biased in place */
    void *XA = xa_bytes ? malloc(xa_bytes) : NULL;
    if (!XQ || (xa_bytes && !XA)) { free(XQ); free(XA); return -2; }
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tp; t++) {
            char *row = (char *)XQ + (size_t)(t * nb) * xsize;
            if (t < T) quant_rows(xb, X + t * ncols, 1, ncols, row);
            else memset(row, 0, (size_t)nb * xsize);
        }
        if (amx) {
#pragma omp for schedule(static)
            for (int64_t tg = 0; tg < tp / 16; tg++) amx_prepare_x(type, XQ, nb, tg, XA);
        }
        void *buf = scratch(amx ? amx_bytes(type, ncols) : pack8_bytes(type, ncols));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        /* Static halves: each thread streams one contiguous range, which the hardware
           prefetcher follows (2x dynamic chunks' bandwidth on a 178 MB LM head). */
        if (amx) {
#pragma omp for schedule(static)
            for (int64_t g = 0; g < (nrows + 15) / 16; g++) {
                const int nr = (int)(nrows - 16 * g < 16 ? nrows - 16 * g : 16);
                if (buf) amx_group16(type, W + 16 * g * row_bytes, row_bytes, nr, ncols, xb == 32 ? XQ : XA, T, Y + 16 * g,
                                     nrows, buf);
            }
        } else {
            const int G = pack8_group_rows(type, T);
#pragma omp for schedule(static)
            for (int64_t g = 0; g < (nrows + G - 1) / G; g++) {
                const int nr = (int)(nrows - G * g < G ? nrows - G * g : G);
                if (buf) rows_to(type, W + G * g * row_bytes, row_bytes, nr, ncols, XQ, T, Y + G * g, nrows, buf);
            }
        }
    }
    free(XQ);
    free(XA);
    return failed ? -2 : 0;
}

static int swiglu_experts_fused(int64_t n_jobs, const int64_t *jobs, int64_t E, int64_t F, int nthreads);

static inline float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/* One job of ls_swiglu_experts_q8 (11 int64, see there) as three products: a prompt chunk's
   shared expert or dense FFN, whose rows go through the AMX tiles. Same bits as the fused path. */
static int swiglu_job_alone(const int64_t *J, int64_t E, int64_t F, int nthreads) {
    const int64_t T = J[9];
    float *H = malloc((size_t)(T * 2 * F) * sizeof(float));
    if (!H) return -2;
    float *U = H + T * F;
    int rc;
    if (J[3]) {
        rc = ls_qmatmul_q8((int)J[0], (const uint8_t *)J[1], J[2], F, E, (const float *)J[8], T, H, nthreads);
        if (!rc) rc = ls_qmatmul_q8((int)J[0], (const uint8_t *)J[3], J[4], F, E, (const float *)J[8], T, U, nthreads);
        if (!rc) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
            for (int64_t i = 0; i < T * F; i++) H[i] = silu_mul(H[i], U[i]);
        }
    } else { /* gate rows then up rows: H [T, 2F], made [T, F] in place row by row */
        rc = ls_qmatmul_q8((int)J[0], (const uint8_t *)J[1], J[2], 2 * F, E, (const float *)J[8], T, H, nthreads);
        if (!rc) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
            for (int64_t t = 0; t < T; t++)
                for (int64_t c = 0; c < F; c++) H[t * 2 * F + c] = silu_mul(H[t * 2 * F + c], H[t * 2 * F + F + c]);
            for (int64_t t = 1; t < T; t++) memmove(H + t * F, H + t * 2 * F, (size_t)F * sizeof(float));
        }
    }
    if (!rc) rc = ls_qmatmul_q8((int)J[5], (const uint8_t *)J[6], J[7], E, F, H, T, (float *)J[10], nthreads);
    free(H);
    return rc;
}

/* Whether the jobs are well formed (types with an 8-bit path that divide E and F, rows, one block
   size for every gate and every down), checked before any work. */
static int swiglu_jobs_valid(int64_t n_jobs, const int64_t *jobs, int64_t E, int64_t F) {
    const int gb = q8_block((int)jobs[0]), db = q8_block((int)jobs[5]);
    for (int64_t j = 0; j < n_jobs; j++) {
        const int64_t *J = jobs + 11 * j;
        if (q8_block((int)J[0]) != gb || q8_block((int)J[5]) != db || J[9] < 1) return 0;
    }
    return gb && db && E % gb == 0 && F % db == 0;
}

/* SwiGLU experts, all in one call: for expert j, Y_j [T_j, E] = down_j(silu(gate_j X_j) * up_j X_j)
 * with 8-bit activations. job j is 11 int64: gate type, gate W, gate row bytes, up W (0: gate
 * holds gate rows then up rows), up row bytes, down type, down W, down row bytes, X_j, T_j, Y_j.
 * E (model width) and F (expert width) are shared. Row groups (8 or 16 rows, see pack8_group_rows) of
 * all experts share the threads. */
int ls_swiglu_experts_q8(int64_t n_jobs, const int64_t *jobs, int64_t E, int64_t F, int nthreads) {
    if (n_jobs < 1) return n_jobs == 0 ? 0 : -1; /* no expert has rows: nothing to do */
    if (!swiglu_jobs_valid(n_jobs, jobs, E, F)) return -1;
    /* A job of a prompt chunk's size goes alone through the tiles, before the others; decode
       (no such job) goes straight to the fused call. */
    int64_t alone = 0;
    for (int64_t j = 0; j < n_jobs; j++) alone += amx_supported((int)jobs[11 * j], jobs[11 * j + 9]);
    if (!alone) return swiglu_experts_fused(n_jobs, jobs, E, F, nthreads);
    int64_t *own = malloc((size_t)(11 * n_jobs) * sizeof(int64_t)), kept = 0;
    if (!own) return -2;
    for (int64_t j = 0; j < n_jobs; j++) {
        const int64_t *J = jobs + 11 * j;
        const int rc = amx_supported((int)J[0], J[9]) ? swiglu_job_alone(J, E, F, nthreads) : 1;
        if (rc < 0) { free(own); return rc; }
        if (rc) memcpy(own + 11 * kept++, J, 11 * sizeof(int64_t));
    }
    const int rc = kept ? swiglu_experts_fused(kept, own, E, F, nthreads) : 0;
    free(own);
    return rc;
}

/* Every job's matrix of `rows` weight rows (its type at J[type_at]) cut into the row groups
   pack8_group_rows asks for its T_j: items (job, first row, rows) for the threads to share. */
static int64_t *row_groups(int64_t n_jobs, const int64_t *jobs, int type_at, int64_t rows, int64_t *n) {
    int64_t count = 0;
    for (int64_t j = 0; j < n_jobs; j++) {
        const int G = pack8_group_rows((int)jobs[11 * j + type_at], jobs[11 * j + 9]);
        count += (rows + G - 1) / G;
    }
    int64_t *items = malloc((size_t)(3 * count) * sizeof(int64_t)), k = 0;
    if (!items) return NULL;
    for (int64_t j = 0; j < n_jobs; j++) {
        const int G = pack8_group_rows((int)jobs[11 * j + type_at], jobs[11 * j + 9]);
        for (int64_t r = 0; r < rows; r += G, k++) {
            items[3 * k] = j;
            items[3 * k + 1] = r;
            items[3 * k + 2] = rows - r < G ? rows - r : G;
        }
    }
    *n = count;
    return items;
}

/* ls_swiglu_experts_q8 for jobs of a few rows each: one parallel region for all. */
static int swiglu_experts_fused(int64_t n_jobs, const int64_t *jobs, int64_t E, int64_t F, int nthreads) {
    int64_t tt = 0;
    size_t pk = 0;
    for (int64_t j = 0; j < n_jobs; j++) { /* checked by the caller: swiglu_jobs_valid */
        const int64_t *J = jobs + 11 * j;
        tt += J[9];
        const size_t g = pack8_bytes((int)J[0], E), d = pack8_bytes((int)J[5], F);
        pk = g > pk ? g : pk;
        pk = d > pk ? d : pk;
    }
    const int gb = q8_block((int)jobs[0]), db = q8_block((int)jobs[5]);
    const size_t gxs = gb == 32 ? sizeof(xq32) : sizeof(xq256), dxs = db == 32 ? sizeof(xq32) : sizeof(xq256);
    int64_t ng = 0, nd = 0; /* row groups of the gates (as many of the ups) and of the downs */
    int64_t *gi = row_groups(n_jobs, jobs, 0, F, &ng), *di = row_groups(n_jobs, jobs, 5, E, &nd);
    char *XQ = malloc((size_t)tt * (size_t)(E / gb) * gxs);
    float *H = malloc((size_t)tt * (size_t)(2 * F) * sizeof(float));
    char *HQ = malloc((size_t)tt * (size_t)(F / db) * dxs);
    int64_t *start = malloc((size_t)(n_jobs + 1) * sizeof(int64_t));
    if (!gi || !di || !XQ || !H || !HQ || !start) {
        free(gi); free(di); free(XQ); free(H); free(HQ); free(start);
        return -2;
    }
    start[0] = 0;
    for (int64_t j = 0; j < n_jobs; j++) start[j + 1] = start[j] + jobs[11 * j + 9];
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        void *buf = scratch(pk);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n_jobs; j++)
            quant_rows(gb, (const float *)jobs[11 * j + 8], jobs[11 * j + 9], E,
                       XQ + (size_t)(start[j] * (E / gb)) * gxs);
        /* gate and up rows of every expert: H_j [T_j, 2F], gate in columns [0, F) */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < 2 * ng; i++) {
            const int64_t *g = gi + 3 * (i % ng), j = g[0], r = g[1], up = i >= ng;
            const int64_t *J = jobs + 11 * j;
            const int nr = (int)g[2];
            const uint8_t *row = !up ? (const uint8_t *)J[1] + r * J[2]
                                     : J[3] ? (const uint8_t *)J[3] + r * J[4] : (const uint8_t *)J[1] + (F + r) * J[2];
            if (buf) rows_to((int)J[0], row, up && J[3] ? J[4] : J[2], nr, E, XQ + (size_t)(start[j] * (E / gb)) * gxs, J[9],
                    H + start[j] * 2 * F + up * F + r, 2 * F, buf);
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tt; t++) {
            float *h = H + t * 2 * F;
            for (int64_t c = 0; c < F; c++) h[c] = silu_mul(h[c], h[F + c]);
            quant_rows(db, h, 1, F, HQ + (size_t)(t * (F / db)) * dxs);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < nd; i++) {
            const int64_t j = di[3 * i], r = di[3 * i + 1];
            const int64_t *J = jobs + 11 * j;
            if (buf) rows_to((int)J[5], (const uint8_t *)J[6] + r * J[7], J[7], (int)di[3 * i + 2], F,
                    HQ + (size_t)(start[j] * (F / db)) * dxs, J[9], (float *)J[10] + r, E, buf);
        }
    }
    free(gi); free(di); free(XQ); free(H); free(HQ); free(start);
    return failed ? -2 : 0;
}
#else
int ls_q8_supported(int type) { (void)type; return 0; }
int ls_swiglu_experts_q8(int64_t n_jobs, const int64_t *jobs, int64_t E, int64_t F, int nthreads) {
    (void)n_jobs; (void)jobs; (void)E; (void)F; (void)nthreads;
    return -1;
}
int ls_qmatmul_q8(int type, const uint8_t *W, int64_t row_bytes, int64_t nrows, int64_t ncols,
                  const float *X, int64_t T, float *Y, int nthreads) {
    (void)type; (void)W; (void)row_bytes; (void)nrows; (void)ncols; (void)X; (void)T; (void)Y; (void)nthreads;
    return -1;
}
#endif

/* ---- the gated delta rule, token by token (Gated DeltaNet decode) ----
 * Per value head h, state S [Dk, Dv]; per token: S <- exp(g) S; u = beta (v - S^T k);
 * S <- S + k u^T; o = S^T q. Heads are independent and share the threads. s_in is read,
 * s_out written (the caller keeps the old state for rewinding). Twin: delta_rule_recurrent.
 */
/* One value head h over T tokens (the body of ls_delta_rule). */
static void delta_rule_head(int64_t h, int64_t T, int64_t H, int64_t Dk, int64_t Dv, const float *q, const float *k,
                            const float *v, const float *g, const float *beta, const float *s_in, float *s_out,
                            float *out) {
    float *S = s_out + h * Dk * Dv;
    memcpy(S, s_in + h * Dk * Dv, sizeof(float) * (size_t)(Dk * Dv));
    float kv[1024], u[1024];
    for (int64_t t = 0; t < T; t++) {
        const float *kt = k + (t * H + h) * Dk, *qt = q + (t * H + h) * Dk, *vt = v + (t * H + h) * Dv;
        const float decay = expf(g[t * H + h]), b = beta[t * H + h];
        for (int64_t j = 0; j < Dv; j++) kv[j] = 0.f;
        for (int64_t i = 0; i < Dk; i++) {
            float *row = S + i * Dv;
            const float ki = kt[i];
            for (int64_t j = 0; j < Dv; j++) {
                row[j] *= decay;
                kv[j] += ki * row[j];
            }
        }
        for (int64_t j = 0; j < Dv; j++) u[j] = (vt[j] - kv[j]) * b;
        float *o = out + (t * H + h) * Dv;
        for (int64_t j = 0; j < Dv; j++) o[j] = 0.f;
        for (int64_t i = 0; i < Dk; i++) {
            float *row = S + i * Dv;
            const float ki = kt[i], qi = qt[i];
            for (int64_t j = 0; j < Dv; j++) {
                row[j] += ki * u[j];
                o[j] += qi * row[j];
            }
        }
    }
}

int ls_delta_rule(int64_t T, int64_t H, int64_t Dk, int64_t Dv, const float *q, const float *k, const float *v,
                  const float *g, const float *beta, const float *s_in, float *s_out, float *out, int nthreads) {
    if (T < 1 || H < 1 || Dk < 1 || Dv < 1 || Dv > 1024) return -1;
#pragma omp parallel num_threads(nthreads)
    {
#if defined(__SSE__)
        /* A strong decay (exp(g) below FLT_MIN) makes denormal states, and each x86 operation on
           a denormal takes a slow path: 30x this rule's time on a random model. They are flushed
           to zero (FTZ | DAZ), a change below 1.2e-38. */
        const unsigned csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040);
#endif
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++) delta_rule_head(h, T, H, Dk, Dv, q, k, v, g, beta, s_in, s_out, out);
#if defined(__SSE__)
        _mm_setcsr(csr);
#endif
    }
    return 0;
}

/* ---- small float ops of decode: RMSNorm and one-position attention ---- */

#if defined(__AVX2__) && defined(__FMA__)
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float v[8], r = 0.f;
    _mm256_storeu_ps(v, _mm256_add_ps(s0, s1));
    for (int j = 0; j < 8; j++) r += v[j];
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* dot_f32(a, b[k], n) for four rows b[0..3] at once, pair for pair the same operations: eight
   independent FMA chains instead of two (one dot waits on FMA latency), `a` loaded once. */
static inline void dot_f32_4(const float *a, const float *const b[4], int64_t n, float *out) {
    __m256 s0[4], s1[4];
    for (int k = 0; k < 4; k++) s0[k] = s1[k] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 a0 = _mm256_loadu_ps(a + i), a1 = _mm256_loadu_ps(a + i + 8);
        for (int k = 0; k < 4; k++) {
            s0[k] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(b[k] + i), s0[k]);
            s1[k] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(b[k] + i + 8), s1[k]);
        }
    }
    for (int k = 0; k < 4; k++) {
        float v[8], r = 0.f;
        _mm256_storeu_ps(v, _mm256_add_ps(s0[k], s1[k]));
        for (int j = 0; j < 8; j++) r += v[j];
        for (int64_t m = i; m < n; m++) r += a[m] * b[k][m];
        out[k] = r;
    }
}
#else
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    float r = 0.f;
    for (int64_t i = 0; i < n; i++) r += a[i] * b[i];
    return r;
}

static inline void dot_f32_4(const float *a, const float *const b[4], int64_t n, float *out) {
    for (int k = 0; k < 4; k++) out[k] = dot_f32(a, b[k], n);
}
#endif

/* KV cache rows by type (ggml ids: F32, F16, BF16, Q8_0). A head's D values start `off`
   values into a row; for Q8_0 both are multiples of 32. */
static inline const uint8_t *kv_at(int type, const uint8_t *row, int64_t off) {
    int block, bytes;
    deq_fn fn;
    type_info(type, &block, &bytes, &fn);
    return row + off / block * bytes;
}

/* n values of a cache row at p, as float32, into out (n a multiple of 32 for Q8_0). */
static inline void kv_load(int type, const uint8_t *p, int64_t n, float *out) {
#if defined(__AVX2__) && defined(__F16C__)
    if (n % 32 == 0) {  /* the same values, 8 at a time */
        for (int64_t i = 0; i < n; i += 8) {
            __m256 x;
            if (type == T_F32) x = _mm256_loadu_ps((const float *)p + i);
            else if (type == T_F16) x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * i)));
            else if (type == T_BF16)
                x = _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 2 * i))), 16));
            else {
                const uint8_t *b = p + i / 32 * 34;
                const __m128i c = _mm_loadl_epi64((const __m128i *)(b + 2 + i % 32));
                x = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(rd16(b))), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)));
            }
            _mm256_storeu_ps(out + i, x);
        }
        return;
    }
#endif
    int block, bytes;
    deq_fn fn;
    type_info(type, &block, &bytes, &fn);
    for (int64_t b = 0; b < n / block; b++) fn(p + b * bytes, out + b * block);
}

/* Positions [s0, s1) of one query over cached K/V rows, for every query head: each K and V row
   of a KV head is decoded once for the query heads that read it. Leaves per head h the
   running max m[h], the sum of exp(score - m[h]) l[h], and o[h*D..] = sum exp(score - m) V. */
static int attend_part(int64_t H, int64_t Hkv, int64_t D, int64_t s0, int64_t s1, const float *q,
                       const uint8_t *k, const uint8_t *v, int64_t ldk, int64_t ldv, int ktype, int vtype,
                       float scale, float *m, float *l, float *o) {
    const int64_t rep = H / Hkv, n = s1 - s0;
    float row[512];
    float *p = malloc(sizeof(float) * (size_t)(n * rep));  /* [rep, n] scores of one KV head */
    if (!p) return -2;
    for (int64_t g = 0; g < Hkv; g++) {
        for (int64_t s = 0; s < n; s++) {
            const uint8_t *ks = kv_at(ktype, k + (s0 + s) * ldk, g * D);
            const float *kr = (const float *)ks;
            if (ktype != T_F32) { kv_load(ktype, ks, D, row); kr = row; }
            for (int64_t r = 0; r < rep; r++) p[r * n + s] = dot_f32(q + (g * rep + r) * D, kr, D) * scale;
        }
        for (int64_t r = 0; r < rep; r++) {
            const int64_t h = g * rep + r;
            float mx = -INFINITY, sum = 0.f;
            for (int64_t s = 0; s < n; s++) mx = p[r * n + s] > mx ? p[r * n + s] : mx;
            for (int64_t s = 0; s < n; s++) {
                p[r * n + s] = expf(p[r * n + s] - mx);
                sum += p[r * n + s];
            }
            m[h] = mx;
            l[h] = sum;
            for (int64_t d = 0; d < D; d++) o[h * D + d] = 0.f;
        }
        for (int64_t s = 0; s < n; s++) {
            const uint8_t *vs = kv_at(vtype, v + (s0 + s) * ldv, g * D);
            const float *vr = (const float *)vs;
            if (vtype != T_F32) { kv_load(vtype, vs, D, row); vr = row; }
            for (int64_t r = 0; r < rep; r++) {
                const float ps = p[r * n + s];
                float *oh = o + (g * rep + r) * D;
                for (int64_t d = 0; d < D; d++) oh[d] += ps * vr[d];
            }
        }
    }
    free(p);
    return 0;
}

/* One query position over S cached positions whose K and V rows are stored as ktype/vtype,
   ldk/ldv bytes apart: out [H, D] = softmax(q K^T * scale) V per query head, query head h
   reading KV head h / (H / Hkv). Long spans are split between threads by position and the
   parts merged by their maxima; the split depends on S and the thread count only. */
int ls_attend_one_kv(int64_t H, int64_t Hkv, int64_t D, int64_t S, const float *q, const uint8_t *k,
                     const uint8_t *v, int64_t ldk, int64_t ldv, int ktype, int vtype, float scale, float *out,
                     int nthreads) {
    if (H < 1 || Hkv < 1 || H % Hkv || D < 1 || D > 512 || S < 1) return -1;
    for (int i = 0; i < 2; i++) {
        const int t = i ? vtype : ktype;
        if ((t != T_F32 && t != T_F16 && t != T_BF16 && t != T_Q8_0) || (t == T_Q8_0 && D % 32)) return -1;
    }
    const int64_t parts = S * H * D >= (1 << 18) ? (nthreads < S ? nthreads : S) : 1;
    float *m = malloc(sizeof(float) * (size_t)(parts * H * (D + 2)));
    if (!m) return -2;
    float *l = m + parts * H, *o = l + parts * H;
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(parts)
    for (int64_t i = 0; i < parts; i++) {
        if (attend_part(H, Hkv, D, S * i / parts, S * (i + 1) / parts, q, k, v, ldk, ldv, ktype, vtype, scale,
                        m + i * H, l + i * H, o + i * H * D))
            bad = 1;
    }
    for (int64_t h = 0; h < H && !bad; h++) {
        float mx = -INFINITY, sum = 0.f;
        for (int64_t i = 0; i < parts; i++) mx = m[i * H + h] > mx ? m[i * H + h] : mx;
        float *oh = out + h * D;
        for (int64_t d = 0; d < D; d++) oh[d] = 0.f;
        for (int64_t i = 0; i < parts; i++) {
            const float w = expf(m[i * H + h] - mx);
            sum += w * l[i * H + h];
            const float *op = o + (i * H + h) * D;
            for (int64_t d = 0; d < D; d++) oh[d] += w * op[d];
        }
        for (int64_t d = 0; d < D; d++) oh[d] /= sum;
    }
    free(m);
    return bad ? -2 : 0;
}

/* T query positions, row i over stored positions [lo[i], hi[i]) (a verify pass's causal rows):
   each exactly ls_attend_one_kv's arithmetic for that one query, in one call. */
int ls_attend_rows_kv(int64_t T, int64_t H, int64_t Hkv, int64_t D, const int64_t *lo, const int64_t *hi,
                      const float *q, const uint8_t *k, const uint8_t *v, int64_t ldk, int64_t ldv, int ktype,
                      int vtype, float scale, float *out, int nthreads) {
    for (int64_t i = 0; i < T; i++)
        if (lo[i] < 0 || hi[i] <= lo[i]) return -1; /* every row checked before any is written */
    for (int64_t i = 0; i < T; i++) {
        const int rc = ls_attend_one_kv(H, Hkv, D, hi[i] - lo[i], q + i * H * D, k + lo[i] * ldk, v + lo[i] * ldv,
                                        ldk, ldv, ktype, vtype, scale, out + i * H * D, nthreads);
        if (rc) return rc;
    }
    return 0;
}

/* rows of n floats: out = x / sqrt(mean(x^2) + eps) * w (w: n floats). */
int ls_rms_norm(int64_t rows, int64_t n, const float *x, const float *w, float eps, float *out) {
    if (rows < 0 || n < 1) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        const float scale = 1.0f / sqrtf(dot_f32(xr, xr, n) / (float)n + eps);
        for (int64_t i = 0; i < n; i++) o[i] = xr[i] * scale * w[i];
    }
    return 0;
}

/* Y [T, nrows] = X [T, ncols] @ W.T for float32 rows of W (stride row_floats): each output
 * one dot product with a fixed summation order, whatever T is (batch-invariant). */
int ls_matmul_f32(const float *W, int64_t row_floats, int64_t nrows, int64_t ncols, const float *X, int64_t T,
                  float *Y, int nthreads) {
    if (nrows < 1 || ncols < 1 || T < 1) return -1;
#pragma omp parallel for schedule(static) num_threads(nrows * ncols >= (1 << 15) ? nthreads : 1)
    for (int64_t r = 0; r < nrows; r++) {
        int64_t t = 0;
        for (; t + 4 <= T; t += 4) {
            const float *b[4] = {X + t * ncols, X + (t + 1) * ncols, X + (t + 2) * ncols, X + (t + 3) * ncols};
            float out[4];
            dot_f32_4(W + r * row_floats, b, ncols, out);
            for (int k = 0; k < 4; k++) Y[(t + k) * nrows + r] = out[k];
        }
        for (; t < T; t++) Y[t * nrows + r] = dot_f32(W + r * row_floats, X + t * ncols, ncols);
    }
    return 0;
}

/* Gated DeltaNet gates, element by element (the same arithmetic for any number of tokens):
 * g = a * softplus(alpha + dt_bias) (softplus(x) = x above 20, as torch), beta = sigmoid(b);
 * alpha, b [T, H]; a, dt_bias [H]. */
int ls_deltanet_gates(int64_t T, int64_t H, const float *alpha, const float *b, const float *a,
                      const float *dt_bias, float *g, float *beta) {
    if (T < 1 || H < 1) return -1;
    for (int64_t i = 0; i < T * H; i++) {
        const float x = alpha[i] + dt_bias[i % H];
        g[i] = a[i % H] * (x > 20.f ? x : log1pf(expf(x)));
        beta[i] = 1.f / (1.f + expf(-b[i]));
    }
    return 0;
}
