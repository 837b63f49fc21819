/* Shared by kernels.c and kernels_types.c (one library, see kernels.py): float16/bfloat16
 * conversion, the block decoder signature, and the 8-bit-activation blocks and dot products. */
#ifndef LS_KERNELS_COMMON_H
#define LS_KERNELS_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* ggml type ids (gguf/constants.py GGMLType) */
enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q2_K = 10,
       T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_IQ2_XXS = 16, T_IQ2_XS = 17, T_IQ3_XXS = 18,
       T_IQ1_S = 19, T_IQ4_NL = 20, T_IQ3_S = 21, T_IQ2_S = 22, T_IQ4_XS = 23, T_IQ1_M = 29, T_BF16 = 30,
       T_MXFP4 = 39 };

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

/* Scale and min j of a Q4_K/Q5_K block's 12 packed 6-bit pairs (ggml's get_scale_min_k4). */
static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* One block of bytes -> its float32 values. */
typedef void (*deq_fn)(const uint8_t *, float *);

#define MAXT 16

/* Decode a block into scratch, then accumulate products lane-wise; one horizontal sum per row. */
static inline __attribute__((always_inline)) void row_any(deq_fn fn, int block, int bytes, const uint8_t *row,
                                                          int64_t nb, const float *X, int64_t ldx, int T, float *acc) {
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
#define Q8_ROWS 8 /* activation rows per pass over a weight row (accumulators in registers) */
#define Q8_ROWS_GRID 32 /* the same for the IQ grid types (types_q8_rows) */

typedef struct { float d; int32_t sum; int8_t q[32]; } xq32; /* sum: of the codes */
typedef struct { float d; int16_t bsum[16]; int8_t q[256]; } xq256;

/* int32 lanes of sums of 4 products; u holds unsigned bytes, s signed ones. */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* Signed weight codes w times signed activation codes x (x never -128). */
static inline __m256i dot_s8s8(__m256i w, __m256i x) {
    return dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

/* The 32 bits of qh as 32 bytes: 0xFF where the bit is set, else 0. */
static inline __m256i bits_to_bytes(uint32_t qh) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                           0x0101010101010101LL, 0x0000000000000000LL);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), shuf);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

static inline void hsum_acc(const __m256 *A, int T, float *acc) {
    for (int t = 0; t < T; t++) {
        const __m128 h = _mm_add_ps(_mm256_castps256_ps128(A[t]), _mm256_extractf128_ps(A[t], 1));
        const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
        acc[t] += _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
    }
}

/* Weight bytes fetched ahead of a row-streaming kernel's reads, two lines at a time: on this
   VM the hardware prefetchers alone left a 9216-value Q4_K row product at half its speed. */
#ifndef PF_AHEAD
#define PF_AHEAD 2048
#endif
#define PREFETCH(p) (_mm_prefetch((const char *)(p) + PF_AHEAD, _MM_HINT_T0), \
                     _mm_prefetch((const char *)(p) + PF_AHEAD + 64, _MM_HINT_T0))

/* The float chain of every 8-bit kernel (kernels_pack8.c, kernels_amx.c, kernels_types.c): per
   block exact integer sums, then block after block acc = fma(float(isum), d * dx, acc) (and for
   mins acc = acc - float(imin) * (dmin * dx)), so a row's result does not depend on the batch.
   Here s[0..n) hold int32 lane parts of n activation rows' block sums (zero vectors up to a
   multiple of 8 past n); their scales dx are gathered from xd (the first row's block scale) at
   the byte offsets rows_gather set up, and A[g] lane t is row 8g + t's accumulator. */
