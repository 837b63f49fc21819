/* The 8-bit path of the main types (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K), eight weight rows at a time.
 *
 * A group of 8 weight rows is first packed: every block's codes as unsigned bytes, transposed
 * so that one 32-byte vector holds 4 consecutive codes of each row (int32 lane r = row r), and
 * the rows' scales side by side. Four activation codes, broadcast, then meet all 8 rows in one
 * u8 x s8 dot product (`vpdpbusd`, or `maddubs` + `madd` without VNNI): a lane sums its own
 * row's block with no horizontal reduction, and the packed group is reused for every
 * activation row of the call (prefill reads it from L1/L2 instead of decoding it T times).
 * For 2-8 activation rows of the 32-value types (an MTP verify pass, a few tokens of an expert)
 * a CPU with AVX-512 transposes 16 rows' blocks in registers instead (fused16_32); nothing is
 * stored.
 *
 * The arithmetic of one weight row against one activation row is fixed, whatever T is and
 * however rows are grouped: exact integer sums per block, then block after block
 * acc = fma(float(isum), d*dx, acc) (K-quants with mins: then acc = acc - float(imin)*(dmin*dx)).
 * So a row's result has the same bits in a batch of any size.
 */
#include "kernels_common.h"

#if defined(__AVX2__) && defined(__FMA__)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#define DPWSSD(acc, a, b) _mm256_dpwssd_epi32((acc), (a), (b))
#define SIGNED_Q8 0 /* Q8_0 codes + 128 as unsigned bytes: u8 x s8 sums in int32, no saturation */
#else
#define DPBUSD(acc, u, s) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
#define DPWSSD(acc, a, b) _mm256_add_epi32((acc), _mm256_madd_epi16((a), (b)))
#define SIGNED_Q8 1 /* maddubs would saturate on 255 * 127 pairs: Q8_0 keeps signed codes */
#endif

/* Activation rows from which a group is packed (measured: 32-value blocks pack cheaply). */
#define PACK_MIN_T 8
#define PACK_MIN_T_32 3
#ifndef GROUP16_MIN_T
#define GROUP16_MIN_T 2
#endif
#ifndef GROUP16_MAX_T
#define GROUP16_MAX_T 8
#endif

/* One packed block of a group of 8 rows; q[k] lane r = codes 4k..4k+3 of row r. */
typedef struct { uint8_t q[8][32]; float d[8]; } pk32;
typedef struct { uint8_t q[64][32]; int32_t sc[8][8]; int32_t m2[8][8]; float d[8], dmin[8]; } pk45;
typedef struct { uint8_t q[64][32]; int32_t sc[16][8]; int32_t sc2[8][8]; float d[8]; } pk6;

int pack8_supported(int type) {
    switch (type) {
    case T_Q4_0: case T_Q5_0: case T_Q8_0: case T_Q4_K: case T_Q5_K: case T_Q6_K: return 1;
    default: return 0;
    }
}

size_t pack8_bytes(int type, int64_t ncols) {
    /* the larger of a packed group and the unpacked path's lane sums (8 rows x T < threshold) */
    const size_t lanes = 8 * sizeof(__m256i);
    switch (type) {
    case T_Q4_0: case T_Q5_0: case T_Q8_0: {
        const size_t pk = sizeof(pk32), nat = (PACK_MIN_T_32 - 1) * 8 * sizeof(int32_t) + 8 * sizeof(float);
        return (size_t)(ncols / 32) * (pk > nat ? pk : nat);
    }
    case T_Q4_K: case T_Q5_K: {
        const size_t pk = sizeof(pk45), nat = 2 * (PACK_MIN_T - 1) * lanes + 16 * sizeof(float);
        return (size_t)(ncols / 256) * (pk > nat ? pk : nat);
    }
    case T_Q6_K: {
        const size_t pk = sizeof(pk6), nat = (PACK_MIN_T - 1) * lanes + 8 * sizeof(float);
        return (size_t)(ncols / 256) * (pk > nat ? pk : nat);
    }
    default: return 0;
    }
}

/* ---- packing ---- */

/* The 32 unsigned codes of a Q4_0/Q5_0/Q8_0 block (value = d * (code - offset)). */
static ALWAYS_INLINE __m256i ucodes32(int type, const uint8_t *b) {
    if (type == T_Q8_0) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 2));
        return SIGNED_Q8 ? q : _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80));
    }
    return codes_q45_0(type, b);
}

static void pack_32(int type, const uint8_t *const rows[8], int64_t nb, pk32 *out) {
    const int bytes = type == T_Q8_0 ? 34 : type == T_Q5_0 ? 22 : 18;
    for (int64_t i = 0; i < nb; i++) {
        __m256i v[8];
        for (int r = 0; r < 8; r++) {
            const uint8_t *b = rows[r] + i * bytes;
            PREFETCH(b);
            v[r] = ucodes32(type, b);
            out[i].d[r] = f16_to_f32(rd16(b));
        }
        transpose8(v, (__m256i *)out[i].q);
    }
}

