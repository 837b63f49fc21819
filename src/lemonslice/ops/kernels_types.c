/* More weight types for kernels.c, built into the same library (see kernels.py):
 * Q2_K, Q3_K, IQ4_NL, IQ4_XS, MXFP4 and the IQ2/IQ3 grid types: block decoders (bit for bit
 * gguf-py's arithmetic),
 * their 8-bit-activation row kernels, and F16/BF16 rows times float activations.
 * kernels.c asks types_info / types_q8_block / types_row_q8 for any type it does not know.
 */
#include "kernels_common.h"

/* The 16 values a 4-bit code stands for (ggml format constants): IQ4_NL/IQ4_XS's non-linear
   levels, and MXFP4's e2m1 values doubled (its e8m0 scale is halved to match). */
static const int8_t KV_IQ4[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static const int8_t KV_MXFP4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

/* The 16 signed 6-bit scales of a Q3_K block: low nibbles in bytes 0..7 (scales 0..7, then
   the high nibbles for 8..15), top two bits as 2-bit fields of bytes 8..11. */
static inline void q3_k_scales(const uint8_t *s, int8_t *out) {
    for (int j = 0; j < 16; j++) {
        const int lo = j < 8 ? s[j] & 15 : s[j - 8] >> 4;
        const int hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
        out[j] = (int8_t)((lo | (hi << 4)) - 32);
    }
}

/* The 8 signed 6-bit scales of an IQ4_XS block: low nibbles from bytes 4..7, top bits from
   the little-endian u16 at bytes 2..3. */
static inline void iq4_xs_scales(const uint8_t *b, int16_t *out) {
    const uint16_t h = rd16(b + 2);
    for (int j = 0; j < 8; j++)
        out[j] = (int16_t)((((b[4 + j / 2] >> (4 * (j % 2))) & 15) | (((h >> (2 * j)) & 3) << 4)) - 32);
}

/* Half of 2^(e - 127) as float32, exactly (e < 2 lands in the subnormal range). */
static inline float e8m0_half(uint8_t e) {
    const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---- block decoders (each product rounded as gguf-py rounds it) ---- */

/* Q2_K (84 bytes): 16 4-bit scale/min pairs, 64 bytes of 2-bit codes, f16 d and dmin.
   Value 128n + 32j + l is bits 2j of byte 32n + l, in sub-block 8n + 2j + l/16. */
static void deq_q2_k(const uint8_t *b, float *y) {
    const float d = f16_to_f32(rd16(b + 80)), dmin = f16_to_f32(rd16(b + 82));
    for (int v = 0; v < 256; v += 16) {
        const int n = v / 128, j = (v / 32) % 4, l0 = v % 32, sc = b[v / 16];
        const float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
        for (int l = 0; l < 16; l++) y[v + l] = dl * (float)((b[16 + 32 * n + l0 + l] >> (2 * j)) & 3) - ml;
    }
}

/* Q3_K (110 bytes): hmask (32), 2-bit codes (64), scales (12), f16 d. Value 128n + 32j + l
   has low bits 2j of byte 32n + l and loses 4 where bit 4n + j of hmask[l] is clear. */
static void deq_q3_k(const uint8_t *b, float *y) {
    const float d = f16_to_f32(rd16(b + 108));
    int8_t sc[16];
    q3_k_scales(b + 96, sc);
    for (int v = 0; v < 256; v += 16) {
        const int n = v / 128, j = (v / 32) % 4, l0 = v % 32;
        const float dl = d * (float)sc[v / 16];
        for (int l = l0; l < l0 + 16; l++) {
            const int lo = (b[32 + 32 * n + l] >> (2 * j)) & 3, h = (b[l] >> (4 * n + j)) & 1;
            y[v + l - l0] = dl * ((float)lo - (float)((h ^ 1) << 2));
        }
    }
}

/* IQ4_NL (18 bytes): f16 d, 16 bytes of codes (low nibbles values 0..15, high 16..31). */
static void deq_iq4_nl(const uint8_t *b, float *y) {
    const float d = f16_to_f32(rd16(b));
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)KV_IQ4[b[2 + j] & 15];
        y[j + 16] = d * (float)KV_IQ4[b[2 + j] >> 4];
    }
}

/* IQ4_XS (136 bytes): f16 d, scales (6 bytes), then 8 sub-blocks of 32 codes as IQ4_NL's. */
static void deq_iq4_xs(const uint8_t *b, float *y) {
    const float d = f16_to_f32(rd16(b));
    int16_t ls[8];
    iq4_xs_scales(b, ls);
    for (int j = 0; j < 8; j++) {
        const float dl = d * (float)ls[j];
        const uint8_t *qs = b + 8 + 16 * j;
        for (int l = 0; l < 16; l++) {
            y[32 * j + l] = dl * (float)KV_IQ4[qs[l] & 15];
            y[32 * j + 16 + l] = dl * (float)KV_IQ4[qs[l] >> 4];
        }
    }
}

/* MXFP4 (17 bytes): e8m0 exponent, 16 bytes of e2m1 codes laid out as IQ4_NL's. */
static void deq_mxfp4(const uint8_t *b, float *y) {
    const float d = e8m0_half(b[0]);
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)KV_MXFP4[b[1 + j] & 15];
        y[j + 16] = d * (float)KV_MXFP4[b[1 + j] >> 4];
    }
}

/* ---- IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M: grid codes ----
 * Each run of 8 (IQ2, IQ1) or 4 (IQ3) values is one entry of a fixed grid of magnitudes, with
 * one sign per value, and one 3- or 4-bit scale s per 16 or 32 values. IQ1's grid holds
 * -1/0/1 with a shift of +-1/8 per entry: as codes 8g +- 1, magnitude and sign. The grids and the 128 sign
 * patterns (ksigns) are format data: kernels.py takes them from gguf-py and hands them over
 * once (ls_set_table); until all are set these types are reported unsupported. */

static uint8_t GRID_IQ2_XXS[256 * 8], GRID_IQ2_XS[512 * 8], GRID_IQ2_S[1024 * 8];
static uint8_t GRID_IQ3_XXS[256 * 4], GRID_IQ3_S[512 * 4], KSIGNS[128];
static int8_t GRID_IQ1[2048 * 8]; /* IQ1_S's grid, shared by IQ1_M */
static uint64_t KSIGN_PM[128]; /* each sign pattern as 8 bytes of +1 / -1 (0x01 / 0xFF) */
static int tables_set; /* one bit per table */

/* Copy one table in: `which` is the grid's type id, or 0 for the sign patterns. */
int ls_set_table(int which, const uint8_t *data, int64_t n) {
    const struct { int type; uint8_t *dst; int64_t n; } t[] = {
        {T_IQ2_XXS, GRID_IQ2_XXS, sizeof GRID_IQ2_XXS}, {T_IQ2_XS, GRID_IQ2_XS, sizeof GRID_IQ2_XS},
        {T_IQ2_S, GRID_IQ2_S, sizeof GRID_IQ2_S}, {T_IQ3_XXS, GRID_IQ3_XXS, sizeof GRID_IQ3_XXS},
        {T_IQ3_S, GRID_IQ3_S, sizeof GRID_IQ3_S}, {0, KSIGNS, sizeof KSIGNS},
        {T_IQ1_S, (uint8_t *)GRID_IQ1, sizeof GRID_IQ1}};
    for (int i = 0; i < 7; i++) {
        if (t[i].type != which) continue;
        if (n != t[i].n) return -1;
        memcpy(t[i].dst, data, (size_t)n);
        tables_set |= 1 << i;
        for (int k = 0; k < 128 && which == 0; k++) {
            KSIGN_PM[k] = 0;
            for (int j = 0; j < 8; j++) KSIGN_PM[k] |= (uint64_t)((KSIGNS[k] >> j) & 1 ? 0xFF : 0x01) << (8 * j);
        }
        return 0;
    }
    return -1;
}

