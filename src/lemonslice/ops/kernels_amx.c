/* The 8-bit path of the main types on AMX tiles, 16 weight rows at a time, for prompt chunks.
 *
 * One tile product multiplies 16 activation rows by 16 weight rows over up to 64 values, into
 * exact int32 sums:
 * - Q4_K/Q5_K (`tdpbusd`, weights as A): each row's codes times one digit of their sub-block's
 *   6-bit scale (sc = hi * base + lo, both products below 256), so two tiles per 64 values add
 *   up sum_j sc_j * dot_j with no multiply after them; B holds the activation codes.
 * - Q4_0/Q5_0/Q8_0, IQ4_NL and MXFP4 (weights as B, 4 codes of each of 16 rows per 64-byte
 *   row): one tile per block, A the activation codes as unsigned bytes (x + 128, made in place),
 *   the +128 taken off as 128 * (sum of the row's codes), known when the group is packed.
 * - Q2_K, Q3_K, IQ4_XS and the IQ grid types (`tdpbssd`, weights as A): each block decoded once
 *   into signed codes (types_block_i8), one tile product per sub-block of 16 or 32 values
 *   (Q2_K's scales folded into its codes: one per 64 values), its sums times the sub-block's
 *   multiplier in int32 lanes.
 *
 * The integers are the ones kernels_pack8.c forms, exactly (per block: sum_j sc_j * dot_j and
 * the mins' sum), and the float steps after them are the same operations in the same order, so
 * a row's result has the same bits on either path: the batch a row is in still does not matter.
 */
#include "kernels_common.h"

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
/* Activation rows from which a call goes through the tiles (rows are padded to 16). */
#define AMX_MIN_T 16
#define AMX_MIN_T_32 32 /* measured: below it the 32-value blocks gain nothing */

static int amx_on;

int ls_amx_enable(int on) {
    /* Linux hands a process the tile state only on request. */
    if (on && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) on = 0;
    amx_on = on;
    return on;
}

/* The 256-value types whose blocks types_block_i8 decodes into signed codes. */
static int gen_type(int type) {
    switch (type) {
    case T_Q2_K: case T_Q3_K: case T_IQ4_XS: case T_IQ2_XXS: case T_IQ2_XS: case T_IQ2_S: case T_IQ3_XXS:
    case T_IQ3_S: case T_IQ1_S: case T_IQ1_M: return types_q8_block(type) == 256;
    default: return 0;
    }
}

static int tile32_type(int type) {
    return type == T_Q4_0 || type == T_Q5_0 || type == T_Q8_0 || type == T_IQ4_NL || type == T_MXFP4;
}

int amx_supported(int type, int64_t T) {
    if (!amx_on) return 0;
    if (type == T_Q4_K || type == T_Q5_K || gen_type(type)) return T >= AMX_MIN_T;
    return tile32_type(type) && T >= AMX_MIN_T_32;
}

/* One packed block of a group of 16 rows of a 32-value type: q[k] = codes 4k..4k+3 of rows 0..15
   (a B tile), the rows' scales, and w128 = 128 * (sum of the row's codes). */
typedef struct { int8_t q[8][64]; int32_t w128[16]; float d[16]; } ak32;
/* Q4_K/Q5_K are the other way round: A holds 16 weight rows' codes times a digit of their
   sub-block's scale (sc = hi * base + lo, both products below 256), so the scales need no
   multiply after the tiles; B holds 16 activation rows' codes, 4 of each per 64-byte row. */
typedef struct { uint8_t a[2][4][16][64]; int32_t mp[16][4]; float d[16], dmin[16]; } ak45;
/* The other 256-value types (gen_type): 16 rows' signed codes (A tiles of any sub-block: rows
   256 bytes apart), multipliers mult[j][r] of sub-block j, Q2_K's mins as int16 pairs mp[p][r]
   (sub-blocks 2p, 2p + 1). */
typedef struct { int8_t q[16][256]; int32_t mult[16][16], mp[8][16]; float d[16], dmin[16]; } agen;
/* 16 activation rows of a 256-value block: B tiles q[g][k] (values 64g + 4k..+3 of rows 0..15),
   sums per 32 values as int16 pairs bp[j] (sub-blocks 2j, 2j + 1), the same per 16 values bp16. */