static void pack_k45(int five, const uint8_t *const rows[8], int64_t nb, pk45 *out) {
    const int bytes = five ? 176 : 144;
    for (int64_t i = 0; i < nb; i++) {
        __m256i q[8][8];  /* [row][sub-block] */
        for (int r = 0; r < 8; r++) {
            const uint8_t *b = rows[r] + i * bytes;
            PREFETCH(b);
            k45_codes(five, b, q[r]);
            out[i].d[r] = f16_to_f32(rd16(b));
            out[i].dmin[r] = f16_to_f32(rd16(b + 2));
            for (int j = 0; j < 8; j++) {
                uint8_t sc, m;
                scale_min_k4(j, b + 4, &sc, &m);
                out[i].sc[j][r] = sc;
                out[i].m2[j][r] = m | ((int32_t)m << 16); /* m_j against both sums per 16 of sub-block j */
            }
        }
        for (int j = 0; j < 8; j++) {
            __m256i v[8];
            for (int r = 0; r < 8; r++) v[r] = q[r][j];
            transpose8(v, (__m256i *)out[i].q[8 * j]);
        }
    }
}

static void pack_q6(const uint8_t *const rows[8], int64_t nb, pk6 *out) {
    for (int64_t i = 0; i < nb; i++) {
        __m256i q[8][8];
        for (int r = 0; r < 8; r++) {
            const uint8_t *b = rows[r] + i * 210;
            PREFETCH(b);
            const int8_t *sc = (const int8_t *)(b + 192);
            q6_codes(b, q[r]);
            out[i].d[r] = f16_to_f32(rd16(b + 208));
            for (int j = 0; j < 16; j++) out[i].sc[j][r] = sc[j];
            for (int j = 0; j < 8; j++) out[i].sc2[j][r] = (int32_t)(uint16_t)sc[2 * j] | ((int32_t)sc[2 * j + 1] << 16);
        }
        for (int k = 0; k < 8; k++) {
            __m256i v[8];
            for (int r = 0; r < 8; r++) v[r] = q[r][k];
            transpose8(v, (__m256i *)out[i].q[8 * k]);
        }
    }
}

/* ---- products: a packed group against n activation rows (n is a constant where inlined) ---- */

static ALWAYS_INLINE __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Four codes of each of 8 rows (c) times four activation codes (x): int32 lane r += row r's part. */
static ALWAYS_INLINE __m256i dot4(__m256i acc, __m256i c, __m256i x, int sgn) {
    if (sgn) return DPBUSD(acc, _mm256_sign_epi8(c, c), _mm256_sign_epi8(x, c));
    return DPBUSD(acc, c, x);
}

static ALWAYS_INLINE void run_32(int type, const pk32 *P, int64_t nb, const xq32 *X, int64_t ldx, const int n,
                                 __m256 *acc) {
    const int sgn = type == T_Q8_0 && SIGNED_Q8;
    const int off = type == T_Q4_0 ? 8 : type == T_Q5_0 ? 16 : sgn ? 0 : 128;
    for (int t = 0; t < n; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m256i s[4];
        for (int t = 0; t < n; t++) s[t] = _mm256_setzero_si256();
        for (int k = 0; k < 8; k++) {
            const __m256i c = _mm256_loadu_si256((const __m256i *)P[i].q[k]);
            for (int t = 0; t < n; t++) s[t] = dot4(s[t], c, bcast4(X[t * ldx + i].q + 4 * k), sgn);
        }
        const __m256 d = _mm256_loadu_ps(P[i].d);
        for (int t = 0; t < n; t++) {
            const xq32 *x = X + t * ldx + i;
            if (off) s[t] = _mm256_sub_epi32(s[t], _mm256_set1_epi32(off * x->sum));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[t]), _mm256_mul_ps(d, _mm256_set1_ps(x->d)), acc[t]);
        }
    }
}

/* p[t] lane r = sum over `groups` packed code vectors q[k] (4 codes of each of 8 rows) times the
   activation codes at value offset off + 4k of block X[t * ldx], for n activation rows. */
static ALWAYS_INLINE void group_dots(const uint8_t (*q)[32], const int groups, const xq256 *X, int64_t ldx, int off,
                                     const int n, __m256i *p) {
    for (int t = 0; t < n; t++) p[t] = _mm256_setzero_si256();
    for (int k = 0; k < groups; k++) {
        const __m256i c = _mm256_loadu_si256((const __m256i *)q[k]);
        for (int t = 0; t < n; t++) p[t] = DPBUSD(p[t], c, bcast4(X[t * ldx].q + off + 4 * k));
    }
}