static inline int iq_ready(void) { return tables_set == 127; }

/* One block taken apart: grid magnitudes, sign bits (bit l of sg[g] for value 32g + l) and
   the 4-bit scale of each 16 values. */
typedef struct { uint8_t g[256]; uint32_t sg[8]; uint8_t s[16]; } iq_parts;

/* IQ2_XXS (66 bytes): per 32 values two u32: four grid indices (bytes), then four 7-bit sign
   pattern indices and the scale in the top 4 bits. */
static void parts_iq2_xxs(const uint8_t *b, iq_parts *p) {
    for (int g = 0; g < 8; g++) {
        uint32_t a, s;
        memcpy(&a, b + 2 + 8 * g, 4);
        memcpy(&s, b + 6 + 8 * g, 4);
        p->sg[g] = 0;
        for (int k = 0; k < 4; k++) {
            memcpy(p->g + 32 * g + 8 * k, GRID_IQ2_XXS + 8 * ((a >> (8 * k)) & 255), 8);
            p->sg[g] |= (uint32_t)KSIGNS[(s >> (7 * k)) & 127] << (8 * k);
        }
        p->s[2 * g] = p->s[2 * g + 1] = (uint8_t)(s >> 28);
    }
}

/* IQ2_XS (74 bytes): per 8 values a u16, 9-bit grid index and 7-bit sign pattern index; then
   16 scales as nibbles (low first). */
static void parts_iq2_xs(const uint8_t *b, iq_parts *p) {
    memset(p->sg, 0, sizeof p->sg);
    for (int e = 0; e < 32; e++) {
        const uint16_t v = rd16(b + 2 + 2 * e);
        memcpy(p->g + 8 * e, GRID_IQ2_XS + 8 * (v & 511), 8);
        p->sg[e / 4] |= (uint32_t)KSIGNS[v >> 9] << (8 * (e % 4));
    }
    for (int i = 0; i < 8; i++) {
        p->s[2 * i] = b[66 + i] & 15;
        p->s[2 * i + 1] = b[66 + i] >> 4;
    }
}

/* Sign bits stored one per value, 32 bytes: byte e holds values 8e..8e+7. */
static inline void plain_signs(const uint8_t *signs, uint32_t *sg) {
    for (int g = 0; g < 8; g++)
        sg[g] = signs[4 * g] | (uint32_t)signs[4 * g + 1] << 8 | (uint32_t)signs[4 * g + 2] << 16 |
                (uint32_t)signs[4 * g + 3] << 24;
}

/* IQ2_S (82 bytes): 32 low bytes of 10-bit grid indices, 32 bytes of signs, 8 bytes of the
   indices' top 2 bits (entry 4i + k at bits 2k of byte i), 16 scales as nibbles. */
static void parts_iq2_s(const uint8_t *b, iq_parts *p) {
    for (int e = 0; e < 32; e++)
        memcpy(p->g + 8 * e, GRID_IQ2_S + 8 * (b[2 + e] | (((b[66 + e / 4] >> (2 * (e % 4))) & 3) << 8)), 8);
    plain_signs(b + 34, p->sg);
    for (int i = 0; i < 8; i++) {
        p->s[2 * i] = b[74 + i] & 15;
        p->s[2 * i + 1] = b[74 + i] >> 4;
    }
}

/* IQ3_XXS (98 bytes): 64 grid indices (4 values each), then per 32 values a u32 of four
   7-bit sign pattern indices and the scale in the top 4 bits. */
static void parts_iq3_xxs(const uint8_t *b, iq_parts *p) {
    for (int g = 0; g < 8; g++) {
        uint32_t s;
        memcpy(&s, b + 66 + 4 * g, 4);
        for (int e = 0; e < 8; e++) memcpy(p->g + 32 * g + 4 * e, GRID_IQ3_XXS + 4 * b[2 + 8 * g + e], 4);
        p->sg[g] = 0;
        for (int k = 0; k < 4; k++) p->sg[g] |= (uint32_t)KSIGNS[(s >> (7 * k)) & 127] << (8 * k);
        p->s[2 * g] = p->s[2 * g + 1] = (uint8_t)(s >> 28);
    }
}

/* IQ3_S (110 bytes): 64 low bytes of 9-bit grid indices, 8 bytes of their top bits (entry
   8i + k at bit k of byte i), 32 bytes of signs, 8 scales (one per 32 values) as nibbles. */
static void parts_iq3_s(const uint8_t *b, iq_parts *p) {
    for (int e = 0; e < 64; e++)
        memcpy(p->g + 4 * e, GRID_IQ3_S + 4 * (b[2 + e] | (((b[66 + e / 8] >> (e % 8)) & 1) << 8)), 4);
    plain_signs(b + 74, p->sg);
    for (int k = 0; k < 16; k++) p->s[k] = (b[106 + k / 4] >> (4 * ((k / 2) % 2))) & 15;
}

/* IQ1 codes 8g + (minus ? -1 : +1) of one 8-value entry into magnitudes and sign bits. */
static inline void iq1_entry(int idx, int minus, uint8_t *g, uint32_t *sg, int at) {
    for (int j = 0; j < 8; j++) {
        const int c = 8 * GRID_IQ1[8 * idx + j] + (minus ? -1 : 1);
        g[j] = (uint8_t)(c < 0 ? -c : c);
        *sg |= (uint32_t)(c < 0) << (at + j);
    }
}

/* IQ1_S (50 bytes): f16 d, 32 low bytes of 11-bit grid indices, per 32 values a u16: three
   top bits per entry (bits 3j), the scale in bits 12..14, the shift's sign in bit 15. */
static void parts_iq1_s(const uint8_t *b, iq_parts *p) {
    for (int k = 0; k < 8; k++) {
        const uint16_t qh = rd16(b + 34 + 2 * k);
        p->sg[k] = 0;
        for (int j = 0; j < 4; j++)
            iq1_entry(b[2 + 4 * k + j] | ((qh >> (3 * j)) & 7) << 8, qh >> 15, p->g + 32 * k + 8 * j, p->sg + k, 8 * j);
        p->s[2 * k] = p->s[2 * k + 1] = (qh >> 12) & 7;
    }
}

/* IQ1_M (56 bytes): 32 low bytes of grid indices, a nibble per entry (three top index bits,
   the shift's sign in bit 3), four u16 of 3-bit scales (one per 16 values, bits 3i) whose
   top nibbles together are the f16 d. */
static void parts_iq1_m(const uint8_t *b, iq_parts *p) {
    for (int k = 0; k < 8; k++) {
        p->sg[k] = 0;
        for (int j = 0; j < 4; j++) {
            const int e = 4 * k + j, nib = (b[32 + e / 2] >> (4 * (e % 2))) & 15;
            iq1_entry(b[e] | (nib & 7) << 8, nib >> 3, p->g + 8 * e, p->sg + k, 8 * j);
        }
    }
    for (int i = 0; i < 16; i++) p->s[i] = (rd16(b + 48 + 2 * (i / 4)) >> (3 * (i % 4))) & 7;
}

static inline uint16_t iq1_m_d(const uint8_t *b) {
    return (uint16_t)((rd16(b + 48) >> 12) | ((rd16(b + 50) >> 8) & 0xF0) | ((rd16(b + 52) >> 4) & 0xF00) |
                      (rd16(b + 54) & 0xF000));
}

/* The 256 signed codes (magnitude with its sign) of a block taken apart. */
static inline void signed_codes(const iq_parts *p, int8_t *q) {
#if defined(__AVX2__) && defined(__FMA__)
    for (int g = 0; g < 8; g++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(p->g + 32 * g)), m = bits_to_bytes(p->sg[g]);
        _mm256_storeu_si256((__m256i *)(q + 32 * g), _mm256_sub_epi8(_mm256_xor_si256(v, m), m));
    }