typedef struct { int8_t q[4][16][64]; int32_t bp[4][16], bp16[8][16]; float d[16]; } ax256;

size_t amx_bytes(int type, int64_t ncols) {
    if (tile32_type(type)) return (size_t)(ncols / 32) * sizeof(ak32);
    if (type == T_Q4_K || type == T_Q5_K) return (size_t)(ncols / 256) * sizeof(ak45);
    return gen_type(type) ? (size_t)(ncols / 256) * sizeof(agen) : 0;
}

/* Activation codes x -> x + 128 as unsigned bytes (XOR 0x80): the A tiles' operand. */
static void amx_bias_rows(xq32 *X, int64_t nblocks) {
    const __m256i bit = _mm256_set1_epi8((char)0x80);
    for (int64_t i = 0; i < nblocks; i++)
        _mm256_storeu_si256((__m256i *)X[i].q, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)X[i].q), bit));
}

/* 16 rows' 32 codes (v[r]) -> out + 64k: codes 4k..4k+3 of rows 0..15, k < 8. */
static ALWAYS_INLINE void transpose16(const __m256i v[16], int8_t *out) {
    __m256i a[8], b[8];
    transpose8(v, a);
    transpose8(v + 8, b);
    for (int k = 0; k < 8; k++) {
        _mm256_storeu_si256((__m256i *)(out + 64 * k), a[k]);
        _mm256_storeu_si256((__m256i *)(out + 64 * k + 32), b[k]);
    }
}

/* The sum of 32 signed bytes. */
static ALWAYS_INLINE int32_t sum_s8(__m256i v) {
    const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), v), _mm256_set1_epi16(1));
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
}

static void pack_32(int type, const uint8_t *const rows[16], int64_t nb, ak32 *out) {
    const int bytes = type == T_Q8_0 ? 34 : type == T_Q5_0 ? 22 : type == T_MXFP4 ? 17 : 18;
    const int other = type == T_IQ4_NL || type == T_MXFP4;
    for (int64_t i = 0; i < nb; i++) {
        __m256i v[16];
        for (int r = 0; r < 16; r++) {
            const uint8_t *b = rows[r] + i * bytes;
            PREFETCH(b);
            if (other) {
                int8_t q[32];
                types_block32_i8(type, b, q, &out[i].d[r]);
                v[r] = _mm256_loadu_si256((const __m256i *)q);
            } else {
                v[r] = type == T_Q8_0 ? _mm256_loadu_si256((const __m256i *)(b + 2)) : codes_q45_0(type, b);
                out[i].d[r] = f16_to_f32(rd16(b));
            }
            out[i].w128[r] = 128 * sum_s8(v[r]);
        }
        transpose16(v, out[i].q[0]);
    }
}

/* The digit base of Q4_K's (codes < 16) and Q5_K's (codes < 32) scales: code * digit < 256. */
#define K45_SHIFT(five) ((five) ? 3 : 4)

static void pack_k45(int five, const uint8_t *const rows[16], int64_t nb, ak45 *out) {
    const int bytes = five ? 176 : 144, shift = K45_SHIFT(five);
    for (int64_t i = 0; i < nb; i++)
        for (int r = 0; r < 16; r++) {
            const uint8_t *b = rows[r] + i * bytes;
            PREFETCH(b);
            __m256i q[8];
            uint8_t sc[8], m[8];
            k45_codes(five, b, q);
            out[i].d[r] = f16_to_f32(rd16(b));
            out[i].dmin[r] = f16_to_f32(rd16(b + 2));
            for (int j = 0; j < 8; j++) {
                scale_min_k4(j, b + 4, &sc[j], &m[j]);
                /* bytes times a digit below 256 in 16-bit lanes: the low byte's product never carries */
                const __m256i hi = _mm256_mullo_epi16(q[j], _mm256_set1_epi16((short)(sc[j] >> shift)));
                const __m256i lo = _mm256_mullo_epi16(q[j], _mm256_set1_epi16((short)(sc[j] & ((1 << shift) - 1))));
                _mm256_storeu_si256((__m256i *)(out[i].a[0][j / 2][r] + 32 * (j & 1)), hi);
                _mm256_storeu_si256((__m256i *)(out[i].a[1][j / 2][r] + 32 * (j & 1)), lo);
            }
            for (int j = 0; j < 4; j++) out[i].mp[r][j] = m[2 * j] | ((int32_t)m[2 * j + 1] << 16);
        }
}