static ALWAYS_INLINE void run_k45(const pk45 *P, int64_t nb, const xq256 *X, int64_t ldx, const int n, __m256 *acc) {
    for (int t = 0; t < n; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m256i is[4], mn[4];
        for (int t = 0; t < n; t++) is[t] = mn[t] = _mm256_setzero_si256();
        for (int j = 0; j < 8; j++) {
            __m256i p[4];
            group_dots(P[i].q + 8 * j, 8, X + i, ldx, 32 * j, n, p);
            const __m256i sc = _mm256_loadu_si256((const __m256i *)P[i].sc[j]);
            const __m256i m2 = _mm256_loadu_si256((const __m256i *)P[i].m2[j]);
            for (int t = 0; t < n; t++) {
                is[t] = _mm256_add_epi32(is[t], _mm256_mullo_epi32(p[t], sc));
                mn[t] = DPWSSD(mn[t], m2, bcast4((const int8_t *)(X[t * ldx + i].bsum + 2 * j)));
            }
        }
        const __m256 d = _mm256_loadu_ps(P[i].d), dmin = _mm256_loadu_ps(P[i].dmin);
        for (int t = 0; t < n; t++) {
            const __m256 xd = _mm256_set1_ps(X[t * ldx + i].d);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[t]), _mm256_mul_ps(d, xd), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mn[t]), _mm256_mul_ps(dmin, xd), acc[t]);
        }
    }
}

static ALWAYS_INLINE void run_q6(const pk6 *P, int64_t nb, const xq256 *X, int64_t ldx, const int n, __m256 *acc) {
    for (int t = 0; t < n; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m256i is[4], o[4];
        for (int t = 0; t < n; t++) is[t] = o[t] = _mm256_setzero_si256();
        for (int j = 0; j < 16; j++) { /* 16 values, one scale */
            __m256i p[4];
            group_dots(P[i].q + 4 * j, 4, X + i, ldx, 16 * j, n, p);
            const __m256i sc = _mm256_loadu_si256((const __m256i *)P[i].sc[j]);
            for (int t = 0; t < n; t++) is[t] = _mm256_add_epi32(is[t], _mm256_mullo_epi32(p[t], sc));
        }
        for (int j = 0; j < 8; j++) { /* the codes' -32: 32 * sum_j sc_j * (sum of activation codes of j) */
            const __m256i sc2 = _mm256_loadu_si256((const __m256i *)P[i].sc2[j]);
            for (int t = 0; t < n; t++) o[t] = DPWSSD(o[t], sc2, bcast4((const int8_t *)(X[t * ldx + i].bsum + 2 * j)));
        }
        const __m256 d = _mm256_loadu_ps(P[i].d);
        for (int t = 0; t < n; t++) {
            is[t] = _mm256_sub_epi32(is[t], _mm256_slli_epi32(o[t], 5));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[t]), _mm256_mul_ps(d, _mm256_set1_ps(X[t * ldx + i].d)), acc[t]);
        }
    }
}

static ALWAYS_INLINE void run_n(int type, const void *P, int64_t nb, const void *X, int64_t ldx, const int n,
                                __m256 *acc) {
    switch (type) {
    case T_Q4_K: case T_Q5_K: run_k45((const pk45 *)P, nb, (const xq256 *)X, ldx, n, acc); break;
    case T_Q6_K: run_q6((const pk6 *)P, nb, (const xq256 *)X, ldx, n, acc); break;
    case T_Q4_0: run_32(T_Q4_0, (const pk32 *)P, nb, (const xq32 *)X, ldx, n, acc); break;
    case T_Q5_0: run_32(T_Q5_0, (const pk32 *)P, nb, (const xq32 *)X, ldx, n, acc); break;
    default: run_32(T_Q8_0, (const pk32 *)P, nb, (const xq32 *)X, ldx, n, acc); break;
    }
}

/* ---- the same sums for a few activation rows, from the rows as stored ----
 * Packing costs more than it saves below PACK_MIN_T activation rows (decode, MTP's verify,
 * an expert's few tokens). There each row's block gives 8 int32 lanes of partial sums, and
 * hsum8 turns 8 rows' lanes into one vector of the 8 rows' exact block sums: the same
 * integers as the packed path, so the same float arithmetic follows. */

/* hsum8 of v[0], v[stride], ..., v[7 * stride]. */
static ALWAYS_INLINE __m256i hsum8s(const __m256i *v, int64_t stride) {
    __m256i w[8];
    for (int r = 0; r < 8; r++) w[r] = _mm256_load_si256(v + r * stride);
    return hsum8(w);
}


static ALWAYS_INLINE int32_t hsum1(__m256i a) {
    const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    const __m128i q = _mm_add_epi32(h, _mm_unpackhi_epi64(h, h));
    return _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 1)));
}

/* Phase 1 reads the 8 rows one after the other, each from start to end as stored: one sequential
   stream through the weight, which the prefetchers follow (rows of 640 values are 11 cache lines,
   too short for a stream per row). It leaves each row's exact block sums, four blocks reduced
   together, in Si[(t*8 + r)*nb + i], and the scales in dh; phase 2 gathers the 8 rows' sums of a
   block and runs the float chain block by block. */