#else
    for (int i = 0; i < 256; i++) q[i] = (int8_t)((p->sg[i / 32] >> (i % 32)) & 1 ? -p->g[i] : p->g[i]);
#endif
}

/* Each type: its block bytes, how it comes apart, and its scale d * f(s): kind 0 is
   d * (0.5 + s) * 0.25 (IQ2), kind 1 d * (0.5 + s) * 0.5 (IQ3_XXS), kind 2 d * (1 + 2s) (IQ3_S),
   kinds 3 (IQ1_S) and 4 (IQ1_M, d not at byte 0) d * (1 + 2s) times code / 8. All are
   (2s + 1) * d * unit per code, the integer path's split. */
typedef struct { int bytes; void (*parts)(const uint8_t *, iq_parts *); int kind; float unit; deq_fn deq; } iq_type;

static void deq_iq2_xxs(const uint8_t *b, float *y);
static void deq_iq2_xs(const uint8_t *b, float *y);
static void deq_iq2_s(const uint8_t *b, float *y);
static void deq_iq3_xxs(const uint8_t *b, float *y);
static void deq_iq3_s(const uint8_t *b, float *y);
static void deq_iq1_s(const uint8_t *b, float *y);
static void deq_iq1_m(const uint8_t *b, float *y);

static const iq_type IQ2_XXS_T = {66, parts_iq2_xxs, 0, 0.125f, deq_iq2_xxs},
                     IQ2_XS_T = {74, parts_iq2_xs, 0, 0.125f, deq_iq2_xs},
                     IQ2_S_T = {82, parts_iq2_s, 0, 0.125f, deq_iq2_s},
                     IQ3_XXS_T = {98, parts_iq3_xxs, 1, 0.25f, deq_iq3_xxs},
                     IQ3_S_T = {110, parts_iq3_s, 2, 1.0f, deq_iq3_s},
                     IQ1_S_T = {50, parts_iq1_s, 3, 0.125f, deq_iq1_s},
                     IQ1_M_T = {56, parts_iq1_m, 4, 0.125f, deq_iq1_m};

/* gguf-py's float32 arithmetic for the scale, step by step. */
static inline float iq_scale(int kind, float d, int s) {
    if (kind >= 2) return d * (float)(1 + 2 * s);
    return d * (0.5f + (float)s) * (kind ? 0.5f : 0.25f);
}

/* The block's f16 scale d. */
static inline float iq_d(int kind, const uint8_t *b) { return f16_to_f32(kind == 4 ? iq1_m_d(b) : rd16(b)); }

static inline void deq_iq(const iq_type *t, const uint8_t *b, float *y) {
    iq_parts p;
    int8_t q[256];
    t->parts(b, &p);
    signed_codes(&p, q);
    const float d = iq_d(t->kind, b);
    for (int k = 0; k < 16; k++) {
        const float db = iq_scale(t->kind, d, p.s[k]);
        if (t->kind >= 3)  /* gguf-py: dl * (grid + shift), the sum exact */
            for (int l = 0; l < 16; l++) y[16 * k + l] = db * ((float)q[16 * k + l] * 0.125f);
        else
            for (int l = 0; l < 16; l++) y[16 * k + l] = db * (float)q[16 * k + l];
    }
}

static void deq_iq2_xxs(const uint8_t *b, float *y) { deq_iq(&IQ2_XXS_T, b, y); }
static void deq_iq2_xs(const uint8_t *b, float *y) { deq_iq(&IQ2_XS_T, b, y); }
static void deq_iq2_s(const uint8_t *b, float *y) { deq_iq(&IQ2_S_T, b, y); }
static void deq_iq3_xxs(const uint8_t *b, float *y) { deq_iq(&IQ3_XXS_T, b, y); }
static void deq_iq3_s(const uint8_t *b, float *y) { deq_iq(&IQ3_S_T, b, y); }
static void deq_iq1_s(const uint8_t *b, float *y) { deq_iq(&IQ1_S_T, b, y); }
static void deq_iq1_m(const uint8_t *b, float *y) { deq_iq(&IQ1_M_T, b, y); }

static const iq_type *iq_type_of(int type) {
    switch (type) {
    case T_IQ2_XXS: return &IQ2_XXS_T;
    case T_IQ2_XS: return &IQ2_XS_T;
    case T_IQ2_S: return &IQ2_S_T;
    case T_IQ3_XXS: return &IQ3_XXS_T;
    case T_IQ3_S: return &IQ3_S_T;
    case T_IQ1_S: return &IQ1_S_T;
    case T_IQ1_M: return &IQ1_M_T;
    default: return NULL;
    }
}

int types_info(int type, int *block, int *bytes, deq_fn *fn) {
    switch (type) {
    case T_Q2_K: *block = 256; *bytes = 84; *fn = deq_q2_k; return 0;
    case T_Q3_K: *block = 256; *bytes = 110; *fn = deq_q3_k; return 0;
    case T_IQ4_NL: *block = 32; *bytes = 18; *fn = deq_iq4_nl; return 0;
    case T_IQ4_XS: *block = 256; *bytes = 136; *fn = deq_iq4_xs; return 0;
    case T_MXFP4: *block = 32; *bytes = 17; *fn = deq_mxfp4; return 0;
    default: break;
    }
    const iq_type *t = iq_type_of(type);
    if (!t || !iq_ready()) return -1;
    *block = 256;
    *bytes = t->bytes;
    *fn = t->deq;
    return 0;
}

/* One row against T <= MAXT float activation rows: row_any with each decoder inlined. */
void types_row_f32(int type, const uint8_t *row, int64_t nb, const float *X, int64_t ldx, int T, float *acc) {
    switch (type) {
    case T_Q2_K: row_any(deq_q2_k, 256, 84, row, nb, X, ldx, T, acc); break;
    case T_Q3_K: row_any(deq_q3_k, 256, 110, row, nb, X, ldx, T, acc); break;
    case T_IQ4_NL: row_any(deq_iq4_nl, 32, 18, row, nb, X, ldx, T, acc); break;
    case T_IQ4_XS: row_any(deq_iq4_xs, 256, 136, row, nb, X, ldx, T, acc); break;
    case T_MXFP4: row_any(deq_mxfp4, 32, 17, row, nb, X, ldx, T, acc); break;
    case T_IQ2_XXS: row_any(deq_iq2_xxs, 256, 66, row, nb, X, ldx, T, acc); break;
    case T_IQ2_XS: row_any(deq_iq2_xs, 256, 74, row, nb, X, ldx, T, acc); break;
    case T_IQ2_S: row_any(deq_iq2_s, 256, 82, row, nb, X, ldx, T, acc); break;
    case T_IQ3_XXS: row_any(deq_iq3_xxs, 256, 98, row, nb, X, ldx, T, acc); break;
    case T_IQ3_S: row_any(deq_iq3_s, 256, 110, row, nb, X, ldx, T, acc); break;
    case T_IQ1_S: row_any(deq_iq1_s, 256, 50, row, nb, X, ldx, T, acc); break;
    case T_IQ1_M: row_any(deq_iq1_m, 256, 56, row, nb, X, ldx, T, acc); break;
    default: break;
    }
}

/* ---- 8-bit activations (the blocks of kernels.c: xq32 for IQ4_NL/MXFP4, xq256 else) ---- */
#if defined(__AVX2__) && defined(__FMA__)

/* 32 signed codes from 16 bytes of nibbles (low nibbles first) through a 16-entry table. */
static inline __m256i lut_codes(const int8_t *table, const uint8_t *p) {
    const __m128i qs = _mm_loadu_si128((const __m128i *)p);
    const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(qs, 4), qs), _mm256_set1_epi8(0x0F));
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table)), nib);
}