/* 16 rows' blocks decoded into signed codes (gen_type); the sub-block width, 0 if refused. */
static int pack_gen(int type, const uint8_t *const rows[16], int64_t nb, agen *out) {
    int block, bytes, sub = 0;
    deq_fn deq;
    if (types_info(type, &block, &bytes, &deq)) return 0;
    for (int64_t i = 0; i < nb; i++)
        for (int r = 0; r < 16; r++) {
            const uint8_t *b = rows[r] + i * bytes;
            PREFETCH(b);
            int32_t mult[16];
            int16_t m[16];
            sub = types_block_i8(type, b, out[i].q[r], mult, &out[i].d[r], &out[i].dmin[r], m);
            for (int j = 0; j < 256 / sub; j++) out[i].mult[j][r] = mult[j];
            if (type == T_Q2_K)
                for (int p = 0; p < 8; p++) out[i].mp[p][r] = (uint16_t)m[2 * p] | ((int32_t)m[2 * p + 1] << 16);
        }
    return sub;
}

/* 16 activation rows of one block -> B tiles: q[g][k] = codes 64g + 4k..+3 of rows 0..15, and the
   rows' scales and sub-block code sums (int16 pairs of sub-blocks 2j, 2j + 1). */
static void amx_pack_x256(const xq256 *X, int64_t ldx, ax256 *out) {
    for (int t = 0; t < 16; t++) {
        const xq256 *x = X + t * ldx;
        out->d[t] = x->d;
        const __m128i bs = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)x->bsum),
                                          _mm_loadu_si128((const __m128i *)(x->bsum + 8)));
        int32_t p[4], p16[8];
        _mm_storeu_si128((__m128i *)p, bs);
        for (int j = 0; j < 4; j++) out->bp[j][t] = p[j];
        memcpy(p16, x->bsum, sizeof p16); /* int16 sums of 16 values, read as pairs */
        for (int j = 0; j < 8; j++) out->bp16[j][t] = p16[j];
        const int32_t *w = (const int32_t *)x->q;
        for (int g = 0; g < 4; g++)
            for (int k = 0; k < 16; k++) memcpy(&out->q[g][k][4 * t], w + 16 * g + k, 4);
    }
}

/* The 32-value types: tile 0 C (16 activation rows x 16 weight rows, int32), 1 A (16 activation
   rows x 32 codes), 2 B (8 rows of 4 codes of 16 weight rows). Q4_K/Q5_K: see run_k45. */
static void tiles(int type, int sub) {
    struct { uint8_t palette, start, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    const int k45 = type == T_Q4_K || type == T_Q5_K;
    for (int n = 0; n < (k45 ? 5 : 3); n++) cfg.rows[n] = 16, cfg.colsb[n] = 64;
    if (sub) { /* gen_type: 1 A (16 weight rows x w codes), 2 B (w / 4 rows of 16 activation rows' codes) */
        const int w = sub < 64 ? sub : 64;
        cfg.colsb[1] = (uint16_t)w, cfg.rows[2] = (uint8_t)(w / 4);
    } else if (!k45) {
        cfg.colsb[1] = 32, cfg.rows[2] = 8;
    }
    _tile_loadconfig(&cfg);
}

/* C = A (activation codes at q, rows `stride` bytes apart) x B (packed codes) -> C[t] lane r. */
static ALWAYS_INLINE void tile_dot(const int8_t *q, size_t stride, const int8_t *b, int32_t (*C)[16]) {
    _tile_zero(0);
    _tile_loadd(1, q, stride);
    _tile_loadd(2, b, 64);
    _tile_dpbusd(0, 1, 2);
    _tile_stored(0, C, 64);
}

static void run_32(int type, const ak32 *P, int64_t nb, const xq32 *X, int64_t ldx, __m512 *acc) {
    const int off = type == T_Q4_0 ? 8 : type == T_Q5_0 ? 16 : 0;
    int32_t C[16][16] __attribute__((aligned(64)));
    for (int t = 0; t < 16; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        tile_dot(X[i].q, (size_t)ldx * sizeof(xq32), P[i].q[0], C);
        const __m512 d = _mm512_loadu_ps(P[i].d);
        const __m512i w = _mm512_loadu_si512(P[i].w128);
        for (int t = 0; t < 16; t++) {
            const xq32 *x = X + t * ldx + i;
            const __m512i s = _mm512_sub_epi32(_mm512_sub_epi32(_mm512_load_si512(C[t]), w), _mm512_set1_epi32(off * x->sum));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(x->d)), acc[t]);
        }
    }
}