static ALWAYS_INLINE void nat_32(int type, const uint8_t *const rows[8], int64_t nb, const xq32 *X, int64_t ldx,
                                 const int T, __m256 *acc, int32_t *Si) {
    const int sgn = type == T_Q8_0 && SIGNED_Q8;
    const int off = type == T_Q4_0 ? 8 : type == T_Q5_0 ? 16 : sgn ? 0 : 128;
    const int bytes = type == T_Q8_0 ? 34 : type == T_Q5_0 ? 22 : 18;
    uint16_t *dh = (uint16_t *)(Si + 8 * nb * T); /* [nb][8] the rows' float16 scales, as stored */
    const __m256i z = _mm256_setzero_si256();
    for (int r = 0; r < 8; r++) {
        const uint8_t *row = rows[r]; /* a local: the vector stores below may alias rows[] */
        int64_t i = 0;
        for (; i + 4 <= nb; i += 4) {
            __m256i u[4];
            PREFETCH(row + i * bytes);
            for (int k = 0; k < 4; k++) {
                u[k] = ucodes32(type, row + (i + k) * bytes);
                memcpy(dh + (i + k) * 8 + r, row + (i + k) * bytes, 2);
            }
            for (int t = 0; t < T; t++) {
                const xq32 *x = X + t * ldx + i;
                _mm_storeu_si128((__m128i *)(Si + (t * 8 + r) * nb + i),
                                 hsum4(dot4(z, u[0], _mm256_loadu_si256((const __m256i *)x[0].q), sgn),
                                       dot4(z, u[1], _mm256_loadu_si256((const __m256i *)x[1].q), sgn),
                                       dot4(z, u[2], _mm256_loadu_si256((const __m256i *)x[2].q), sgn),
                                       dot4(z, u[3], _mm256_loadu_si256((const __m256i *)x[3].q), sgn)));
            }
        }
        for (; i < nb; i++) {
            const __m256i u = ucodes32(type, row + i * bytes);
            memcpy(dh + i * 8 + r, row + i * bytes, 2);
            for (int t = 0; t < T; t++)
                Si[(t * 8 + r) * nb + i] = hsum1(dot4(z, u, _mm256_loadu_si256((const __m256i *)X[t * ldx + i].q), sgn));
        }
    }
    const __m256i rows8 = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)nb));
    for (int64_t i = 0; i < nb; i++) {
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dh + i * 8)));
        for (int t = 0; t < T; t++) {
            const xq32 *x = X + t * ldx + i;
            __m256i s = _mm256_i32gather_epi32((const int *)(Si + t * 8 * nb + i), rows8, 4);
            if (off) s = _mm256_sub_epi32(s, _mm256_set1_epi32(off * x->sum));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_set1_ps(x->d)), acc[t]);
        }
    }
}

/* The 6-bit scales and mins of a Q4_K/Q5_K block as madd operands: scv[j] = sc_j in every int16
   lane, mv = (m_0, m_0, m_1, m_1, ..., m_7, m_7) against the activations' sums per 16. The 12
   bytes hold, per byte lane i of three words a, b, c: sc_i = a & 63 and m_i = b & 63 for i < 4;
   for i >= 4 the low nibbles of c plus the top two bits of a (scales) or b (mins). */
static ALWAYS_INLINE void k_scales(const uint8_t *scales, __m256i scv[8], __m256i *mv) {
    uint32_t a, b, c;
    memcpy(&a, scales, 4);
    memcpy(&b, scales + 4, 4);
    memcpy(&c, scales + 8, 4);
    const uint32_t sc_lo = a & 0x3f3f3f3fu, m_lo = b & 0x3f3f3f3fu;
    const uint32_t sc_hi = (c & 0x0f0f0f0fu) | (((a >> 6) & 0x03030303u) << 4);
    const uint32_t m_hi = ((c >> 4) & 0x0f0f0f0fu) | (((b >> 6) & 0x03030303u) << 4);
    const __m128i sc16 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo));
    const __m128i m16 = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)m_hi, (int)m_lo));
    *mv = _mm256_set_m128i(_mm_unpackhi_epi16(m16, m16), _mm_unpacklo_epi16(m16, m16));
    const __m256i both = _mm256_set_m128i(sc16, sc16);
    for (int j = 0; j < 8; j++) /* bytes 2j, 2j+1 of each lane: int16 sc_j everywhere */
        scv[j] = _mm256_shuffle_epi8(both, _mm256_set1_epi16((short)(0x0100 + 0x0202 * j)));
}

/* Lane sums of a Q4_K/Q5_K block's codes times their scales against activation block x. */
static ALWAYS_INLINE __m256i k45_lanes(const __m256i q[8], const __m256i scv[8], const xq256 *x) {
    __m256i s = _mm256_setzero_si256();
    for (int j = 0; j < 8; j++) {
        const __m256i p = _mm256_maddubs_epi16(q[j], _mm256_loadu_si256((const __m256i *)(x->q + 32 * j)));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, scv[j]));
    }
    return s;
}