static inline __m256i codes_iq4_nl(const uint8_t *b) { return lut_codes(KV_IQ4, b + 2); }
static inline __m256i codes_mxfp4(const uint8_t *b) { return lut_codes(KV_MXFP4, b + 1); }
static inline float scale_e8m0(const uint8_t *b) { return e8m0_half(b[0]); }

/* Lanes t < n of A[0] into acc[t]. */
static inline void store_rows(const __m256 *A, int n, float *acc) {
    float v[8];
    _mm256_storeu_ps(v, A[0]);
    for (int t = 0; t < n; t++) acc[t] = v[t];
}

ROW_I8_32(row_iq4_nl_i8, 18, codes_iq4_nl, scale_f16)
ROW_I8_32(row_mxfp4_i8, 17, codes_mxfp4, scale_e8m0)

/* Sixteen int16 scales (one per 16 values) as 8 vectors for 32 codes each: scv[k] holds
   scale 2k in the low 128-bit lane and 2k + 1 in the high one. */
static inline void pair_scales(__m256i sc16, __m256i scv[8]) {
    const __m256i lo8 = _mm256_permute2x128_si256(sc16, sc16, 0x00), hi8 = _mm256_permute2x128_si256(sc16, sc16, 0x11);
    for (int k = 0; k < 8; k++) {
        const short j = (short)(2 * (k & 3));
        const __m256i pick = _mm256_set_m128i(_mm_set1_epi16((short)(0x0100 + 0x0202 * (j + 1))),
                                              _mm_set1_epi16((short)(0x0100 + 0x0202 * j)));
        scv[k] = _mm256_shuffle_epi8(k < 4 ? lo8 : hi8, pick);
    }
}

/* int32 lanes of sum over 16-value groups of scale * (unsigned codes . activation codes). */
static inline __m256i scaled_dot(const __m256i q[8], const __m256i scv[8], const int8_t *xq) {
    __m256i s = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++) {
        const __m256i p = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)(xq + 32 * k)));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, scv[k]));
    }
    return s;
}

/* The 16 Q3_K scales (q3_k_scales' layout) as int16 lanes, built in registers. */
static inline __m256i q3_k_scales16(const uint8_t *s) {
    uint32_t top;
    memcpy(&top, s + 8, 4);
    const __m128i v = _mm_loadl_epi64((const __m128i *)s), low4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_unpacklo_epi64(_mm_and_si128(v, low4), _mm_and_si128(_mm_srli_epi16(v, 4), low4));
    const __m128i hi = _mm_and_si128(_mm_set_epi32((int)(top >> 6), (int)(top >> 4), (int)(top >> 2), (int)top),
                                     _mm_set1_epi8(3));
    return _mm256_cvtepi8_epi16(_mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi16(hi, 4)), _mm_set1_epi8(32)));
}

/* The integer path of the grid types takes a block straight into registers: per 32 values
   the grid magnitudes g (unsigned, for maddubs), the signs as +1/-1 bytes to put on the
   activations, and the multipliers m = 2s + 1 per 16 values as int16 lanes (built in registers:
   a vector load of scalars just stored would stall on store forwarding). */

/* Four 7-bit sign pattern indices (bits 0, 7, 14, 21 of s) as 32 bytes of +1/-1. */
static inline __m256i ksigns4(uint32_t s) {
    return _mm256_set_epi64x((long long)KSIGN_PM[(s >> 21) & 127], (long long)KSIGN_PM[(s >> 14) & 127],
                             (long long)KSIGN_PM[(s >> 7) & 127], (long long)KSIGN_PM[s & 127]);
}

/* 32 sign bits (set: negative) as 32 bytes of +1/-1. */
static inline __m256i bitsigns(const uint8_t *p) {
    uint32_t bits;
    memcpy(&bits, p, 4);
    return _mm256_or_si256(bits_to_bytes(bits), _mm256_set1_epi8(1));
}

/* 16 scales s (bytes) as int16 multipliers 2s + 1. */
static inline __m256i mults(__m128i s) {
    return _mm256_add_epi16(_mm256_slli_epi16(_mm256_cvtepu8_epi16(s), 1), _mm256_set1_epi16(1));
}

/* The low 8 bytes of v as 16 nibbles, one per byte (low nibble first). */
static inline __m128i nibble_bytes(__m128i v) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    return _mm_unpacklo_epi8(_mm_and_si128(v, low4), _mm_and_si128(_mm_srli_epi16(v, 4), low4));
}

/* The multipliers of 16 scales packed as nibbles (low first) in 8 bytes. */
static inline __m256i nibble_mults(const uint8_t *sc) {
    return mults(nibble_bytes(_mm_loadl_epi64((const __m128i *)sc)));
}

/* The multipliers of 8 scales (bytes 0..7 of v, each for 32 values), each used twice. */
static inline __m256i pair_mults(__m128i v) { return mults(_mm_unpacklo_epi8(v, v)); }

/* 32 magnitudes: the four 8-value grid entries whose indices are the 64-bit lanes of idx. */
static inline __m256i gather8(const uint8_t *grid, __m256i idx) {
    return _mm256_i64gather_epi64((const long long *)grid, idx, 8);
}

/* 32 magnitudes: the eight 4-value grid entries whose indices are the 32-bit lanes of idx. */
static inline __m256i gather4(const uint8_t *grid, __m256i idx) {
    return _mm256_i32gather_epi32((const int *)grid, idx, 4);
}

static __m256i vec_iq2_xxs(const uint8_t *b, __m256i g[8], __m256i sg[8]) {
    uint64_t s8 = 0;
    for (int k = 0; k < 8; k++) {
        uint32_t a, s;
        memcpy(&a, b + 2 + 8 * k, 4);
        memcpy(&s, b + 6 + 8 * k, 4);
        g[k] = gather8(GRID_IQ2_XXS, _mm256_cvtepu8_epi64(_mm_cvtsi32_si128((int)a)));
        sg[k] = ksigns4(s);
        s8 |= (uint64_t)(s >> 28) << (8 * k);
    }
    return pair_mults(_mm_cvtsi64_si128((long long)s8));
}

static __m256i vec_iq2_xs(const uint8_t *b, __m256i g[8], __m256i sg[8]) {
    const __m256i low9 = _mm256_set1_epi64x(511);
    for (int k = 0; k < 8; k++) {
        const __m256i v = _mm256_cvtepu16_epi64(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * k)));
        g[k] = gather8(GRID_IQ2_XS, _mm256_and_si256(v, low9));
        sg[k] = _mm256_i64gather_epi64((const long long *)KSIGN_PM, _mm256_srli_epi64(v, 9), 8);
    }
    return nibble_mults(b + 66);
}

static __m256i vec_iq2_s(const uint8_t *b, __m256i g[8], __m256i sg[8]) {
    const __m256i shift = _mm256_set_epi64x(2, 4, 6, 8), two = _mm256_set1_epi64x(0x300);
    for (int k = 0; k < 8; k++) {
        uint32_t q;
        memcpy(&q, b + 2 + 4 * k, 4);
        /* top bits of entry j: bits 2j..2j+1 of byte 66 + k, moved to bits 8..9 */
        const __m256i hi = _mm256_and_si256(_mm256_sllv_epi64(_mm256_set1_epi64x(b[66 + k]), shift), two);
        g[k] = gather8(GRID_IQ2_S, _mm256_or_si256(_mm256_cvtepu8_epi64(_mm_cvtsi32_si128((int)q)), hi));
        sg[k] = bitsigns(b + 34 + 4 * k);
    }
    return nibble_mults(b + 74);
}