#define BLOCK_CHAIN(s, xd, G, d, n, neg, A)                                                                      \
    do {                                                                                                  \
        const __m256 dv_ = _mm256_set1_ps(d);                                                             \
        if ((n) <= 4) { /* half the work: lanes 4..7 of A[0] are not used */                              \
            const __m128 v4_ = _mm_cvtepi32_ps(hsum4((s)[0], (s)[1], (s)[2], (s)[3]));                    \
            const __m128 dx4_ = _mm_mask_i32gather_ps(_mm_setzero_ps(), (const float *)(xd),             \
                                                      _mm256_castsi256_si128((G).off[0]),                 \
                                                      _mm256_castps256_ps128((G).mask[0]), 1);            \
            const __m128 dd4_ = _mm_mul_ps(_mm256_castps256_ps128(dv_), dx4_);                            \
            const __m128 a4_ = _mm256_castps256_ps128((A)[0]);                                            \
            (A)[0] = _mm256_castps128_ps256((neg) ? _mm_fnmadd_ps(v4_, dd4_, a4_) : _mm_fmadd_ps(v4_, dd4_, a4_)); \
            break;                                                                                        \
        }                                                                                                 \
        for (int g_ = 0; 8 * g_ < (n); g_++) {                                                            \
            const __m256 v_ = _mm256_cvtepi32_ps(hsum8((s) + 8 * g_));                                   \
            const __m256 dx_ = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), (const float *)(xd), (G).off[g_], \
                                                       (G).mask[g_], 1);                                  \
            const __m256 dd_ = _mm256_mul_ps(dv_, dx_);                                                   \
            (A)[g_] = (neg) ? _mm256_fnmadd_ps(v_, dd_, (A)[g_]) : _mm256_fmadd_ps(v_, dd_, (A)[g_]);     \
        }                                                                                                 \
    } while (0)

/* Byte offsets of activation rows 8g..8g+7 (`step` bytes apart) and the mask of those below n:
   the scales are gathered, not stored and read back as a vector (a store-forwarding stall). */
typedef struct { __m256i off[Q8_ROWS_GRID / 8]; __m256 mask[Q8_ROWS_GRID / 8]; } row_gather;

static inline row_gather rows_gather(int n, int64_t step) {
    row_gather G = {0};
    for (int g = 0; 8 * g < n; g++) {
        const __m256i t = _mm256_add_epi32(_mm256_set1_epi32(8 * g), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        G.off[g] = _mm256_mullo_epi32(t, _mm256_set1_epi32((int)step));
        G.mask[g] = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), t));
    }
    return G;
}

/* A 32-value type (its scale at byte 0, read by SCALE): NAME, one weight row against
   1 < T <= Q8_ROWS activation rows; NAME##_one, nr <= 8 weight rows (row_bytes apart) against one
   activation row (decode), the rows side by side in the lanes of one float chain. */