/* K-quant rows of up to 16 blocks: phase 1 reads each row once from start to end, as stored,
   leaving lane sums S[(r*nb + i)*T + t] (and M for the mins) and the raw scales; phase 2 reduces
   8 rows' lanes at a time (hsum8) into the float chain, without reading a row again. */
static ALWAYS_INLINE void nat_k45(int five, const uint8_t *const rows[8], int64_t nb, const xq256 *X, int64_t ldx,
                                  const int T, __m256 *acc, __m256i *S) {
    const int bytes = five ? 176 : 144;
    __m256i *M = S + nb * T * 8;
    uint32_t *dh = (uint32_t *)(M + nb * T * 8); /* [nb][8] the rows' float16 d and dmin, as stored */
    for (int r = 0; r < 8; r++)
        for (int64_t i = 0; i < nb; i++) {
            const uint8_t *b = rows[r] + i * bytes;
            PREFETCH(b);
            memcpy(dh + i * 8 + r, b, 4);
            __m256i q[8], scv[8], mv;
            k45_codes(five, b, q);
            k_scales(b + 4, scv, &mv);
            for (int t = 0; t < T; t++) {
                const xq256 *x = X + t * ldx + i;
                S[(r * nb + i) * T + t] = k45_lanes(q, scv, x);
                M[(r * nb + i) * T + t] = _mm256_madd_epi16(mv, _mm256_loadu_si256((const __m256i *)x->bsum));
            }
        }
    for (int64_t i = 0; i < nb; i++) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)(dh + i * 8)); /* d | dmin << 16 per row */
        const __m256i lo = _mm256_and_si256(h, _mm256_set1_epi32(0xFFFF)), hi = _mm256_srli_epi32(h, 16);
        const __m256 d = _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1)));
        const __m256 dmin = _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)));
        for (int t = 0; t < T; t++) {
            const __m256 xd = _mm256_set1_ps(X[t * ldx + i].d);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8s(S + i * T + t, nb * T)), _mm256_mul_ps(d, xd), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(hsum8s(M + i * T + t, nb * T)), _mm256_mul_ps(dmin, xd), acc[t]);
        }
    }
}

/* The totals of two vectors of lane sums, as floats (total of a, total of b) in lanes 0 and 1. */
static ALWAYS_INLINE __m128 hsum2f(__m256i a, __m256i b) {
    const __m256i v = _mm256_hadd_epi32(a, b);
    const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_cvtepi32_ps(_mm_hadd_epi32(h, h));
}

/* nat_k45 for long rows (more than 16 blocks): nothing is stored while a row streams by (with
   the lane sums stored, a 9216-value row ran at half the bandwidth); each row's float chain runs
   in lane 0 of a scalar register with the scalar forms of the vector operations (the same IEEE
   operations on the same values, so the same bits). */
static ALWAYS_INLINE void nat_k45_long(int five, const uint8_t *const rows[8], int64_t nb, const xq256 *X, int64_t ldx,
                                       const int T, __m256 *acc) {
    const int bytes = five ? 176 : 144;
    float out[PACK_MIN_T][8];
    for (int r = 0; r < 8; r++) {
        const uint8_t *row = rows[r];
        __m128 a[PACK_MIN_T];
        for (int t = 0; t < T; t++) a[t] = _mm_setzero_ps();
        for (int64_t i = 0; i < nb; i++) {
            const uint8_t *b = row + i * bytes;
            PREFETCH(b);
            const __m128 d = _mm_set_ss(f16_to_f32(rd16(b))), dmin = _mm_set_ss(f16_to_f32(rd16(b + 2)));
            __m256i q[8], scv[8], mv;
            k45_codes(five, b, q);
            k_scales(b + 4, scv, &mv);
            for (int t = 0; t < T; t++) {
                const xq256 *x = X + t * ldx + i;
                const __m128 f = hsum2f(k45_lanes(q, scv, x), _mm256_madd_epi16(mv, _mm256_loadu_si256((const __m256i *)x->bsum)));
                const __m128 xd = _mm_set_ss(x->d);
                a[t] = _mm_fmadd_ss(f, _mm_mul_ss(d, xd), a[t]);
                a[t] = _mm_fnmadd_ss(_mm_movehdup_ps(f), _mm_mul_ss(dmin, xd), a[t]);
            }
        }
        for (int t = 0; t < T; t++) out[t][r] = _mm_cvtss_f32(a[t]);
    }
    for (int t = 0; t < T; t++) acc[t] = _mm256_loadu_ps(out[t]);
}

/* A Q6_K block's codes and scales as madd operands: sub-block k (32 values) has scale 2k on its
   first 16 values (low lane) and 2k+1 on the next 16. */