static __m256i vec_iq3_xxs(const uint8_t *b, __m256i g[8], __m256i sg[8]) {
    uint64_t s8 = 0;
    for (int k = 0; k < 8; k++) {
        uint32_t s;
        memcpy(&s, b + 66 + 4 * k, 4);
        g[k] = gather4(GRID_IQ3_XXS, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * k))));
        sg[k] = ksigns4(s);
        s8 |= (uint64_t)(s >> 28) << (8 * k);
    }
    return pair_mults(_mm_cvtsi64_si128((long long)s8));
}

static __m256i vec_iq3_s(const uint8_t *b, __m256i g[8], __m256i sg[8]) {
    const __m256i shift = _mm256_set_epi32(1, 2, 3, 4, 5, 6, 7, 8), bit8 = _mm256_set1_epi32(0x100);
    for (int k = 0; k < 8; k++) {
        /* top bit of entry j: bit j of byte 66 + k, moved to bit 8 */
        const __m256i hi = _mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(b[66 + k]), shift), bit8);
        const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * k)));
        g[k] = gather4(GRID_IQ3_S, _mm256_or_si256(lo, hi));
        sg[k] = bitsigns(b + 74 + 4 * k);
    }
    uint32_t sc;
    memcpy(&sc, b + 106, 4);
    return pair_mults(nibble_bytes(_mm_cvtsi32_si128((int)sc)));
}

/* IQ1 codes of four entries (grid indices in the 64-bit lanes of idx, shift signs as lanes of
   +1/-1 bytes): magnitudes into *g, signs as +1/-1 bytes into *sg (codes are odd: never 0). */
static inline void iq1_vec(__m256i idx, __m256i shift, __m256i *g, __m256i *sg) {
    const __m256i grid = _mm256_i64gather_epi64((const long long *)GRID_IQ1, idx, 8);
    const __m256i c = _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), grid), shift);
    *g = _mm256_abs_epi8(c);
    *sg = _mm256_or_si256(_mm256_cmpgt_epi8(_mm256_setzero_si256(), c), _mm256_set1_epi8(1));
}

/* Grid indices of four entries: low bytes from 4 bytes at q, three top bits from the 64-bit
   lanes of top (only bits 0..2 of each used). */
static inline __m256i iq1_index(const uint8_t *q, __m256i top) {
    uint32_t lo;
    memcpy(&lo, q, 4);
    const __m256i hi = _mm256_slli_epi64(_mm256_and_si256(top, _mm256_set1_epi64x(7)), 8);
    return _mm256_or_si256(_mm256_cvtepu8_epi64(_mm_cvtsi32_si128((int)lo)), hi);
}

static __m256i vec_iq1_s(const uint8_t *b, __m256i g[8], __m256i sg[8]) {
    uint64_t s8 = 0;
    for (int k = 0; k < 8; k++) {
        const uint16_t qh = rd16(b + 34 + 2 * k);
        const __m256i top = _mm256_srlv_epi64(_mm256_set1_epi64x(qh), _mm256_set_epi64x(9, 6, 3, 0));
        iq1_vec(iq1_index(b + 2 + 4 * k, top), _mm256_set1_epi8(qh >> 15 ? -1 : 1), g + k, sg + k);
        s8 |= (uint64_t)((qh >> 12) & 7) << (8 * k);
    }
    return pair_mults(_mm_cvtsi64_si128((long long)s8));
}

static __m256i vec_iq1_m(const uint8_t *b, __m256i g[8], __m256i sg[8]) {
    const __m256i eight = _mm256_set1_epi64x(8);
    for (int k = 0; k < 8; k++) {
        /* the nibbles of entries 4k..4k+3, lowest first; bit 3 of each: shift -1/8 */
        const __m256i nib = _mm256_srlv_epi64(_mm256_set1_epi64x(rd16(b + 32 + 2 * k)), _mm256_set_epi64x(12, 8, 4, 0));
        const __m256i minus = _mm256_cmpeq_epi64(_mm256_and_si256(nib, eight), eight);
        iq1_vec(iq1_index(b + 4 * k, nib), _mm256_or_si256(minus, _mm256_set1_epi8(1)), g + k, sg + k);
    }
    uint64_t s[2] = {0, 0};
    for (int i = 0; i < 16; i++)
        s[i / 8] |= (uint64_t)((rd16(b + 48 + 2 * (i / 4)) >> (3 * (i % 4))) & 7) << (8 * (i % 8));
    return mults(_mm_set_epi64x((long long)s[1], (long long)s[0]));
}

/* ---- the 256-value types' row kernels: a decoder and a dot product per type, one driver ---- */

/* One decoded block: codes, signs and multipliers in registers (what a, b, c and m hold is the
   type's), its scale d and (Q2_K) dmin. */
typedef struct { __m256i a[8], b[8], c[8], m; float d, dmin; } blk256;

/* Q2_K: codes 0..3 (a) scaled per 16 values (b), value d*sc*q - dmin*m; the mins (m) come off
   through the activations' sums per 16. */
static ALWAYS_INLINE void dec_q2_k(const uint8_t *b, blk256 *w) {
    const __m256i three = _mm256_set1_epi8(3);
    const __m128i low4 = _mm_set1_epi8(0x0F), sc = _mm_loadu_si128((const __m128i *)b);
    w->m = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), low4));
    pair_scales(_mm256_cvtepu8_epi16(_mm_and_si128(sc, low4)), w->b);
    for (int n = 0; n < 2; n++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * n));
        for (int j = 0; j < 4; j++) w->a[4 * n + j] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), three);
    }
    w->d = f16_to_f32(rd16(b + 80));
    w->dmin = f16_to_f32(rd16(b + 82));
}

static ALWAYS_INLINE __m256i dot_q2_k(const blk256 *w, const xq256 *x, __m256i *mn) {
    *mn = _mm256_madd_epi16(w->m, _mm256_loadu_si256((const __m256i *)x->bsum));
    return scaled_dot(w->a, w->b, x->q);
}

/* Q3_K: unsigned 3-bit codes c = low 2 bits + 4 * hmask bit (a; value d*sc*(c-4)), one signed
   scale per 16 (m, paired in b); the -4 comes off through the activations' sums per 16. */
static ALWAYS_INLINE void dec_q3_k(const uint8_t *b, blk256 *w) {
    const __m256i three = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    w->m = q3_k_scales16(b + 96);
    pair_scales(w->m, w->b);
    const __m256i hm = _mm256_loadu_si256((const __m256i *)b);
    for (int n = 0; n < 2; n++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b + 32 + 32 * n));
        for (int j = 0; j < 4; j++) {
            const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 4 * n + j), one), 2);
            w->a[4 * n + j] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 2 * j), three), hi);
        }
    }
    w->d = f16_to_f32(rd16(b + 108));
}

static ALWAYS_INLINE __m256i dot_q3_k(const blk256 *w, const xq256 *x, __m256i *mn) {
    (void)mn;
    const __m256i off = _mm256_madd_epi16(w->m, _mm256_loadu_si256((const __m256i *)x->bsum));
    return _mm256_sub_epi32(scaled_dot(w->a, w->b, x->q), _mm256_slli_epi32(off, 2));
}

/* IQ4_XS: table codes as magnitudes (a) and their signs (b: the codes themselves, never 0), one
   signed scale per 32 values (c): the grid types' dot product below. */
static ALWAYS_INLINE void dec_iq4_xs(const uint8_t *b, blk256 *w) {
    int16_t ls[8];
    iq4_xs_scales(b, ls);
    for (int j = 0; j < 8; j++) {
        w->b[j] = lut_codes(KV_IQ4, b + 8 + 16 * j);
        w->a[j] = _mm256_sign_epi8(w->b[j], w->b[j]);
        w->c[j] = _mm256_set1_epi16(ls[j]);
    }
    w->d = f16_to_f32(rd16(b));
}