#define ROW_I8_32(NAME, BYTES, CODES, SCALE)                                                                     \
    static void NAME(const uint8_t *row, int64_t nb, const xq32 *X, int64_t ldx, int T, float *acc) {     \
        __m256i s[8];                                                                                     \
        float v[8];                                                                                       \
        __m256 A[1] = {_mm256_setzero_ps()};                                                              \
        const row_gather G = rows_gather(T, ldx * (int64_t)sizeof(xq32));                                 \
        for (int t = T; t < 8; t++) s[t] = _mm256_setzero_si256();                                       \
        for (int64_t i = 0; i < nb; i++) {                                                                \
            const uint8_t *b = row + i * (BYTES);                                                         \
            PREFETCH(b);                                                                                  \
            const __m256i w = CODES(b);                                                                   \
            const __m256i aw = _mm256_sign_epi8(w, w);                                                    \
            for (int t = 0; t < T; t++) {                                                                 \
                const xq32 *x = X + t * ldx + i;                                                          \
                s[t] = dot_u8s8(aw, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)x->q), w));      \
            }                                                                                             \
            BLOCK_CHAIN(s, &X[i].d, G, SCALE(b), T, 0, A);                                                \
        }                                                                                                 \
        _mm256_storeu_ps(v, A[0]);                                                                        \
        for (int t = 0; t < T; t++) acc[t] = v[t];                                                        \
    }                                                                                                     \
    static void NAME##_one(const uint8_t *W, int64_t row_bytes, int nr, int64_t nb, const xq32 *X, float *out) { \
        __m256 A = _mm256_setzero_ps();                                                                   \
        const uint8_t *rp[8]; /* rows past nr repeat the last one (their lanes are dropped) */          \
        float v[8];                                                                                       \
        for (int r = 0; r < 8; r++) rp[r] = W + (r < nr ? r : nr - 1) * row_bytes;                        \
        for (int64_t i = 0; i < nb; i++) {                                                                \
            const __m256i x = _mm256_loadu_si256((const __m256i *)X[i].q);                                \
            __m256i s[8];                                                                                 \
            float sc[8];                                                                                  \
            for (int r = 0; r < 8; r++) {                                                                 \
                const uint8_t *b = rp[r] + i * (BYTES);                                                   \
                PREFETCH(b);                                                                              \
                s[r] = dot_s8s8(CODES(b), x);                                                             \
                sc[r] = SCALE(b);                                                                         \
            }                                                                                             \
            /* built in registers: a vector load of scalars just stored stalls on store forwarding */    \
            const __m256 d = _mm256_set_ps(sc[7], sc[6], sc[5], sc[4], sc[3], sc[2], sc[1], sc[0]);       \
            A = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8(s)), _mm256_mul_ps(d, _mm256_set1_ps(X[i].d)), A); \
        }                                                                                                 \
        _mm256_storeu_ps(v, A);                                                                           \
        for (int r = 0; r < nr; r++) out[r] = v[r];                                                       \
    }

static inline float scale_f16(const uint8_t *b) { return f16_to_f32(rd16(b)); }

/* ---- the codes of the main types, shared by kernels_pack8.c and kernels_amx.c ---- */
#define ALWAYS_INLINE inline __attribute__((always_inline))

/* Four vectors of lane sums -> their four totals (exact integers). */
static ALWAYS_INLINE __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i v = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}

/* 8 vectors of int32 lane sums (row r: v[r]) -> one vector, lane r the exact total of v[r]. */
static ALWAYS_INLINE __m256i hsum8(const __m256i v[8]) {
    const __m256i a = _mm256_hadd_epi32(v[0], v[1]), b = _mm256_hadd_epi32(v[2], v[3]);
    const __m256i c = _mm256_hadd_epi32(v[4], v[5]), e = _mm256_hadd_epi32(v[6], v[7]);
    const __m256i ab = _mm256_hadd_epi32(a, b), ce = _mm256_hadd_epi32(c, e); /* halves of rows 0-3, 4-7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(ab, ce, 0x20), _mm256_permute2x128_si256(ab, ce, 0x31));
}

/* 8 vectors of 8 int32 (row r: v[r]) -> out[k] lane r = v[r] lane k. */
static ALWAYS_INLINE void transpose8(const __m256i v[8], __m256i *out) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++) {
        const __m256i *a = t + 4 * h;
        u[4 * h + 0] = _mm256_unpacklo_epi64(a[0], a[2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(a[0], a[2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(a[1], a[3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(a[1], a[3]);
    }
    for (int k = 0; k < 4; k++) {
        _mm256_storeu_si256(out + k, _mm256_permute2x128_si256(u[k], u[4 + k], 0x20));
        _mm256_storeu_si256(out + 4 + k, _mm256_permute2x128_si256(u[k], u[4 + k], 0x31));
    }
}

/* The 32 unsigned codes of a Q4_0/Q5_0 block (value = d * (code - offset)). */
static ALWAYS_INLINE __m256i codes_q45_0(int type, const uint8_t *b) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m128i qs = _mm_loadu_si128((const __m128i *)(b + (type == T_Q5_0 ? 6 : 2)));
    const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), low4);
    if (type == T_Q4_0) return nib;
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_mask_add_epi8(nib, (__mmask32)qh, nib, _mm256_set1_epi8(0x10)); /* + 16 where the fifth bit is set */
#else
    return _mm256_or_si256(nib, _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10)));
#endif
}