static ALWAYS_INLINE void q6_prep(const uint8_t *b, __m256i q[8], __m256i scv[8], __m256i *sc16) {
    q6_codes(b, q);
    *sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192)));
    const __m256i lo = _mm256_permute2x128_si256(*sc16, *sc16, 0x00), hi = _mm256_permute2x128_si256(*sc16, *sc16, 0x11);
    for (int k = 0; k < 8; k++)
        scv[k] = _mm256_shuffle_epi8(k < 4 ? lo : hi, _mm256_set_m128i(
            _mm_set1_epi16((short)(0x0100 + 0x0202 * ((2 * k + 1) & 7))), _mm_set1_epi16((short)(0x0100 + 0x0202 * ((2 * k) & 7)))));
}

/* Lane sums of a prepared Q6_K block against activation block x, the codes' -32 taken off. */
static ALWAYS_INLINE __m256i q6_lanes(const __m256i q[8], const __m256i scv[8], __m256i sc16, const xq256 *x) {
    __m256i s = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++) {
        const __m256i p = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)(x->q + 32 * k)));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, scv[k]));
    }
    const __m256i o = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)x->bsum));
    return _mm256_sub_epi32(s, _mm256_slli_epi32(o, 5));
}

/* As nat_k45, for Q6_K. */
static ALWAYS_INLINE void nat_q6(const uint8_t *const rows[8], int64_t nb, const xq256 *X, int64_t ldx, const int T,
                                 __m256 *acc, __m256i *S) {
    uint16_t *dh = (uint16_t *)(S + nb * T * 8); /* [nb][8] the rows' float16 d, as stored */
    for (int r = 0; r < 8; r++)
        for (int64_t i = 0; i < nb; i++) {
            const uint8_t *b = rows[r] + i * 210;
            PREFETCH(b);
            memcpy(dh + i * 8 + r, b + 208, 2);
            __m256i q[8], scv[8], sc16;
            q6_prep(b, q, scv, &sc16);
            for (int t = 0; t < T; t++) S[(r * nb + i) * T + t] = q6_lanes(q, scv, sc16, X + t * ldx + i);
        }
    for (int64_t i = 0; i < nb; i++) {
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dh + i * 8)));
        for (int t = 0; t < T; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8s(S + i * T + t, nb * T)),
                                     _mm256_mul_ps(d, _mm256_set1_ps(X[t * ldx + i].d)), acc[t]);
    }
}

/* nat_q6 for long rows, as nat_k45_long. */
static ALWAYS_INLINE void nat_q6_long(const uint8_t *const rows[8], int64_t nb, const xq256 *X, int64_t ldx,
                                      const int T, __m256 *acc) {
    float out[PACK_MIN_T][8];
    for (int r = 0; r < 8; r++) {
        const uint8_t *row = rows[r];
        __m128 a[PACK_MIN_T];
        for (int t = 0; t < T; t++) a[t] = _mm_setzero_ps();
        for (int64_t i = 0; i < nb; i++) {
            const uint8_t *b = row + i * 210;
            PREFETCH(b);
            const __m128 d = _mm_set_ss(f16_to_f32(rd16(b + 208)));
            __m256i q[8], scv[8], sc16;
            q6_prep(b, q, scv, &sc16);
            for (int t = 0; t < T; t++) {
                const xq256 *x = X + t * ldx + i;
                const __m128 f = _mm_cvtsi32_ss(_mm_setzero_ps(), hsum1(q6_lanes(q, scv, sc16, x)));
                a[t] = _mm_fmadd_ss(f, _mm_mul_ss(d, _mm_set_ss(x->d)), a[t]);
            }
        }
        for (int t = 0; t < T; t++) out[t][r] = _mm_cvtss_f32(a[t]);
    }
    for (int t = 0; t < T; t++) acc[t] = _mm256_loadu_ps(out[t]);
}

static ALWAYS_INLINE void nat_t(int type, const uint8_t *const rows[8], int64_t nb, const void *X, int64_t ldx,
                                const int T, __m256 *acc, __m256i *S) {
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    switch (type) {
    case T_Q4_K:
        if (nb > 16) nat_k45_long(0, rows, nb, (const xq256 *)X, ldx, T, acc);
        else nat_k45(0, rows, nb, (const xq256 *)X, ldx, T, acc, S);
        break;
    case T_Q5_K:
        if (nb > 16) nat_k45_long(1, rows, nb, (const xq256 *)X, ldx, T, acc);
        else nat_k45(1, rows, nb, (const xq256 *)X, ldx, T, acc, S);
        break;
    case T_Q6_K:
        if (nb > 16) nat_q6_long(rows, nb, (const xq256 *)X, ldx, T, acc);
        else nat_q6(rows, nb, (const xq256 *)X, ldx, T, acc, S);
        break;
    case T_Q4_0: nat_32(T_Q4_0, rows, nb, (const xq32 *)X, ldx, T, acc, (int32_t *)S); break;
    case T_Q5_0: nat_32(T_Q5_0, rows, nb, (const xq32 *)X, ldx, T, acc, (int32_t *)S); break;
    default: nat_32(T_Q8_0, rows, nb, (const xq32 *)X, ldx, T, acc, (int32_t *)S); break;
    }
}