/* 16 weight rows x 16 activation rows -> acc[r] lane t. Tiles: 0, 1 C (hi, lo digit); 2, 3 A; 4 B. */
static void run_k45(int five, const ak45 *P, int64_t nb, const ax256 *X, __m512 *acc) {
    int32_t C[2][16][16] __attribute__((aligned(64)));
    const int shift = K45_SHIFT(five);
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        _tile_zero(0);
        _tile_zero(1);
        for (int g = 0; g < 4; g++) {
            _tile_loadd(2, P[i].a[0][g][0], 64);
            _tile_loadd(3, P[i].a[1][g][0], 64);
            _tile_loadd(4, X[i].q[g][0], 64);
            _tile_dpbusd(0, 2, 4);
            _tile_dpbusd(1, 3, 4);
        }
        _tile_stored(0, C[0], 64);
        _tile_stored(1, C[1], 64);
        const __m512 xd = _mm512_loadu_ps(X[i].d);
        const __m512i b0 = _mm512_loadu_si512(X[i].bp[0]), b1 = _mm512_loadu_si512(X[i].bp[1]);
        const __m512i b2 = _mm512_loadu_si512(X[i].bp[2]), b3 = _mm512_loadu_si512(X[i].bp[3]);
        for (int r = 0; r < 16; r++) {
            const int32_t *mp = P[i].mp[r];
            const __m512i is = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(C[0][r]), shift),
                                                _mm512_load_si512(C[1][r]));
            __m512i mn = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_set1_epi32(mp[0]), b0);
            mn = _mm512_dpwssd_epi32(mn, _mm512_set1_epi32(mp[1]), b1);
            mn = _mm512_dpwssd_epi32(mn, _mm512_set1_epi32(mp[2]), b2);
            mn = _mm512_dpwssd_epi32(mn, _mm512_set1_epi32(mp[3]), b3);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(_mm512_set1_ps(P[i].d[r]), xd), acc[r]);
            acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mn), _mm512_mul_ps(_mm512_set1_ps(P[i].dmin[r]), xd), acc[r]);
        }
    }
}

/* gen_type: 16 weight rows x 16 activation rows -> acc[r] lane t; sub-blocks of `sub` values. */
static void run_gen(int sub, int mins, const agen *P, int64_t nb, const ax256 *X, __m512 *acc) {
    int32_t C[16][16] __attribute__((aligned(64)));
    const int w = sub < 64 ? sub : 64;
    for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m512i S[16];
        for (int r = 0; r < 16; r++) S[r] = _mm512_setzero_si512();
        for (int o = 0; o < 256; o += sub) {
            _tile_zero(0);
            for (int c = o; c < o + sub; c += w) {
                _tile_loadd(1, P[i].q[0] + c, 256);
                _tile_loadd(2, X[i].q[c / 64][(c % 64) / 4], 64);
                _tile_dpbssd(0, 1, 2);
            }
            _tile_stored(0, C, 64);
            if (sub == 256) {
                for (int r = 0; r < 16; r++) S[r] = _mm512_load_si512(C[r]);
            } else {
                const int32_t *m = P[i].mult[o / sub];
                for (int r = 0; r < 16; r++)
                    S[r] = _mm512_add_epi32(S[r], _mm512_mullo_epi32(_mm512_load_si512(C[r]), _mm512_set1_epi32(m[r])));
            }
        }
        const __m512 xd = _mm512_loadu_ps(X[i].d);
        for (int r = 0; r < 16; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(S[r]), _mm512_mul_ps(_mm512_set1_ps(P[i].d[r]), xd), acc[r]);
        if (mins)
            for (int r = 0; r < 16; r++) {
                __m512i mn = _mm512_setzero_si512();
                for (int p = 0; p < 8; p++)
                    mn = _mm512_dpwssd_epi32(mn, _mm512_set1_epi32(P[i].mp[p][r]), _mm512_loadu_si512(X[i].bp16[p]));
                acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mn), _mm512_mul_ps(_mm512_set1_ps(P[i].dmin[r]), xd), acc[r]);
            }
    }
}

