/* Quantized matrix kernels for lemonslice, loaded with ctypes (see kernels.py).
 *
 * ls_qmatmul: Y[t, r] = sum_c W[r, c] * X[t, c] with W kept as ggml blocks. Each block is
 * decoded into a small scratch and multiplied into lane-wise accumulators, so the weight is
 * read once and never expanded.
 * ls_dequant: rows of ggml blocks to float32, equal bit for bit to ggml/gguf-py
 * (built with -ffp-contract=off so products are rounded as theirs are).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

/* ggml type ids (gguf/constants.py GGMLType) */
enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
       T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30 };

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#endif
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

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

typedef void (*deq_fn)(const uint8_t *, float *);

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
    default: return -1;
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

#define MAXT 16

/* Decode a block into scratch, then accumulate products lane-wise; one horizontal sum per row. */
static inline __attribute__((always_inline)) void row_any(deq_fn fn, int block, int bytes, const uint8_t *row, int64_t nb,
                    const float *X, int64_t ldx, int T, float *acc) {
    float w[256];
    float A[MAXT][32];
    memset(A, 0, sizeof(float) * 32 * (size_t)T);
    for (int64_t i = 0; i < nb; i++) {
        fn(row + i * bytes, w);
        const int64_t c0 = i * block;
        for (int t = 0; t < T; t++) {
            const float *x = X + t * ldx + c0;
            for (int s = 0; s < block; s += 32) {
#pragma omp simd
                for (int j = 0; j < 32; j++) A[t][j] += w[s + j] * x[s + j];
            }
        }
    }
    for (int t = 0; t < T; t++) {
        float s = 0.f;
        for (int j = 0; j < 32; j++) s += A[t][j];
        acc[t] += s;
    }
}

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

/* The 32 bits of qh as 32 bytes: 0xFF where the bit is set, else 0. */
static inline __m256i bits_to_bytes(uint32_t qh) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                           0x0101010101010101LL, 0x0000000000000000LL);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), shuf);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
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
        default: break;
        }
        for (int64_t t = 0; t < T; t++) Y[t * nrows + r] = acc[t];
    }
    return 0;
}