/* T below the packing threshold: each count compiled on its own, with constant loop bounds. */
static void nat_group(int type, const uint8_t *const rows[8], int64_t nb, const void *X, int64_t ldx, int T,
                      __m256 *acc, __m256i *S) {
    switch (T) {
    case 1: nat_t(type, rows, nb, X, ldx, 1, acc, S); break;
    case 2: nat_t(type, rows, nb, X, ldx, 2, acc, S); break;
    case 3: nat_t(type, rows, nb, X, ldx, 3, acc, S); break;
    case 4: nat_t(type, rows, nb, X, ldx, 4, acc, S); break;
    case 5: nat_t(type, rows, nb, X, ldx, 5, acc, S); break;
    case 6: nat_t(type, rows, nb, X, ldx, 6, acc, S); break;
    default: nat_t(type, rows, nb, X, ldx, 7, acc, S); break;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAVE_GROUP16 1
/* The 32 unsigned codes of one block of two rows, side by side (row a in the low half). */
static ALWAYS_INLINE __m512i ucodes32x2(int type, const uint8_t *a, const uint8_t *b) {
    if (type == T_Q8_0) {
        const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(a + 2))),
                                             _mm256_loadu_si256((const __m256i *)(b + 2)), 1);
        return _mm512_xor_si512(q, _mm512_set1_epi8((char)0x80));
    }
    return _mm512_inserti64x4(_mm512_castsi256_si512(codes_q45_0(type, a)), codes_q45_0(type, b), 1);
}

/* transpose8 on both 256-bit halves at once (v[m] = rows m and m + 8): c[k] lane r = dword k of
   row r, r < 16. The last step crosses 128-bit lanes with vpermt2q. */
static ALWAYS_INLINE void transpose8x2(const __m512i v[8], __m512i c[8]) {
    const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    __m512i w[8], u[8];
    for (int m = 0; m < 8; m++)
        w[m] = m & 1 ? _mm512_unpackhi_epi32(v[m - 1], v[m]) : _mm512_unpacklo_epi32(v[m], v[m + 1]);
    for (int m = 0; m < 8; m++) {
        const __m512i *a = w + 4 * (m / 4) + (m / 2) % 2;
        u[m] = m & 1 ? _mm512_unpackhi_epi64(a[0], a[2]) : _mm512_unpacklo_epi64(a[0], a[2]);
    }
    for (int k = 0; k < 8; k++) c[k] = _mm512_permutex2var_epi64(u[k % 4], k < 4 ? lo : hi, u[4 + k % 4]);
}

/* pack_32 + run_32 for 16 weight rows, block by block in 512-bit registers (2-8 activation
   rows): c[k] lane r = codes 4k..4k+3 of row r, so one vpdpbusd with four activation codes
   broadcast meets 16 rows, with the same integers and float steps. */
static ALWAYS_INLINE void fused16_32(int type, const uint8_t *const rows[16], __m512i offs, const uint8_t *ahead,
                                     int64_t step, int64_t nb, const xq32 *X, int64_t ldx, const int n, __m512 *acc) {
    const int off = type == T_Q4_0 ? 8 : type == T_Q5_0 ? 16 : 128;
    const int bytes = type == T_Q8_0 ? 34 : type == T_Q5_0 ? 22 : 18;
    for (int t = 0; t < n; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m512i v[8], c[8], s[8];
        for (int m = 0; m < 8; m++) {
            const uint8_t *a = rows[m] + i * bytes, *b = rows[m + 8] + i * bytes;
            v[m] = ucodes32x2(type, a, b);
        }
        /* The next group's rows (contiguous after these) come in while this one runs: 16 rows
           read side by side are too many streams for the hardware prefetchers. */
        for (const uint8_t *p = ahead + i * step; p < ahead + (i + 1) * step; p += 64) _mm_prefetch((const char *)p, _MM_HINT_T0);
        /* the 16 scales gathered, not stored and reloaded (a store-forwarding stall a block) */
        const __m256i dh = _mm512_cvtepi32_epi16(_mm512_i32gather_epi32(offs, rows[0] + i * bytes, 1));
        transpose8x2(v, c);
        for (int t = 0; t < n; t++) s[t] = _mm512_setzero_si512();
        for (int k = 0; k < 8; k++)
            for (int t = 0; t < n; t++) {
                int32_t x4;
                memcpy(&x4, X[t * ldx + i].q + 4 * k, 4);
                s[t] = _mm512_dpbusd_epi32(s[t], c[k], _mm512_set1_epi32(x4));
            }
        const __m512 d = _mm512_cvtph_ps(dh);
        for (int t = 0; t < n; t++) {
            const xq32 *x = X + t * ldx + i;
            s[t] = _mm512_sub_epi32(s[t], _mm512_set1_epi32(off * x->sum));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[t]), _mm512_mul_ps(d, _mm512_set1_ps(x->d)), acc[t]);
        }
    }
}