size_t amx_x_bytes(int type, int64_t tp, int64_t ncols) {
    const int x256 = type == T_Q4_K || type == T_Q5_K || gen_type(type);
    return x256 ? (size_t)(tp / 16) * (size_t)(ncols / 256) * sizeof(ax256) : 0;
}

/* Activation rows [16 tg, 16 tg + 16) of XQ, quantized: Q4_K/Q5_K's B tiles into XA; the
   32-value types' codes biased in place. */
void amx_prepare_x(int type, void *XQ, int64_t nb, int64_t tg, void *XA) {
    if (type == T_Q4_K || type == T_Q5_K || gen_type(type)) {
        for (int64_t i = 0; i < nb; i++) amx_pack_x256((const xq256 *)XQ + tg * 16 * nb + i, nb, (ax256 *)XA + tg * nb + i);
        return;
    }
    amx_bias_rows((xq32 *)XQ + tg * 16 * nb, 16 * nb);
}

/* Rows [W, W + nr) (nr <= 16) times the prepared activations XA (T rows, amx_prepare_x)
   -> Y[t * ldy + r]; buf holds the packed group (amx_bytes). */
void amx_group16(int type, const uint8_t *W, int64_t row_bytes, int nr, int64_t ncols, const void *XA, int64_t T,
                 float *Y, int64_t ldy, void *buf) {
    const uint8_t *rows[16];
    for (int r = 0; r < 16; r++) rows[r] = W + (r < nr ? r : nr - 1) * row_bytes; /* pad with the last row */
    const int k45 = type == T_Q4_K || type == T_Q5_K, gen = gen_type(type);
    const int64_t nb = ncols / (k45 || gen ? 256 : 32);
    int sub = 0;
    if (k45) pack_k45(type == T_Q5_K, rows, nb, buf);
    else if (gen) sub = pack_gen(type, rows, nb, buf);
    else pack_32(type, rows, nb, buf);
    tiles(type, sub);
    for (int64_t t0 = 0; t0 < T; t0 += 16) {
        __m512 acc[16];
        float v[16][16];
        const int nt = (int)(T - t0 < 16 ? T - t0 : 16);
        if (k45 || gen) { /* acc[r] lane t */
            if (gen) run_gen(sub, type == T_Q2_K, buf, nb, (const ax256 *)XA + (t0 / 16) * nb, acc);
            else run_k45(type == T_Q5_K, buf, nb, (const ax256 *)XA + (t0 / 16) * nb, acc);
            for (int r = 0; r < 16; r++) _mm512_storeu_ps(v[r], acc[r]);
            for (int t = 0; t < nt; t++)
                for (int r = 0; r < nr; r++) Y[(t0 + t) * ldy + r] = v[r][t];
        } else { /* acc[t] lane r */
            run_32(type, buf, nb, (const xq32 *)XA + t0 * nb, nb, acc);
            for (int t = 0; t < nt; t++) {
                _mm512_storeu_ps(v[t], acc[t]);
                memcpy(Y + (t0 + t) * ldy, v[t], (size_t)nr * sizeof(float));
            }
        }
    }
    _tile_release();
}

#else
int ls_amx_enable(int on) { (void)on; return 0; }
int amx_supported(int type, int64_t T) { (void)type; (void)T; return 0; }
size_t amx_bytes(int type, int64_t ncols) { (void)type; (void)ncols; return 0; }
size_t amx_x_bytes(int type, int64_t tp, int64_t ncols) { (void)type; (void)tp; (void)ncols; return 0; }
void amx_prepare_x(int type, void *XQ, int64_t nb, int64_t tg, void *XA) { (void)type; (void)XQ; (void)nb; (void)tg; (void)XA; }
void amx_group16(int type, const uint8_t *W, int64_t row_bytes, int nr, int64_t ncols, const void *XA, int64_t T,
                 float *Y, int64_t ldy, void *buf) {
    (void)type; (void)W; (void)row_bytes; (void)nr; (void)ncols; (void)XA; (void)T; (void)Y; (void)ldy; (void)buf;
}
#endif