/* The grid types: magnitudes (a), signs as +1/-1 bytes (b), multipliers 2s + 1 per 16 values
   (c, and as 16 int16 lanes in m); value scale d * unit * (2s + 1), d read as `kind` says. Their
   dot product (dot_iq) puts the signs on the activations so maddubs sees unsigned weights. */
#define DEC_IQ(NAME, VEC, KIND, UNIT)                              \
    static ALWAYS_INLINE void NAME(const uint8_t *b, blk256 *w) { \
        w->m = VEC(b, w->a, w->b);                                \
        pair_scales(w->m, w->c);                                  \
        w->d = iq_d(KIND, b) * (UNIT);                            \
    }
DEC_IQ(dec_iq2_xxs, vec_iq2_xxs, 0, 0.125f)
DEC_IQ(dec_iq2_xs, vec_iq2_xs, 0, 0.125f)
DEC_IQ(dec_iq2_s, vec_iq2_s, 0, 0.125f)
DEC_IQ(dec_iq3_xxs, vec_iq3_xxs, 1, 0.25f)
DEC_IQ(dec_iq3_s, vec_iq3_s, 2, 1.0f)
DEC_IQ(dec_iq1_s, vec_iq1_s, 3, 0.125f)
DEC_IQ(dec_iq1_m, vec_iq1_m, 4, 0.125f)

static ALWAYS_INLINE __m256i dot_iq(const blk256 *w, const xq256 *x, __m256i *mn) {
    (void)mn;
    __m256i s = _mm256_setzero_si256();
    for (int k = 0; k < 8; k++) {
        const __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(x->q + 32 * k)), w->b[k]);
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(w->a[k], xs), w->c[k]));
    }
    return s;
}

typedef void (*dec256_fn)(const uint8_t *b, blk256 *w);
/* The int32 lane parts of a block's sum against activation block x (*mn: of its mins, Q2_K). */
typedef __m256i (*dot256_fn)(const blk256 *w, const xq256 *x, __m256i *mn);

/* Decode: nr <= 8 weight rows (row_bytes apart) against one activation row, the rows in the lanes
   of one float chain (BLOCK_CHAIN's arithmetic per row). */
static ALWAYS_INLINE void rows_256_one(dec256_fn dec, dot256_fn dot, int mins, int bytes, const uint8_t *W,
                                       int64_t row_bytes, int nr, int64_t nb, const xq256 *X, float *out) {
    __m256 A = _mm256_setzero_ps();
    const uint8_t *rp[8]; /* rows past nr repeat the last one (their lanes are dropped) */
    float v[8];
    for (int r = 0; r < 8; r++) rp[r] = W + (r < nr ? r : nr - 1) * row_bytes;
    for (int64_t i = 0; i < nb; i++) {
        __m256i s[8], mn[8];
        float d[8], dm[8];
        for (int r = 0; r < 8; r++) {
            const uint8_t *b = rp[r] + i * bytes;
            PREFETCH(b);
            blk256 w;
            dec(b, &w);
            s[r] = dot(&w, X + i, mn + r);
            d[r] = w.d;
            dm[r] = mins ? w.dmin : 0.f;
        }
        const __m256 xd = _mm256_set1_ps(X[i].d);
        const __m256 dv = _mm256_set_ps(d[7], d[6], d[5], d[4], d[3], d[2], d[1], d[0]);
        A = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8(s)), _mm256_mul_ps(dv, xd), A);
        if (mins) {
            const __m256 mv = _mm256_set_ps(dm[7], dm[6], dm[5], dm[4], dm[3], dm[2], dm[1], dm[0]);
            A = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(hsum8(mn)), _mm256_mul_ps(mv, xd), A);
        }
    }
    _mm256_storeu_ps(v, A);
    for (int r = 0; r < nr; r++) out[r] = v[r];
}

/* One weight row (blocks of `bytes`) against 1 < T <= Q8_ROWS_GRID activation rows -> acc[t]. */
static ALWAYS_INLINE void row_256(dec256_fn dec, dot256_fn dot, int mins, int bytes, const uint8_t *row, int64_t nb,
                                  const xq256 *X, int64_t ldx, int T, float *acc) {
    __m256i s[Q8_ROWS_GRID], mn[Q8_ROWS_GRID];
    __m256 A[Q8_ROWS_GRID / 8];
    const int n8 = (T + 7) & ~7;
    const row_gather G = rows_gather(T, ldx * (int64_t)sizeof(xq256));
    for (int g = 0; g < n8 / 8; g++) A[g] = _mm256_setzero_ps();
    for (int t = T; t < n8; t++) s[t] = mn[t] = _mm256_setzero_si256();
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *b = row + i * bytes;
        PREFETCH(b);
        blk256 w;
        dec(b, &w);
        for (int t = 0; t < T; t++) {
            const xq256 *x = X + t * ldx + i;
            s[t] = dot(&w, x, mn + t);
        }
        BLOCK_CHAIN(s, &X[i].d, G, w.d, T, 0, A);
        if (mins) BLOCK_CHAIN(mn, &X[i].d, G, w.dmin, T, 1, A);
    }
    for (int g = 0; g < n8 / 8; g++) store_rows(A + g, T - 8 * g < 8 ? T - 8 * g : 8, acc + 8 * g);
}

/* The most activation rows for which rows_to calls types_rows_one once per row (its weight
   blocks decoded again for each) rather than types_row_q8: measured on 2048x512 products at 2 and
   4 rows, only where decoding is cheap. */
int types_rows_one_max(int type) {
    switch (type) {
    case T_IQ4_NL: case T_MXFP4: return 3;
    case T_Q2_K: case T_Q3_K: return 2;
    default: return 1;
    }
}

/* nr <= 8 weight rows against one activation row -> out[r]; -1 for a type not here. */
int types_rows_one(int type, const uint8_t *W, int64_t row_bytes, int nr, int64_t nb, const void *xq, float *out) {
    const xq256 *X = (const xq256 *)xq;
    switch (type) {
    case T_IQ4_NL: row_iq4_nl_i8_one(W, row_bytes, nr, nb, (const xq32 *)xq, out); break;
    case T_MXFP4: row_mxfp4_i8_one(W, row_bytes, nr, nb, (const xq32 *)xq, out); break;
    case T_Q2_K: rows_256_one(dec_q2_k, dot_q2_k, 1, 84, W, row_bytes, nr, nb, X, out); break;
    case T_Q3_K: rows_256_one(dec_q3_k, dot_q3_k, 0, 110, W, row_bytes, nr, nb, X, out); break;
    case T_IQ4_XS: rows_256_one(dec_iq4_xs, dot_iq, 0, 136, W, row_bytes, nr, nb, X, out); break;
    case T_IQ2_XXS: rows_256_one(dec_iq2_xxs, dot_iq, 0, 66, W, row_bytes, nr, nb, X, out); break;
    case T_IQ2_XS: rows_256_one(dec_iq2_xs, dot_iq, 0, 74, W, row_bytes, nr, nb, X, out); break;
    case T_IQ2_S: rows_256_one(dec_iq2_s, dot_iq, 0, 82, W, row_bytes, nr, nb, X, out); break;
    case T_IQ3_XXS: rows_256_one(dec_iq3_xxs, dot_iq, 0, 98, W, row_bytes, nr, nb, X, out); break;
    case T_IQ3_S: rows_256_one(dec_iq3_s, dot_iq, 0, 110, W, row_bytes, nr, nb, X, out); break;
    case T_IQ1_S: rows_256_one(dec_iq1_s, dot_iq, 0, 50, W, row_bytes, nr, nb, X, out); break;
    case T_IQ1_M: rows_256_one(dec_iq1_m, dot_iq, 0, 56, W, row_bytes, nr, nb, X, out); break;
    default: return -1;
    }
    return 0;
}