static void group16_32(int type, const uint8_t *W, int64_t row_bytes, int nr, int64_t nb, const xq32 *X, int64_t T,
                       float *Y, int64_t ldy) {
    const uint8_t *rows[16];
    int32_t off[16];
    for (int r = 0; r < 16; r++) {
        off[r] = (int32_t)((r < nr ? r : nr - 1) * row_bytes);
        rows[r] = W + off[r];
    }
    const __m512i offs = _mm512_loadu_si512(off);
    const uint8_t *ahead = W + 16 * row_bytes;
    const int64_t step = (16 * row_bytes + nb - 1) / nb; /* bytes of the next group to prefetch a block */
    __m512 acc[8];
    switch (T) {
    case 1: fused16_32(type, rows, offs, ahead, step, nb, X, nb, 1, acc); break;
    case 2: fused16_32(type, rows, offs, ahead, step, nb, X, nb, 2, acc); break;
    case 3: fused16_32(type, rows, offs, ahead, step, nb, X, nb, 3, acc); break;
    case 4: fused16_32(type, rows, offs, ahead, step, nb, X, nb, 4, acc); break;
    case 5: fused16_32(type, rows, offs, ahead, step, nb, X, nb, 5, acc); break;
    case 6: fused16_32(type, rows, offs, ahead, step, nb, X, nb, 6, acc); break;
    case 7: fused16_32(type, rows, offs, ahead, step, nb, X, nb, 7, acc); break;
    default: fused16_32(type, rows, offs, ahead, step, nb, X, nb, 8, acc); break;
    }
    const __mmask16 keep = (__mmask16)((1u << nr) - 1);
    for (int t = 0; t < (int)T; t++) _mm512_mask_storeu_ps(Y + t * ldy, keep, acc[t]);
}
#endif

int pack8_group_rows(int type, int64_t T) {
#ifdef HAVE_GROUP16
    if ((type == T_Q4_0 || type == T_Q5_0 || type == T_Q8_0) && T >= GROUP16_MIN_T && T <= GROUP16_MAX_T) return 16;
#endif
    (void)type; (void)T;
    return 8;
}

static void store_rows(const __m256 *acc, int n, int nr, float *Y, int64_t ldy) {
    for (int t = 0; t < n; t++) {
        float v[8];
        _mm256_storeu_ps(v, acc[t]);
        for (int r = 0; r < nr; r++) Y[t * ldy + r] = v[r];
    }
}

void pack8_group(int type, const uint8_t *W, int64_t row_bytes, int nr, int64_t ncols, const void *XQ, int64_t T,
                 float *Y, int64_t ldy, void *buf) {
    const uint8_t *rows[8];
    for (int r = 0; r < 8; r++) rows[r] = W + (r < nr ? r : nr - 1) * row_bytes; /* pad with the last row */
    const int xb = type == T_Q4_K || type == T_Q5_K || type == T_Q6_K ? 256 : 32;
    const int64_t nb = ncols / xb;
    const size_t xs = xb == 32 ? sizeof(xq32) : sizeof(xq256);
#ifdef HAVE_GROUP16
    if (nr > 8) {  /* a caller that asked pack8_group_rows for 16-row groups */
        group16_32(type, W, row_bytes, nr, nb, (const xq32 *)XQ, T, Y, ldy);
        return;
    }
#endif
    if (T < (xb == 32 ? PACK_MIN_T_32 : PACK_MIN_T)) {
        __m256 acc[PACK_MIN_T];
        nat_group(type, rows, nb, XQ, nb, (int)T, acc, buf);
        store_rows(acc, (int)T, nr, Y, ldy);
        return;
    }
    switch (type) {
    case T_Q4_K: pack_k45(0, rows, nb, buf); break;
    case T_Q5_K: pack_k45(1, rows, nb, buf); break;
    case T_Q6_K: pack_q6(rows, nb, buf); break;
    default: pack_32(type, rows, nb, buf); break;
    }
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) {
        __m256 acc[4];
        run_n(type, buf, nb, (const char *)XQ + (size_t)(t * nb) * xs, nb, 4, acc);
        store_rows(acc, 4, nr, Y + t * ldy, ldy);
    }
    for (; t < T; t++) {
        __m256 acc[1];
        run_n(type, buf, nb, (const char *)XQ + (size_t)(t * nb) * xs, nb, 1, acc);
        store_rows(acc, 1, nr, Y + t * ldy, ldy);
    }
}

#else
int pack8_supported(int type) { (void)type; return 0; }
int pack8_group_rows(int type, int64_t T) { (void)type; (void)T; return 8; }
#endif