/* Q4_K/Q5_K: the 8 sub-blocks' unsigned codes of one block, its 6-bit scales and mins. */
static ALWAYS_INLINE void k45_codes(int five, const uint8_t *b, __m256i q[8]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    const __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 16));
    for (int k = 0; k < 4; k++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b + (five ? 48 : 16) + 32 * k));
        q[2 * k] = _mm256_and_si256(v, low4);
        q[2 * k + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        if (five) { /* the fifth bit of sub-block j is bit j of qh */
            q[2 * k] = _mm256_or_si256(q[2 * k], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * k), one), 4));
            q[2 * k + 1] = _mm256_or_si256(q[2 * k + 1],
                                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2 * k + 1), one), 4));
        }
    }
}

/* Q6_K: sub-block k (values 32k..32k+31) of unsigned 6-bit codes (value = d*sc*(code-32)). */
static ALWAYS_INLINE void q6_codes(const uint8_t *b, __m256i q[8]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
    for (int n = 0; n < 2; n++) {
        const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
        const __m256i l0 = _mm256_loadu_si256((const __m256i *)ql);
        const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 32));
        const __m256i h = _mm256_loadu_si256((const __m256i *)qh);
        for (int g = 0; g < 4; g++) {
            const __m256i lo = g & 1 ? l1 : l0;
            const __m256i nib = _mm256_and_si256(g < 2 ? lo : _mm256_srli_epi16(lo, 4), low4);
            q[4 * n + g] = _mm256_or_si256(nib, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2 * g), two), 4));
        }
    }
}

#endif

/* kernels_pack8.c: the main types, 8 weight rows at a time (rows nr < 8 padded), or 16 (see pack8_group_rows). */
int pack8_supported(int type);
size_t pack8_bytes(int type, int64_t ncols);
void pack8_group(int type, const uint8_t *W, int64_t row_bytes, int nr, int64_t ncols, const void *XQ, int64_t T,
                 float *Y, int64_t ldy, void *buf);
/* Weight rows per group a caller should hand pack8_group for T activation rows: 16 where the
   32-value types go through 512-bit registers (nr up to 16 then), else 8. */
int pack8_group_rows(int type, int64_t T);

/* kernels_amx.c: the main types on AMX tiles, 16 weight rows at a time, for prompt chunks; the
   quantized activations (padded to a multiple of 16 rows) are prepared 16 rows at a time. */
int amx_supported(int type, int64_t T);
size_t amx_bytes(int type, int64_t ncols);
size_t amx_x_bytes(int type, int64_t tp, int64_t ncols);
void amx_prepare_x(int type, void *XQ, int64_t nb, int64_t tg, void *XA);
void amx_group16(int type, const uint8_t *W, int64_t row_bytes, int nr, int64_t ncols, const void *XA, int64_t T,
                 float *Y, int64_t ldy, void *buf);

/* The types of kernels_types.c, asked by kernels.c where its own switches end. */
int types_info(int type, int *block, int *bytes, deq_fn *fn);
int types_q8_block(int type);
int types_q8_rows(int type);
void types_row_q8(int type, const uint8_t *row, int64_t nb, const void *xq, int64_t ldx, int n, float *acc);
int types_rows_one(int type, const uint8_t *W, int64_t row_bytes, int nr, int64_t nb, const void *xq, float *out);
int types_rows_one_max(int type);
int types_block_i8(int type, const uint8_t *b, int8_t *q, int32_t *mult, float *d, float *dmin, int16_t *m);
int types_block32_i8(int type, const uint8_t *b, int8_t *q, float *d);
void types_row_f32(int type, const uint8_t *row, int64_t nb, const float *X, int64_t ldx, int T, float *acc);

#endif