/* ---- one block as the AMX tiles take it (kernels_amx.c) ---- */

/* A 256-value block as signed codes q and multipliers: its integer sum against activation codes x
   is sum_j mult[j] * (q . x over sub-block j of `sub` values), minus (Q2_K) the mins m[j] times
   the activations' sums per 16, exactly the integers the row kernels above form. Returns sub
   (16, 32 or 256: Q2_K's scales are folded into its codes), 0 for a type not here. */
int types_block_i8(int type, const uint8_t *b, int8_t *q, int32_t *mult, float *d, float *dmin, int16_t *m) {
    blk256 w;
    int sub = 16;
    switch (type) {
    case T_Q2_K: dec_q2_k(b, &w); sub = 256; break;
    case T_Q3_K: dec_q3_k(b, &w); break;
    case T_IQ4_XS: dec_iq4_xs(b, &w); sub = 32; break;
    case T_IQ2_XXS: dec_iq2_xxs(b, &w); break;
    case T_IQ2_XS: dec_iq2_xs(b, &w); break;
    case T_IQ2_S: dec_iq2_s(b, &w); break;
    case T_IQ3_XXS: dec_iq3_xxs(b, &w); break;
    case T_IQ3_S: dec_iq3_s(b, &w); break;
    case T_IQ1_S: dec_iq1_s(b, &w); break;
    case T_IQ1_M: dec_iq1_m(b, &w); break;
    default: return 0;
    }
    int16_t lanes[16];
    for (int k = 0; k < 8; k++) {
        __m256i c;
        if (type == T_Q2_K) /* codes < 4 times scales < 16: byte products in 16-bit lanes never carry */
            c = _mm256_mullo_epi16(w.a[k], w.b[k]);
        else if (type == T_Q3_K)
            c = _mm256_sub_epi8(w.a[k], _mm256_set1_epi8(4));
        else
            c = _mm256_sign_epi8(w.a[k], w.b[k]);
        _mm256_storeu_si256((__m256i *)(q + 32 * k), c);
    }
    *d = w.d;
    if (type == T_Q2_K) {
        *dmin = w.dmin;
        _mm256_storeu_si256((__m256i *)lanes, w.m);
        for (int j = 0; j < 16; j++) m[j] = lanes[j];
        mult[0] = 1;
    } else if (type == T_IQ4_XS) {
        for (int j = 0; j < 8; j++) mult[j] = (int16_t)_mm256_extract_epi16(w.c[j], 0);
    } else {
        _mm256_storeu_si256((__m256i *)lanes, w.m);
        for (int j = 0; j < 16; j++) mult[j] = lanes[j];
    }
    return sub;
}

/* The 32 signed codes and scale of an IQ4_NL or MXFP4 block; 0 for another type. */
int types_block32_i8(int type, const uint8_t *b, int8_t *q, float *d) {
    if (type == T_IQ4_NL) {
        _mm256_storeu_si256((__m256i *)q, codes_iq4_nl(b));
        *d = scale_f16(b);
    } else if (type == T_MXFP4) {
        _mm256_storeu_si256((__m256i *)q, codes_mxfp4(b));
        *d = scale_e8m0(b);
    } else {
        return 0;
    }
    return 1;
}

/* Activation rows per pass over a weight row: the grid types' blocks cost more to decode than
   their dot products, so they take Q8_ROWS_GRID rows a pass (accumulators in memory); measured at
   64 rows, IQ2_S/IQ2_XXS/IQ3_S 2048x2048 products 13-28% faster, IQ4_NL and MXFP4 10% slower. */
int types_q8_rows(int type) { return iq_type_of(type) ? Q8_ROWS_GRID : Q8_ROWS; }

int types_q8_block(int type) {
    switch (type) {
    case T_IQ4_NL: case T_MXFP4: return 32;
    case T_Q2_K: case T_Q3_K: case T_IQ4_XS: return 256;
    default: return iq_type_of(type) && iq_ready() ? 256 : 0;
    }
}

/* One weight row against n <= types_q8_rows(type) quantized activation rows (blocks of types_q8_block). */
void types_row_q8(int type, const uint8_t *row, int64_t nb, const void *xq, int64_t ldx, int n, float *acc) {
    switch (type) {
    case T_IQ4_NL: row_iq4_nl_i8(row, nb, (const xq32 *)xq, ldx, n, acc); break;
    case T_MXFP4: row_mxfp4_i8(row, nb, (const xq32 *)xq, ldx, n, acc); break;
    case T_Q2_K: row_256(dec_q2_k, dot_q2_k, 1, 84, row, nb, (const xq256 *)xq, ldx, n, acc); break;
    case T_Q3_K: row_256(dec_q3_k, dot_q3_k, 0, 110, row, nb, (const xq256 *)xq, ldx, n, acc); break;
    case T_IQ4_XS: row_256(dec_iq4_xs, dot_iq, 0, 136, row, nb, (const xq256 *)xq, ldx, n, acc); break;
    case T_IQ2_XXS: row_256(dec_iq2_xxs, dot_iq, 0, 66, row, nb, (const xq256 *)xq, ldx, n, acc); break;
    case T_IQ2_XS: row_256(dec_iq2_xs, dot_iq, 0, 74, row, nb, (const xq256 *)xq, ldx, n, acc); break;
    case T_IQ2_S: row_256(dec_iq2_s, dot_iq, 0, 82, row, nb, (const xq256 *)xq, ldx, n, acc); break;
    case T_IQ3_XXS: row_256(dec_iq3_xxs, dot_iq, 0, 98, row, nb, (const xq256 *)xq, ldx, n, acc); break;
    case T_IQ3_S: row_256(dec_iq3_s, dot_iq, 0, 110, row, nb, (const xq256 *)xq, ldx, n, acc); break;
    case T_IQ1_S: row_256(dec_iq1_s, dot_iq, 0, 50, row, nb, (const xq256 *)xq, ldx, n, acc); break;
    case T_IQ1_M: row_256(dec_iq1_m, dot_iq, 0, 56, row, nb, (const xq256 *)xq, ldx, n, acc); break;
    default: break;
    }
}
#endif

/* ---- F16 / BF16 rows times float32 activations ---- */

#define HALF_ROWS 2 /* activation rows per pass over a weight row */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* 16 weights at p (F16, or BF16 when bf) as float32; k < 16 of them, the rest 0. */
static ALWAYS_INLINE __m512 load_half16(int bf, const uint8_t *p, int k) {
    const __m256i h = k == 16 ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16((__mmask16)((1u << k) - 1), p);
    return bf ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

/* R weight rows w[r] times N activation rows x[t] (pointers repeated past the real ones) ->
   out[t * R + r]. Every dot has one 16-lane accumulator, lane l summing columns l, l + 16, ... in
   order, then the same reduction: its bits do not depend on R, N or the rows beside it. */
static ALWAYS_INLINE void tile_half(int bf, const int R, const int N, const uint8_t *const *w, const float *const *x,
                                    int64_t ncols, float *out) {
    __m512 A[8][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < N; t++) A[r][t] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 64 <= ncols; c += 64) { /* one prefetch per 128 bytes of each row */
        for (int r = 0; r < R; r++) PREFETCH(w[r] + 2 * c);
        for (int j = 0; j < 4; j++) {
            __m512 v[8];
            for (int r = 0; r < R; r++) v[r] = load_half16(bf, w[r] + 2 * (c + 16 * j), 16);
            for (int t = 0; t < N; t++) {
                const __m512 xv = _mm512_loadu_ps(x[t] + c + 16 * j);
                for (int r = 0; r < R; r++) A[r][t] = _mm512_fmadd_ps(v[r], xv, A[r][t]);
            }
        }
    }
    for (; c < ncols; c += 16) {
        const int k = ncols - c < 16 ? (int)(ncols - c) : 16;
        const __mmask16 m = (__mmask16)((1u << k) - 1);
        __m512 v[8];
        for (int r = 0; r < R; r++) v[r] = load_half16(bf, w[r] + 2 * c, k);
        for (int t = 0; t < N; t++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, x[t] + c);
            for (int r = 0; r < R; r++) A[r][t] = _mm512_fmadd_ps(v[r], xv, A[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < N; t++) out[t * R + r] = _mm512_reduce_add_ps(A[r][t]);
}

#ifndef HALF_DEC_ROWS
#define HALF_DEC_ROWS 1
#endif
/* Rows [r0, r0 + nr) of W times all T activation rows -> Y: decode HALF_DEC_ROWS weight rows a
   pass (more rows streamed side by side were measured slower), 2-4 rows 2 weight rows x 4, else
   4 weight rows x 4 activation rows. */
static void rows_half(int bf, const uint8_t *W, int64_t row_bytes, int64_t r0, int nr, int64_t ncols, const float *X,
                      int64_t T, float *Y, int64_t ldy) {
    const uint8_t *w[8];
    const float *x[4];
    float out[32];
    const int R = T == 1 ? HALF_DEC_ROWS : T <= 4 ? 2 : 4, N = T == 1 ? 1 : 4;
    for (int g = 0; g < nr; g += R) {
        const int m = nr - g < R ? nr - g : R;
        for (int r = 0; r < R; r++) w[r] = W + (r0 + g + (r < m ? r : m - 1)) * row_bytes;
        for (int64_t t0 = 0; t0 < T; t0 += N) {
            const int n = T - t0 < N ? (int)(T - t0) : N;
            for (int t = 0; t < N; t++) x[t] = X + (t0 + (t < n ? t : n - 1)) * ncols;
            if (T == 1) tile_half(bf, HALF_DEC_ROWS, 1, w, x, ncols, out);
            else if (T <= 4) tile_half(bf, 2, 4, w, x, ncols, out); /* fewer rows streamed side by side */
            else tile_half(bf, 4, 4, w, x, ncols, out);
            for (int t = 0; t < n; t++)
                for (int r = 0; r < m; r++) Y[(t0 + t) * ldy + r0 + g + r] = out[t * R + r];
        }
    }
}
#define HALF_GROUP 8 /* weight rows a thread takes at a time */
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* 8 weights at p (F16, or BF16 when bf) as float32. */
static inline __m256 load_half8(int bf, const uint8_t *p) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return bf ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

/* One row of ncols half weights against n <= HALF_ROWS activation rows: each 64 weights are
   converted once for all n rows, into 8 accumulators per row (8 FMA chains hide the FMA
   latency); each row's sum has the same order whatever n is. */
static void row_half(int bf, const uint8_t *w, int64_t ncols, const float *X, int n, float *out) {
    __m256 A[HALF_ROWS][8];
    for (int t = 0; t < n; t++)
        for (int k = 0; k < 8; k++) A[t][k] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 64 <= ncols; c += 64) {
        __m256 v[8];
        PREFETCH(w + 2 * c);
        for (int k = 0; k < 8; k++) v[k] = load_half8(bf, w + 2 * (c + 8 * k));
        for (int t = 0; t < n; t++)
            for (int k = 0; k < 8; k++)
                A[t][k] = _mm256_fmadd_ps(v[k], _mm256_loadu_ps(X + t * ncols + c + 8 * k), A[t][k]);
    }
    const int64_t c8 = c;
    for (int t = 0; t < n; t++) {
        for (c = c8; c + 8 <= ncols; c += 8)  /* the rest, 8 at a time, then one by one */
            A[t][0] = _mm256_fmadd_ps(load_half8(bf, w + 2 * c), _mm256_loadu_ps(X + t * ncols + c), A[t][0]);
        for (int k = 0; k < 4; k++) A[t][k] = _mm256_add_ps(A[t][k], A[t][k + 4]);
        const __m256 s = _mm256_add_ps(_mm256_add_ps(A[t][0], A[t][1]), _mm256_add_ps(A[t][2], A[t][3]));
        out[t] = 0.f;
        hsum_acc(&s, 1, out + t);
        for (int64_t j = c; j < ncols; j++)
            out[t] += (bf ? bf16_to_f32(rd16(w + 2 * j)) : f16_to_f32(rd16(w + 2 * j))) * X[t * ncols + j];
    }
}
#else
/* Portable: one value at a time, in column order. */
static void row_half(int bf, const uint8_t *w, int64_t ncols, const float *X, int n, float *out) {
    for (int t = 0; t < n; t++) {
        float s = 0.f;
        for (int64_t j = 0; j < ncols; j++)
            s += (bf ? bf16_to_f32(rd16(w + 2 * j)) : f16_to_f32(rd16(w + 2 * j))) * X[t * ncols + j];
        out[t] = s;
    }
}
#endif

/* Several products of one shape at once (a MoE layer's experts): job j (5 int64: W, row_bytes,
   X, T, Y) is Y [T, nrows] = X [T, ncols] @ W.T for F16 or BF16 rows of W; the threads share
   (job, rows) items. A row's result does not depend on T (batch-invariant, as ls_matmul_f32). */
int ls_matmul_half_jobs(int type, int64_t n_jobs, const int64_t *jobs, int64_t nrows, int64_t ncols, int nthreads) {
    if ((type != T_F16 && type != T_BF16) || nrows < 1 || ncols < 1 || n_jobs < 1) return -1;
    for (int64_t j = 0; j < n_jobs; j++)
        if (!jobs[5 * j] || jobs[5 * j + 1] < 2 * ncols || !jobs[5 * j + 2] || jobs[5 * j + 3] < 1 || !jobs[5 * j + 4]) return -1;
    const int bf = type == T_BF16;
#ifdef HALF_GROUP
    const int64_t G = HALF_GROUP;
#else
    const int64_t G = 1;
#endif
    const int64_t groups = (nrows + G - 1) / G;
#pragma omp parallel for schedule(static) num_threads(n_jobs * nrows * ncols >= (1 << 15) ? nthreads : 1)
    for (int64_t it = 0; it < n_jobs * groups; it++) {
        const int64_t *J = jobs + 5 * (it / groups), g = it % groups;
        const uint8_t *W = (const uint8_t *)J[0];
        const float *X = (const float *)J[2];
        float *Y = (float *)J[4];
#ifdef HALF_GROUP
        const int nr = (int)(nrows - g * G < G ? nrows - g * G : G);
        rows_half(bf, W, J[1], g * G, nr, ncols, X, J[3], Y, nrows);
#else
        for (int64_t t0 = 0; t0 < J[3]; t0 += HALF_ROWS) {
            const int n = (int)(J[3] - t0 < HALF_ROWS ? J[3] - t0 : HALF_ROWS);
            float out[HALF_ROWS];
            row_half(bf, W + g * J[1], ncols, X + t0 * ncols, n, out);
            for (int t = 0; t < n; t++) Y[(t0 + t) * nrows + g] = out[t];
        }
#endif
    }
    return 0;
}

/* Y [T, nrows] = X [T, ncols] @ W.T: one job of ls_matmul_half_jobs. */
int ls_matmul_half(int type, const uint8_t *W, int64_t row_bytes, int64_t nrows, int64_t ncols, const float *X,
                   int64_t T, float *Y, int nthreads) {
    const int64_t job[5] = {(int64_t)(intptr_t)W, row_bytes, (int64_t)(intptr_t)X, T, (int64_t)(intptr_t)Y};
    return ls_matmul_half_jobs(type, 1, job, nrows, ncols, nthreads);
}
