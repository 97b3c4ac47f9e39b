/* Flash attention on the CPU: fused tiles of scores, online softmax and P.V, forward and backward.
 *
 * The readable twin of this file is maskedattn/attention/tiled.py: the same algorithm in torch
 * operations, its fallback and its test oracle. This file exists because there the element-wise
 * passes (max, exp, sum, rescale) run over tiles that have left the cache; here each tile's
 * scores, statistics and products are computed while the tile sits in L1/L2.
 *
 * No PyTorch headers: Python (tiled.py) passes the tensors' pointers and strides in one
 * `attn_args` struct through ctypes (native.py builds and loads this file). The kernel reads
 * q, k, v as they are (float32, bfloat16 or float16, last dimension contiguous) and writes the
 * outputs in that dtype. It is compiled once per instruction set: AVX-512 with BF16 dot
 * products, AVX-512, AVX2 + FMA + F16C.
 *
 * Products run in float32, or in bfloat16 for bfloat16 inputs where the CPU has vdpbf16ps;
 * they always accumulate in float32, and the softmax statistics are float32. The operands are
 * first packed, tile by tile, into the layouts the products read (in elements of the compute
 * type; rows padded with zeros to whole tiles, d to Dp, a multiple of 16):
 *   natural    [rows][Dp]                                       A operand: x
 *   tiles      float [Dp][rows]       bf16 [Dp/2][rows][2]      B operand: x^T
 *   pair rows  float = natural        bf16 [rows/2][Dp][2]      B operand: x
 *   tiles_t    float [Dp][rows]       bf16 [Dp][rows/2][2]      A operand: x^T
 * bfloat16 dot products reduce over *pairs*, hence the pair-interleaved layouts.
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ABI_VERSION 4

/* -- vectors of VW floats: the only place where AVX-512 and AVX2 differ ---------------------- */

#if defined(__AVX512F__)
#define VW 16
#define MR 6 /* rows x NR vectors of accumulators: 24 of the 32 registers */
#define NR 4
typedef __m512 vf;
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, x) _mm512_storeu_ps(p, x)
#define vset1(x) _mm512_set1_ps(x)
#define vzero() _mm512_setzero_ps()
#define vadd(a, b) _mm512_add_ps(a, b)
#define vsub(a, b) _mm512_sub_ps(a, b)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vdiv(a, b) _mm512_div_ps(a, b)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vmax(a, b) _mm512_max_ps(a, b)
#define vabs(a) _mm512_abs_ps(a)
#define vhmax(a) _mm512_reduce_max_ps(a)
#define vhsum(a) _mm512_reduce_add_ps(a)
#define vround(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vsign(a) _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), \
                                                      _mm512_set1_epi32((int)0x80000000)))
#define vxor(a, b) _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), \
                                                        _mm512_castps_si512(b)))
/* p * 2^n; scalef gives exactly 0 for n <= -150, which masked scores need. */
#define vscale2(p, n) _mm512_scalef_ps(p, n)
#define vload_bf16(p) _mm512_castsi512_ps(_mm512_slli_epi32( \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define vload_f16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define vstore_f16(p, x) _mm256_storeu_si256((__m256i *)(p), \
                                             _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT))
#else
#define VW 8
#define MR 6 /* 12 accumulators, 2 B vectors, 1 broadcast: 15 of the 16 registers */
#define NR 2
typedef __m256 vf;
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, x) _mm256_storeu_ps(p, x)
#define vset1(x) _mm256_set1_ps(x)
#define vzero() _mm256_setzero_ps()
#define vadd(a, b) _mm256_add_ps(a, b)
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vdiv(a, b) _mm256_div_ps(a, b)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vmax(a, b) _mm256_max_ps(a, b)
#define vabs(a) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a)
#define vsign(a) _mm256_and_ps(_mm256_set1_ps(-0.0f), a)
#define vxor(a, b) _mm256_xor_ps(a, b)
#define vround(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static inline float vhmax(vf a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}
static inline float vhsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* p * 2^n for integral n >= -126 by building the exponent; below that the result is 0. */
static inline vf vscale2(vf p, vf n) {
    vf keep = _mm256_cmp_ps(n, _mm256_set1_ps(-126.0f), _CMP_GE_OQ);
    __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_max_ps(n, _mm256_set1_ps(-126.0f))),
                         _mm256_set1_epi32(127)), 23);
    vf r = _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
    /* A NaN score must stay NaN (its p is NaN already). */
    return _mm256_blendv_ps(r, p, _mm256_cmp_ps(n, n, _CMP_UNORD_Q));
}
#define vload_bf16(p) _mm256_castsi256_ps(_mm256_slli_epi32( \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define vload_f16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define vstore_f16(p, x) _mm_storeu_si128((__m128i *)(p), \
                                          _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT))
#endif

#if defined(__AVX512BF16__)
#define HAVE_BF16 1
#else
#define HAVE_BF16 0
#endif

#define LOG2E 1.4426950408889634f /* exp(x) = exp2(x * LOG2E): the softmax runs in base 2 */
#define LN2 0.6931471805599453f

/* 2^x to float precision (relative error ~3e-9 before rounding): 2^round(x) * poly(fraction).
 * vmax(floor, x) keeps a NaN x (the second operand wins), and -inf becomes a 0 result. */
static inline vf vexp2(vf x) {
    x = vmax(vset1(-200.0f), x);
    vf n = vround(x);
    vf f = vsub(x, n);
    vf p = vset1(1.53375768e-4f);
    p = vfma(p, f, vset1(1.33998604e-3f));
    p = vfma(p, f, vset1(9.61851953e-3f));
    p = vfma(p, f, vset1(5.55032900e-2f));
    p = vfma(p, f, vset1(2.40226466e-1f));
    p = vfma(p, f, vset1(6.93147206e-1f));
    p = vfma(p, f, vset1(1.0f));
    return vscale2(p, n);
}

/* tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): no overflow for any x. */
static inline vf vtanh(vf x) {
    vf e = vexp2(vmul(vabs(x), vset1(-2.0f * LOG2E)));
    vf t = vdiv(vsub(vset1(1.0f), e), vadd(vset1(1.0f), e));
    return vxor(t, vsign(x));
}

/* -- the arguments: every field 8 bytes wide, mirrored by ctypes Structures in native.py ----- */

typedef struct {
    void *data;
    int64_t sb, sh, st; /* strides of (B, H, T, D) in elements; d is contiguous */
} view;

typedef struct {
    int64_t batch, q_heads, kv_heads, q_len, k_len, head_dim;
    int64_t dtype; /* of q, k, v, out, d_out and the gradients: DT_* below */
    int64_t block_q, block_k, n_threads;
    /* TileKind per (b, h, query tile, key tile) for documents and dense masks, else NULL;
     * b and h strides are 0 where broadcast */
    const int8_t *kinds;
    int64_t kinds_sb, kinds_sh;
    /* OP_FIELDS of lowering.py, in that order (native.py generates the ctypes mirror from it):
     * an int as int64, a float as double, a tensor as its pointer and then its strides.
     * The interval rules of MaskRule: window, prefix and chunk < 0 when absent. */
    int64_t causal, window, prefix, chunk;
    const int64_t *lengths;
    int64_t lengths_sb;
    const int64_t *documents;
    int64_t documents_sb;
    const uint8_t *dense;
    int64_t dense_sb, dense_sh, dense_sq, dense_sk;
    /* biases: ALiBi slopes per query head, or a dense float bias */
    const float *alibi;
    const float *bias;
    int64_t bias_sb, bias_sh, bias_sq, bias_sk;
    double softcap, scale; /* softcap <= 0: none */
    /* (B, Hq, Tq, D): q, out, d_out, dq; (B, Hkv, Tk, D): k, v, dk, dv */
    view q, k, v, out, d_out, dq, dk, dv;
    float *lse;          /* (B, Hq, Tq) contiguous: written by forward (unless NULL), read by
                          * backward */
    const float *d_lse;  /* (B, Hq, Tq) contiguous, or NULL: the gradient reaching the lse */
} attn_args;

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
#define FEW_ROWS 8 /* query tiles this short take the forward's dot-product path */
enum { TILE_EMPTY = 0, TILE_PARTIAL = 1, TILE_FULL = 2 };

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* Threads for a call: no more than its work items, and one for a call so small (under about
 * a million multiply-adds) that waking another thread would cost more than it saves. */
static int team_size(const attn_args *a, int64_t items) {
    const double work = (double)a->batch * a->q_heads * a->q_len * a->k_len * a->head_dim;
    return (int)(work < 1e6 ? 1 : min64(a->n_threads, items));
}

/* Work space carved from one allocation, in 64-byte aligned pieces. An arena with no base only
 * counts, which sizes the allocation: the same code then sizes and carves. */
typedef struct {
    char *base;
    size_t used;
} arena;

static void *take(arena *ar, size_t bytes) {
    void *p = ar->base ? ar->base + ar->used : NULL;
    ar->used += (bytes + 63) / 64 * 64;
    return p;
}

/* Row t of head h of batch row b of a view, as a byte pointer. */
static inline char *row_of(const view *x, int64_t b, int64_t h, int64_t t, size_t es) {
    return (char *)x->data + (b * x->sb + h * x->sh + t * x->st) * (int64_t)es;
}

/* -- element conversions ------------------------------------------------------------------------ */

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* n values of dtype `dt` at src as float32 at dst, zeros up to n_pad. */
static void load_f32(float *dst, const void *src, int64_t n, int64_t n_pad, int dt) {
    const uint16_t *s16 = src;
    int64_t c = 0;
    if (dt == DT_F32) memcpy(dst, src, n * sizeof(float)), c = n;
    else if (dt == DT_BF16)
        for (; c + VW <= n; c += VW) vstore(dst + c, vload_bf16(s16 + c));
    else
        for (; c + VW <= n; c += VW) vstore(dst + c, vload_f16(s16 + c));
    for (; c < n; c++) dst[c] = dt == DT_BF16 ? bf16_to_f32(s16[c]) : _cvtsh_ss(s16[c]);
    for (; c < n_pad; c++) dst[c] = 0.0f;
}

/* A vector into element c of a float row, or of a bfloat16 row (bf16). */
static inline void vstore_as(void *row, int64_t c, vf x, int bf16) {
#if HAVE_BF16
    if (bf16) {
        _mm256_storeu_si256((__m256i *)((uint16_t *)row + c), (__m256i)_mm512_cvtneps_pbh(x));
        return;
    }
#else
    (void)bf16; /* bfloat16 rows exist only with AVX512-BF16 */
#endif
    vstore((float *)row + c, x);
}

/* n float32 values as dtype `dt`. */
static void store_f32(void *dst, const float *src, int64_t n, int dt) {
    uint16_t *d16 = dst;
    int64_t c = 0;
    if (dt == DT_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    if (dt == DT_F16)
        for (; c + VW <= n; c += VW) vstore_f16(d16 + c, vload(src + c));
#if HAVE_BF16
    if (dt == DT_BF16)
        for (; c + 16 <= n; c += 16)
            _mm256_storeu_si256((__m256i *)(d16 + c),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + c)));
#endif
    for (; c < n; c++)
        d16[c] = dt == DT_BF16 ? f32_to_bf16(src[c])
                               : _cvtss_sh(src[c], _MM_FROUND_TO_NEAREST_INT);
}

/* -- small matrix products: C (M x N) = [C * row_scale +] A (M x K) . B (K x N) ------------------
 * A row-major with row stride lda; B in the "pair rows" layout: float rows of N at stride ldb,
 * or bfloat16 pairs of rows interleaved, ldb elements per pair. N is a multiple of VW. The tile
 * of MR x NR vectors stays in registers over the whole K loop; B is swept once per MR rows. */

/* The register tile starts as C (each row times row_scale) when accumulating, else as zeros. */
static inline __attribute__((always_inline)) void tile_load(
    vf c[MR][NR], const int mr, const int nr, const float *C, int64_t ldc, int acc,
    const float *row_scale) {
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        vf s = row_scale ? vset1(row_scale[i]) : vset1(1.0f);
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++)
            c[i][j] = acc ? vmul(vload(C + i * ldc + j * VW), s) : vzero();
    }
}

static inline __attribute__((always_inline)) void tile_store(
    vf c[MR][NR], const int mr, const int nr, float *C, int64_t ldc) {
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) vstore(C + i * ldc + j * VW, c[i][j]);
}

static inline __attribute__((always_inline)) void ukernel_f32(
    const int mr, const int nr, int64_t K, const float *A, int64_t lda, const float *B,
    int64_t ldb, float *C, int64_t ldc, int acc, const float *row_scale) {
    vf c[MR][NR];
    tile_load(c, mr, nr, C, ldc, acc, row_scale);
    for (int64_t k = 0; k < K; k++) {
        vf b[NR];
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++) b[j] = vload(B + k * ldb + j * VW);
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            vf a = vset1(A[i * lda + k]);
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) c[i][j] = vfma(a, b[j], c[i][j]);
        }
    }
    tile_store(c, mr, nr, C, ldc);
}

/* One instance per shape (mr <= MR rows, nr <= NR vectors), so every loop above unrolls fully. */
#if NR == 4
#define UKROW(m, T) T(m, 1) T(m, 2) T(m, 3) T(m, 4)
#define UKENTRY(p, m) {p##_##m##_1, p##_##m##_2, p##_##m##_3, p##_##m##_4}
#else
#define UKROW(m, T) T(m, 1) T(m, 2)
#define UKENTRY(p, m) {p##_##m##_1, p##_##m##_2}
#endif

/* Every micro-kernel instance has this signature; A and B are float or bfloat16. */
typedef void (*ukernel_fn)(int64_t K, const void *A, int64_t lda, const void *B, int64_t ldb,
                           float *C, int64_t ldc, int acc, const float *row_scale);
#define UKF32(m, n)                                                                           \
    static void ukf32_##m##_##n(int64_t K, const void *A, int64_t lda, const void *B,         \
                                int64_t ldb, float *C, int64_t ldc, int acc, const float *rs) { \
        ukernel_f32(m, n, K, A, lda, B, ldb, C, ldc, acc, rs);                                \
    }
UKROW(1, UKF32) UKROW(2, UKF32) UKROW(3, UKF32) UKROW(4, UKF32) UKROW(5, UKF32) UKROW(6, UKF32)
static const ukernel_fn UKF32_TABLE[MR][NR] = {
    UKENTRY(ukf32, 1), UKENTRY(ukf32, 2), UKENTRY(ukf32, 3),
    UKENTRY(ukf32, 4), UKENTRY(ukf32, 5), UKENTRY(ukf32, 6)};

#if HAVE_BF16
/* The same with vdpbf16ps: each step consumes a pair of K, broadcast from A as one 32-bit word. */
static inline __attribute__((always_inline)) void ukernel_bf16(
    const int mr, const int nr, int64_t K, const uint16_t *A, int64_t lda, const uint16_t *B,
    int64_t ldb, float *C, int64_t ldc, int acc, const float *row_scale) {
    vf c[MR][NR]; /* AVX-512: VW = 16 */
    tile_load(c, mr, nr, C, ldc, acc, row_scale);
    for (int64_t k = 0; k < K; k += 2) {
        __m512bh b[NR];
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++)
            b[j] = (__m512bh)_mm512_loadu_si512(B + (k / 2) * ldb + j * 32);
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            int32_t pair;
            memcpy(&pair, A + i * lda + k, sizeof pair);
            __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 8
            for (int j = 0; j < nr; j++) c[i][j] = _mm512_dpbf16_ps(c[i][j], a, b[j]);
        }
    }
    tile_store(c, mr, nr, C, ldc);
}

#define UKBF16(m, n)                                                                           \
    static void ukbf16_##m##_##n(int64_t K, const void *A, int64_t lda, const void *B,         \
                                 int64_t ldb, float *C, int64_t ldc, int acc, const float *rs) { \
        ukernel_bf16(m, n, K, A, lda, B, ldb, C, ldc, acc, rs);                                \
    }
UKROW(1, UKBF16) UKROW(2, UKBF16) UKROW(3, UKBF16) UKROW(4, UKBF16) UKROW(5, UKBF16)
UKROW(6, UKBF16)
static const ukernel_fn UKBF16_TABLE[MR][NR] = {
    UKENTRY(ukbf16, 1), UKENTRY(ukbf16, 2), UKENTRY(ukbf16, 3),
    UKENTRY(ukbf16, 4), UKENTRY(ukbf16, 5), UKENTRY(ukbf16, 6)};

/* Rows r0 and r1 (n floats, a multiple of 16) as one pair row: bfloat16
 * [r0[0], r1[0], r0[1], r1[1], ...], the B layout of the products that reduce over rows. */
static inline void store_bf16_pair(uint16_t *dst, const float *r0, const float *r1, int64_t n) {
    static const uint16_t zip[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                     8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i idx = _mm512_loadu_si512(zip);
    for (int64_t c = 0; c < n; c += 16) {
        __m512i both = _mm512_inserti64x4(
            _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r0 + c))),
            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(r1 + c)), 1);
        _mm512_storeu_si512(dst + 2 * c, _mm512_permutexvar_epi16(idx, both));
    }
}
#else
/* Without AVX512-BF16, bfloat16 inputs are computed in float32: this is never called. */
static void store_bf16_pair(uint16_t *dst, const float *r0, const float *r1, int64_t n) {
    for (int64_t c = 0; c < n; c++) dst[2 * c] = f32_to_bf16(r0[c]), dst[2 * c + 1] = f32_to_bf16(r1[c]);
}
#endif

/* Bounds on what each row of A needs, on the tiles a mask leaves partial (see gemm). */
enum {
    COLS_BEFORE, /* row i of C is wanted before column bound[i] only (non-decreasing) */
    K_BEFORE,    /* row i of A is zero from column bound[i] on (non-decreasing) */
    COLS_FROM,   /* row i of C is wanted from column bound[i] on only (non-decreasing) */
    K_FROM,      /* row i of A is zero before column bound[i] (non-decreasing) */
};

/* C (M x N) [+]= A (M x K) . B (K x N), float32 or (bf16) bfloat16 operands, in tiles of MR x NR
 * vectors. In bfloat16 B's pair rows hold each column twice as wide, each step of K two rows.
 *
 * `bound` (NULL: none) says, as `kind` tells, which part of each row the caller needs: tiles of
 * C it does not need are not computed (the scores there are masked afterwards), and the products
 * skip the columns where A is zero. A tile of rows takes the loosest bound of its rows, its last
 * row's for the "before" kinds and its first row's for the "from" kinds. */
static void gemm(int bf16, int64_t M, int64_t N, int64_t K, const void *A, int64_t lda,
                 const void *B, int64_t ldb, float *C, int64_t ldc, int acc,
                 const float *row_scale, const int64_t *bound, int kind) {
    const int64_t es = bf16 ? 2 : 4, pair = bf16 ? 2 : 1;
#if HAVE_BF16
    const ukernel_fn(*table)[NR] = bf16 ? UKBF16_TABLE : UKF32_TABLE;
#else
    const ukernel_fn(*table)[NR] = UKF32_TABLE;
#endif
    for (int64_t n0 = 0; n0 < N; n0 += NR * VW) {
        const int nr = (int)min64(NR, (N - n0) / VW);
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int mr = (int)min64(MR, M - m0);
            int64_t k0 = 0, k1 = K; /* bfloat16 steps take K in pairs: k0 is a whole pair */
            if (bound) {
                const int64_t b = bound[kind == COLS_BEFORE || kind == K_BEFORE ? m0 + mr - 1
                                                                                : m0];
                if (kind == COLS_BEFORE && n0 >= b) continue;
                if (kind == COLS_FROM && n0 + nr * VW <= b) continue;
                if (kind == K_BEFORE) k1 = min64(K, (b + pair - 1) / pair * pair);
                if (kind == K_FROM) k0 = min64(K, b / pair * pair);
            }
            table[mr - 1][nr - 1](k1 - k0, (const char *)A + (m0 * lda + k0) * es, lda,
                                  (const char *)B + (k0 * ldb + n0 * pair) * es,
                                  ldb * pair, C + m0 * ldc + n0, ldc, acc,
                                  row_scale ? row_scale + m0 : NULL);
        }
    }
}

/* -- packing: a tile of rows of q, k, v or d_out into the layouts above ------------------------ */

/* A tile of `rows` rows (t0 .. t0 + rows of head h, batch row b) as float32 [rows][Dp]: rows
 * past `len` and columns past d are zeros. */
static void load_tile(float *dst, const view *x, int64_t b, int64_t h, int64_t t0, int64_t rows,
                      int64_t len, int64_t d, int64_t Dp, int dt) {
    const size_t es = dt == DT_F32 ? 4 : 2;
    for (int64_t r = 0; r < rows; r++) {
        if (t0 + r < len) load_f32(dst + r * Dp, row_of(x, b, h, t0 + r, es), d, Dp, dt);
        else memset(dst + r * Dp, 0, Dp * sizeof(float));
    }
}

/* 32-bit words: dst [cols][rows] = src [rows][cols] (a float, or a pair of bfloat16). */
static void transpose32(uint32_t *dst, const uint32_t *src, int64_t rows, int64_t cols) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16)
        for (int64_t c = 0; c < cols; c++)
            for (int64_t r = r0; r < min64(r0 + 16, rows); r++) dst[c * rows + r] = src[r * cols + c];
}

/* A float32 tile f [rows][Dp] in the compute type: natural, tiles, pair rows or tiles_t (NULL
 * where not wanted). `tmp` holds rows * Dp bfloat16 values. */
static void pack_tile(int bf16, const float *f, int64_t rows, int64_t Dp, void *natural,
                      void *tiles, void *pair_rows, void *tiles_t, uint16_t *tmp) {
    if (!bf16) {
        if (natural) memcpy(natural, f, rows * Dp * sizeof(float));
        if (pair_rows) memcpy(pair_rows, f, rows * Dp * sizeof(float));
        if (tiles) transpose32(tiles, (const uint32_t *)f, rows, Dp);
        if (tiles_t) transpose32(tiles_t, (const uint32_t *)f, rows, Dp);
        return;
    }
    if (natural || tiles) {
        uint16_t *nat = natural ? natural : tmp;
        for (int64_t r = 0; r < rows; r++) store_f32(nat + r * Dp, f + r * Dp, Dp, DT_BF16);
        if (tiles) transpose32(tiles, (const uint32_t *)nat, rows, Dp / 2);
    }
    if (pair_rows || tiles_t) {
        uint16_t *pr = pair_rows ? pair_rows : tmp;
        for (int64_t r = 0; r < rows; r += 2)
            store_bf16_pair(pr + r * Dp, f + r * Dp, f + (r + 1) * Dp, Dp);
        if (tiles_t) transpose32(tiles_t, (const uint32_t *)pr, rows / 2, Dp);
    }
}

/* -- scores: scale, softcap, bias and mask, one row of a tile at a time --------------------------
 * A natural tile (forward) holds one query per row and keys along it; a transposed tile
 * (backward) holds one key per row and queries along it. Both become base-2 logits. */

typedef struct {
    const attn_args *a;
    int64_t b, h;    /* batch row, query head */
    int transposed;  /* rows are keys */
} tile_ctx;

/* Does this call only scale the scores (then the scaling is fused into the exp pass)? */
static inline int plain_scores(const attn_args *a) {
    return a->softcap <= 0 && a->alibi == NULL && a->bias == NULL;
}

static inline int interval_kind(int full, int empty) {
    return empty ? TILE_EMPTY : full ? TILE_FULL : TILE_PARTIAL;
}

static inline int min_kind(int a, int b) { return a < b ? a : b; }

/* The kind of tile (qi, kj) for batch row b and query head h: the positional parts of the rule
 * classified here, mirroring the interval formulas of MaskRule.classify (masks.py) one by one, the kinds that Python
 * classified for documents and dense masks (if any), and partial where the tile reaches into
 * the padding, which must be masked. */
static int tile_kind(const attn_args *a, int64_t b, int64_t h, int64_t qi, int64_t kj) {
    const int64_t nk = cdiv(a->k_len, a->block_k), nq = cdiv(a->q_len, a->block_q);
    const int64_t qa = qi * a->block_q + a->k_len - a->q_len;      /* first query's position */
    const int64_t qb = min64(qa + a->block_q, a->k_len) - 1;       /* last query's position */
    const int64_t ka = kj * a->block_k, kb = min64(ka + a->block_k, a->k_len) - 1;
    int kind = TILE_FULL;
    if (a->causal) kind = min_kind(kind, interval_kind(kb <= qa, ka > qb));
    if (a->window > 0)
        kind = min_kind(kind, interval_kind(ka > qb - a->window, kb <= qa - a->window));
    if (a->prefix >= 0)
        kind = min_kind(kind, interval_kind(kb <= qa || kb < a->prefix,
                                            ka > qb && ka >= a->prefix));
    if (a->chunk > 0) { /* k / c == q / c (positions are >= 0: division floors) */
        const int64_t c = a->chunk;
        kind = min_kind(kind, interval_kind(qa / c == qb / c && ka / c == kb / c && qa / c == ka / c,
                                            kb / c < qa / c || ka / c > qb / c));
    }
    if (a->lengths) {
        const int64_t len = a->lengths[b * a->lengths_sb];
        kind = min_kind(kind, interval_kind(kb < len, ka >= len));
    }
    if (a->kinds) kind = min_kind(kind, a->kinds[b * a->kinds_sb + h * a->kinds_sh + qi * nk + kj]);
    int padded = (qi == nq - 1 && a->q_len % a->block_q) || (kj == nk - 1 && a->k_len % a->block_k);
    return padded && kind == TILE_FULL ? TILE_PARTIAL : kind;
}

/* Columns [lo, hi] of row `row` (a query or a key index) that the positional part of the rule
 * (causal, window, prefix, chunk, lengths, bounds) leaves visible, in the index space of the
 * columns: MaskRule.block's formulas (masks.py) solved for an interval of k, or of q. */
static void visible_span(const attn_args *a, int64_t b, int transposed, int64_t row,
                         int64_t *lo, int64_t *hi) {
    const int64_t offset = a->k_len - a->q_len;
    int64_t len = a->k_len;
    if (a->lengths) len = min64(len, a->lengths[b * a->lengths_sb]);
    if (!transposed) { /* query i = row at position pos; keys k in [lo, hi] */
        int64_t pos = offset + row, l = 0, h = len - 1;
        if (row >= a->q_len) h = -1;
        if (a->causal) h = min64(h, pos);
        if (a->window > 0) l = max64(l, pos - a->window + 1);
        if (a->prefix >= 0) h = min64(h, max64(pos, a->prefix - 1));
        if (a->chunk > 0) {
            const int64_t first = pos / a->chunk * a->chunk;
            l = max64(l, first), h = min64(h, first + a->chunk - 1);
        }
        *lo = l, *hi = h;
    } else { /* key k = row; query rows i in [lo, hi], at positions offset + i */
        int64_t k = row, l = 0, h = a->q_len - 1;
        if (k >= len) h = -1;
        if (a->causal) l = max64(l, k - offset);
        if (a->window > 0) h = min64(h, k + a->window - 1 - offset);
        if (a->prefix >= 0 && k >= a->prefix) l = max64(l, k - offset);
        if (a->chunk > 0) {
            const int64_t first = k / a->chunk * a->chunk;
            l = max64(l, first - offset), h = min64(h, first + a->chunk - 1 - offset);
        }
        *lo = l, *hi = h;
    }
}

/* Row `row` of a tile whose columns start at index col0, n columns, scores s (in place).
 * tanh_out (may be NULL) receives the softcap's tanh, which the backward differentiates. */
static void prepare_row(const tile_ctx *t, int64_t row, int64_t col0, int64_t n, float *s,
                        float *tanh_out, int partial) {
    const attn_args *a = t->a;
    const int64_t offset = a->k_len - a->q_len;
    /* Which index runs along the row, its bound, and where the query and key of column 0 are */
    const int64_t row_len = t->transposed ? a->k_len : a->q_len;
    const int64_t col_len = t->transposed ? a->q_len : a->k_len;
    const int64_t valid = row < row_len ? max64(0, min64(n, col_len - col0)) : 0;
    if (!plain_scores(a)) {
        const float scale = (float)a->scale, cap = (float)a->softcap;
        for (int64_t c = 0; c < n; c += VW) {
            vf x = vmul(vload(s + c), vset1(scale));
            if (cap > 0) {
                vf th = vtanh(vmul(x, vset1(1.0f / cap)));
                if (tanh_out) vstore(tanh_out + c, th);
                x = vmul(th, vset1(cap));
            }
            vstore(s + c, x);
        }
        if (a->alibi) { /* -slope |q_pos - k|: column c is |c + x0| away from the row */
            const float slope = a->alibi[t->h];
            const int64_t x0 = t->transposed ? offset + col0 - row : col0 - (offset + row);
            for (int64_t c = 0; c < valid; c++) s[c] -= slope * (float)llabs(c + x0);
        }
        if (a->bias) {
            const float *p = a->bias + t->b * a->bias_sb + t->h * a->bias_sh;
            int64_t stride;
            if (t->transposed) p += col0 * a->bias_sq + row * a->bias_sk, stride = a->bias_sq;
            else p += row * a->bias_sq + col0 * a->bias_sk, stride = a->bias_sk;
            for (int64_t c = 0; c < valid; c++) s[c] += p[c * stride];
        }
        for (int64_t c = 0; c < n; c += VW) vstore(s + c, vmul(vload(s + c), vset1(LOG2E)));
    }
    if (!partial) return;
    int64_t lo, hi;
    visible_span(a, t->b, t->transposed, row, &lo, &hi);
    lo = max64(lo - col0, 0), hi = min64(hi - col0, valid - 1);
    for (int64_t c = 0; c < n; c++)
        if (c < lo || c > hi) s[c] = -INFINITY;
    if (a->documents && hi >= lo) {
        const int64_t *doc = a->documents + t->b * a->documents_sb;
        const int64_t mine = t->transposed ? doc[row] : doc[offset + row];
        const int64_t *cols = t->transposed ? doc + offset + col0 : doc + col0;
        for (int64_t c = lo; c <= hi; c++)
            if (cols[c] != mine) s[c] = -INFINITY;
    }
    if (a->dense && hi >= lo) {
        const uint8_t *p = a->dense + t->b * a->dense_sb + t->h * a->dense_sh;
        int64_t stride;
        if (t->transposed) p += col0 * a->dense_sq + row * a->dense_sk, stride = a->dense_sq;
        else p += row * a->dense_sq + col0 * a->dense_sk, stride = a->dense_sk;
        for (int64_t c = lo; c <= hi; c++)
            if (!p[c * stride]) s[c] = -INFINITY;
    }
}

/* s[r][j] = q[r] . k[j] for a few query rows (decoding): dot products along d, k as it comes. */
static void scores_few_rows(const float *q, int64_t rows, const float *k, int64_t ldk, int64_t n,
                            int64_t Dp, float *s) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t r = 0; r < rows; r++) {
            vf acc = vzero();
            for (int64_t c = 0; c < Dp; c += VW)
                acc = vfma(vload(q + r * Dp + c), vload(k + j * ldk + c), acc);
            s[r * n + j] = vhsum(acc);
        }
}

/* Key tile kj of kv head h: k as tiles, v as pair rows (f, tmp: scratch for one tile). */
static void pack_kv(const attn_args *a, int bf16, int64_t b, int64_t h, int64_t kj, void *k_tiles,
                    void *v_rows, float *f, uint16_t *tmp) {
    const int64_t BK = a->block_k, D = a->head_dim, Dp = (D + 15) / 16 * 16;
    const int dt = (int)a->dtype;
    load_tile(f, &a->k, b, h, kj * BK, BK, a->k_len, D, Dp, dt);
    pack_tile(bf16, f, BK, Dp, NULL, k_tiles, NULL, NULL, tmp);
    load_tile(f, &a->v, b, h, kj * BK, BK, a->k_len, D, Dp, dt);
    pack_tile(bf16, f, BK, Dp, NULL, NULL, v_rows, NULL, tmp);
}

/* One forward thread's scratch: a tile of rows in float32 (f) and bfloat16 (tmp), the query
 * tile, scores s (and as bfloat16 p16), output o, row statistics, the rows' column bounds on
 * partial tiles, and its own k and v tiles when they are not packed once for all. */
typedef struct {
    float *f, *s, *o, *m, *l, *alpha;
    int64_t *ends;
    uint16_t *tmp, *p16;
    char *q, *k, *v;
} fwd_scratch;

static void forward_scratch(arena *ar, int64_t BQ, int64_t BK, size_t tile, int64_t Dp,
                            size_t es, int bf16, int own_kv, fwd_scratch *w) {
    fwd_scratch x;
    x.f = take(ar, tile * 4), x.tmp = take(ar, tile * 2);
    x.s = take(ar, BQ * BK * 4), x.p16 = bf16 ? take(ar, BQ * BK * 2) : NULL;
    x.o = take(ar, BQ * Dp * 4), x.q = take(ar, BQ * Dp * es);
    x.m = take(ar, BQ * 4), x.l = take(ar, BQ * 4), x.alpha = take(ar, BQ * 4);
    x.ends = take(ar, BQ * sizeof(int64_t));
    x.k = own_kv ? take(ar, BK * Dp * es) : NULL, x.v = own_kv ? take(ar, BK * Dp * es) : NULL;
    if (w) *w = x;
}

/* -- forward -----------------------------------------------------------------------------------
 * First k and v are packed, once per call (k as tiles, v as pair rows), unless each of their
 * tiles serves only one or two work items: then each item packs the tiles it reads into its
 * own scratch, which saves writing and reading back all of k and v. With a few query rows
 * (decoding) packing k would cost more than the products: scores are then dot products with
 * the rows of k as they come (in float32).
 * One work item = (batch row, query head, query tile): its output rows accumulate in a float32
 * tile, with the
 * running max m and sum l of each row beside them. Online softmax: when a new key tile raises
 * a row's max from m to m', the partial output and sum were weighted by 2^(s - m) and must be
 * re-weighted by alpha = 2^(m - m') before adding the new tile; the product kernel applies
 * alpha as it loads the output rows. */

static inline __attribute__((always_inline)) int forward_impl(const attn_args *a,
                                                              const int bf16) {
    const int64_t B = a->batch, Hq = a->q_heads, Hkv = a->kv_heads, D = a->head_dim;
    const int64_t BQ = a->block_q, BK = a->block_k, Dp = (D + 15) / 16 * 16;
    const int64_t nq = cdiv(a->q_len, BQ), nk = cdiv(a->k_len, BK), Tkp = nk * BK;
    const int64_t group = Hq / Hkv;
    const int dt = (int)a->dtype;
    const size_t es = bf16 ? 2 : 4, out_es = dt == DT_F32 ? 4 : 2;
    const int plain = plain_scores(a);
    const float mult = plain ? (float)a->scale * LOG2E : 1.0f;
    const int64_t n_items = B * Hq * nq;
    const int few = BQ <= FEW_ROWS, prepack = !few && nq * group > 2;
    const size_t tile = (BK > BQ ? BK : BQ) * Dp;
    const int n_threads = team_size(a, n_items);
    /* One allocation: packed k and v (if packed once), then each thread's scratch. */
    arena all = {NULL, 0};
    const size_t packed = prepack ? B * Hkv * Tkp * Dp * es : 0;
    take(&all, packed), take(&all, packed);
    const size_t shared = all.used;
    forward_scratch(&all, BQ, BK, tile, Dp, es, bf16, !prepack, NULL);
    const size_t share = all.used - shared;
    char *block = aligned_alloc(64, shared + share * n_threads);
    if (!block) return -1;
    char *k_tiles = block, *v_rows = block + packed;

#pragma omp parallel num_threads(n_threads)
    {
        fwd_scratch w;
        arena mine = {block + shared + omp_get_thread_num() * share, 0};
        forward_scratch(&mine, BQ, BK, tile, Dp, es, bf16, !prepack, &w);
        float *f = w.f, *s = w.s, *o = w.o, *m = w.m, *l = w.l, *alpha = w.alpha;
        uint16_t *tmp = w.tmp, *p16 = w.p16;
        char *q = w.q, *k_mine = w.k, *v_mine = w.v;

        if (prepack) {
#pragma omp for schedule(static)
            for (int64_t item = 0; item < B * Hkv * nk; item++) {
                const int64_t bhk = item / nk, kj = item % nk;
                const size_t off = (bhk * Tkp + kj * BK) * Dp * es;
                pack_kv(a, bf16, bhk / Hkv, bhk % Hkv, kj, k_tiles + off, v_rows + off, f, tmp);
            }
        }

        /* Heaviest items first (the last query tiles see the most keys under a causal mask),
         * so that dynamic scheduling ends with small items and the threads finish together. */
#pragma omp for schedule(dynamic, 1) nowait /* the region ends with a barrier */
        for (int64_t item = 0; item < n_items; item++) {
            const int64_t qi = nq - 1 - item / (B * Hq), bh = item % (B * Hq);
            const int64_t b = bh / Hq, h = bh % Hq, hk = h / group;
            const size_t kv_off = (b * Hkv + hk) * Tkp * Dp * es;
            const tile_ctx ctx = {a, b, h, 0};
            load_tile(f, &a->q, b, h, qi * BQ, BQ, a->q_len, D, Dp, dt);
            pack_tile(bf16, f, BQ, Dp, q, NULL, NULL, NULL, tmp);
            memset(o, 0, BQ * Dp * sizeof(float));
            for (int64_t r = 0; r < BQ; r++) m[r] = -INFINITY, l[r] = 0.0f;

            for (int64_t kj = 0; kj < nk; kj++) {
                const int kind = tile_kind(a, b, h, qi, kj);
                if (kind == TILE_EMPTY) continue;
                const char *ktile = k_mine, *vtile = v_mine;
                int64_t ldk = Dp, ldv = Dp; /* few rows: row strides of k and v */
                if (prepack) {
                    ktile = k_tiles + kv_off + kj * BK * Dp * es;
                    vtile = v_rows + kv_off + kj * BK * Dp * es;
                } else if (!few) {
                    pack_kv(a, bf16, b, hk, kj, k_mine, v_mine, f, tmp);
                } else if (dt == DT_F32 && D == Dp && (kj + 1) * BK <= a->k_len) {
                    /* float32 rows that need no padding are read where they are */
                    ktile = row_of(&a->k, b, hk, kj * BK, 4), ldk = a->k.st;
                    vtile = row_of(&a->v, b, hk, kj * BK, 4), ldv = a->v.st;
                } else {
                    load_tile((float *)k_mine, &a->k, b, hk, kj * BK, BK, a->k_len, D, Dp, dt);
                    load_tile((float *)v_mine, &a->v, b, hk, kj * BK, BK, a->k_len, D, Dp, dt);
                }
                /* On a partial tile, the columns each row can see end where the positional
                 * rules say (causal: the diagonal); a running max keeps the bounds
                 * non-decreasing, as gemm wants. Past them scores are masked and P is 0. */
                const int64_t *ends = NULL;
                if (kind == TILE_PARTIAL && !few) {
                    for (int64_t r = 0, end = 0; r < BQ; r++) {
                        int64_t lo, hi;
                        visible_span(a, b, 0, qi * BQ + r, &lo, &hi);
                        end = max64(end, min64(hi - kj * BK + 1, BK));
                        w.ends[r] = end;
                    }
                    ends = w.ends;
                }
                /* s = q k^T for the tile, but the columns past each row's bound */
                if (few)
                    scores_few_rows((const float *)q, BQ, (const float *)ktile, ldk, BK, Dp, s);
                else
                    gemm(bf16, BQ, BK, Dp, q, Dp, ktile, BK, s, BK, 0, NULL, ends, COLS_BEFORE);
                for (int64_t r = 0; r < BQ; r++) {
                    float *row = s + r * BK;
                    if (!plain || kind == TILE_PARTIAL)
                        prepare_row(&ctx, qi * BQ + r, kj * BK, BK, row, NULL,
                                    kind == TILE_PARTIAL);
                    vf vm = vset1(-INFINITY);
                    for (int64_t c = 0; c < BK; c += VW) vm = vmax(vm, vload(row + c));
                    const float m_new = fmaxf(m[r], vhmax(vm) * mult);
                    /* A row that has seen nothing visible yet keeps max -inf; exponents are
                     * taken against 0 then, so that its weights come out as 0, not NaN. */
                    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
                    vf sum = vzero();
                    void *p_row = bf16 ? (void *)(p16 + r * BK) : (void *)row;
                    for (int64_t c = 0; c < BK; c += VW) {
                        vf p = vexp2(vfma(vload(row + c), vset1(mult), vset1(-m_use)));
                        sum = vadd(sum, p);
                        vstore_as(p_row, c, p, bf16);
                    }
                    alpha[r] = exp2f(m[r] - m_use);
                    l[r] = l[r] * alpha[r] + vhsum(sum);
                    m[r] = m_new;
                }
                /* o = o * alpha + p v */
                gemm(bf16, BQ, Dp, BK, bf16 ? (void *)p16 : (void *)s, BK, vtile, ldv, o, Dp, 1,
                     alpha, ends, K_BEFORE);
            }
            for (int64_t r = 0; r < min64(BQ, a->q_len - qi * BQ); r++) {
                /* A row that sees no key: output 0, lse -inf. NaN sums stay NaN. */
                const float inv = l[r] == 0.0f ? 0.0f : 1.0f / l[r];
                for (int64_t c = 0; c < Dp; c += VW)
                    vstore(o + r * Dp + c, vmul(vload(o + r * Dp + c), vset1(inv)));
                store_f32(row_of(&a->out, b, h, qi * BQ + r, out_es), o + r * Dp, D, dt);
                if (a->lse)
                    a->lse[bh * a->q_len + qi * BQ + r] =
                        l[r] == 0.0f ? -INFINITY : (m[r] + log2f(l[r])) * LN2;
            }
        }
    }
    free(block);
    return 0;
}

/* One backward thread's scratch: tiles of rows in float32 (f, g) and bfloat16 (tmp), the key
 * tile's k, v and k^T, its dk and dv, the transposed scores and their gradient (st, dpt), the
 * softcap's tanh, bfloat16 copies of P^T and dS^T (as rows and as pair rows), and the key rows'
 * bounds on partial tiles. */
typedef struct {
    float *f, *g, *dk, *dv, *st, *dpt, *th;
    uint16_t *tmp, *pt16, *dst16, *dsv16;
    char *k, *v, *k_tt;
    int64_t *starts;
} bwd_scratch;

static void backward_scratch(arena *ar, int64_t BQ, int64_t BK, size_t tile, int64_t Dp,
                             size_t es, int bf16, int softcap, bwd_scratch *w) {
    bwd_scratch x;
    x.f = take(ar, tile * 4), x.g = take(ar, tile * 4), x.tmp = take(ar, tile * 2);
    x.k = take(ar, BK * Dp * es), x.v = take(ar, BK * Dp * es), x.k_tt = take(ar, BK * Dp * es);
    x.dk = take(ar, BK * Dp * 4), x.dv = take(ar, BK * Dp * 4);
    x.st = take(ar, BK * BQ * 4), x.dpt = take(ar, BK * BQ * 4);
    x.th = softcap ? take(ar, BK * BQ * 4) : NULL;
    x.pt16 = bf16 ? take(ar, BK * BQ * 2) : NULL, x.dst16 = bf16 ? take(ar, BK * BQ * 2) : NULL;
    x.dsv16 = bf16 ? take(ar, BK * BQ * 2) : NULL;
    x.starts = take(ar, BK * sizeof(int64_t));
    if (w) *w = x;
}

/* -- backward ----------------------------------------------------------------------------------
 * First q and d_out are packed, once per call (as tiles and as pair rows), with each row's
 * lse (base 2) and delta = rowsum(d_out * out) - d_lse. Then one work item = (batch row, kv
 * head, key tile); it owns that tile's dk and dv, and walks every query head of its group and
 * every query tile that the mask leaves non-empty. Each tile pair recomputes P from q, k and
 * the saved lse, in transposed orientation (keys along rows), so that P^T and dS^T come out in
 * the layout the dv and dk products read:
 *   S^T = k q^T     P^T = 2^(S^T - lse)    dP^T = v do^T    dS^T = P^T (dP^T - delta) scale
 *   dv += P^T do    dk += dS^T q           dq^T += k^T dS^T
 * dq accumulates in one float32 buffer, tile-transposed; last it is turned upright. Float
 * addition is not associative, so for the backward to be reproducible bit for bit each tile of
 * dq takes its contributions in one fixed order, that of the key tiles (FlashAttention's
 * deterministic mode does the same): before adding, a work item waits until the key tile
 * before it that reaches the same query tile has added. Items are handed out in increasing
 * order, key tile major, so the item waited for is already running (no deadlock), and with
 * B * Hkv items per key tile it has usually finished. The result is the same for any number
 * of threads: which thread computes an item changes nothing in its arithmetic. */

/* Which key tile added to a dq tile last (+1; 0: none yet). The release store publishes the
 * tile's new values to the acquire load of the item that waits for it. */
static inline void wait_for_turn(const int64_t *done, int64_t turn) {
    for (int spins = 0; __atomic_load_n(done, __ATOMIC_ACQUIRE) < turn; spins++) {
        if (spins < 4096) _mm_pause();
        else sched_yield(); /* the item waited for lost its core: give it back */
    }
}

/* The key tile before kj whose tile with query tile qi is not empty (-1 if none): the
 * contribution to dq that must come just before kj's. */
static int64_t previous_key_tile(const attn_args *a, int64_t b, int64_t h, int64_t qi,
                                 int64_t kj) {
    while (--kj >= 0 && tile_kind(a, b, h, qi, kj) == TILE_EMPTY) {}
    return kj;
}

static inline __attribute__((always_inline)) int backward_impl(const attn_args *a,
                                                               const int bf16) {
    const int64_t B = a->batch, Hq = a->q_heads, Hkv = a->kv_heads, D = a->head_dim;
    const int64_t BQ = a->block_q, BK = a->block_k, Dp = (D + 15) / 16 * 16;
    const int64_t nq = cdiv(a->q_len, BQ), nk = cdiv(a->k_len, BK);
    const int64_t Tqp = nq * BQ, group = Hq / Hkv;
    const int dt = (int)a->dtype;
    const size_t es = bf16 ? 2 : 4, io_es = dt == DT_F32 ? 4 : 2;
    const int plain = plain_scores(a);
    const float mult = plain ? (float)a->scale * LOG2E : 1.0f;
    const float scale = (float)a->scale;
    const int n_threads = team_size(a, B * Hkv * nk);
    /* One allocation, zeroed: q and d_out packed, lse and delta per row, dq, each thread's
     * scratch; and per tile of dq the key tile that added to it last. */
    const size_t q_bytes = B * Hq * Tqp * Dp * es, dq_floats = B * Hq * Tqp * Dp;
    const size_t tile = (BK > BQ ? BK : BQ) * Dp;
    arena all = {NULL, 0};
    for (int i = 0; i < 4; i++) take(&all, q_bytes);
    take(&all, B * Hq * Tqp * 4), take(&all, B * Hq * Tqp * 4);
    take(&all, dq_floats * 4);
    const size_t shared = all.used;
    backward_scratch(&all, BQ, BK, tile, Dp, es, bf16, a->softcap > 0, NULL);
    const size_t share = all.used - shared;
    all.base = calloc(1, shared + share * n_threads + 64);
    int64_t *dq_done = calloc(B * Hq * nq, sizeof(int64_t));
    if (!all.base || !dq_done) {
        free(all.base), free(dq_done);
        return -1;
    }
    char *block = all.base;
    all.base += (64 - (uintptr_t)all.base % 64) % 64, all.used = 0; /* calloc aligns to 16 */
    char *q_tiles = take(&all, q_bytes), *q_rows = take(&all, q_bytes);
    char *do_tiles = take(&all, q_bytes), *do_rows = take(&all, q_bytes);
    float *lse2 = take(&all, B * Hq * Tqp * 4), *delta = take(&all, B * Hq * Tqp * 4);
    float *dq = take(&all, dq_floats * 4);
    int64_t next_item = 0;

#pragma omp parallel num_threads(n_threads)
    {
        bwd_scratch w;
        arena mine = {all.base + shared + omp_get_thread_num() * share, 0};
        backward_scratch(&mine, BQ, BK, tile, Dp, es, bf16, a->softcap > 0, &w);
        float *f = w.f, *g = w.g, *dk = w.dk, *dv = w.dv, *st = w.st, *dpt = w.dpt, *th = w.th;
        uint16_t *tmp = w.tmp, *pt16 = w.pt16, *dst16 = w.dst16, *dsv16 = w.dsv16;
        char *k = w.k, *v = w.v, *k_tt = w.k_tt;

#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * Hq * nq; item++) {
            const int64_t bh = item / nq, qi = item % nq, b = bh / Hq, h = bh % Hq;
            const size_t off = (bh * Tqp + qi * BQ) * Dp;
            load_tile(f, &a->q, b, h, qi * BQ, BQ, a->q_len, D, Dp, dt);
            pack_tile(bf16, f, BQ, Dp, NULL, q_tiles + off * es, q_rows + off * es, NULL, tmp);
            load_tile(f, &a->d_out, b, h, qi * BQ, BQ, a->q_len, D, Dp, dt);
            pack_tile(bf16, f, BQ, Dp, NULL, do_tiles + off * es, do_rows + off * es, NULL, tmp);
            load_tile(g, &a->out, b, h, qi * BQ, BQ, a->q_len, D, Dp, dt);
            for (int64_t r = 0; r < BQ; r++) {
                const int64_t i = qi * BQ + r, at = bh * Tqp + i;
                if (i >= a->q_len) { /* padding: P = 0 and delta = 0 */
                    lse2[at] = INFINITY, delta[at] = 0.0f;
                    continue;
                }
                vf acc = vzero();
                for (int64_t c = 0; c < Dp; c += VW)
                    acc = vfma(vload(f + r * Dp + c), vload(g + r * Dp + c), acc);
                const float x = a->lse[bh * a->q_len + i];
                /* A row that saw nothing has lse -inf and P = 0: use +inf there. */
                lse2[at] = x == -INFINITY ? INFINITY : x * LOG2E;
                delta[at] = vhsum(acc) - (a->d_lse ? a->d_lse[bh * a->q_len + i] : 0.0f);
            }
        }

        /* Under a causal mask the first key tiles meet the most query tiles: they go first.
         * Items are handed out from one counter, so strictly in increasing order (which the
         * wait for dq's turn relies on; OpenMP's dynamic schedule does not promise it). */
        for (int64_t item; (item = __atomic_fetch_add(&next_item, 1, __ATOMIC_RELAXED))
                           < B * Hkv * nk;) {
            const int64_t kj = item / (B * Hkv), bhk = item % (B * Hkv);
            const int64_t b = bhk / Hkv, hk = bhk % Hkv;
            load_tile(f, &a->k, b, hk, kj * BK, BK, a->k_len, D, Dp, dt);
            pack_tile(bf16, f, BK, Dp, k, NULL, NULL, k_tt, tmp);
            load_tile(f, &a->v, b, hk, kj * BK, BK, a->k_len, D, Dp, dt);
            pack_tile(bf16, f, BK, Dp, v, NULL, NULL, NULL, tmp);
            memset(dk, 0, BK * Dp * sizeof(float));
            memset(dv, 0, BK * Dp * sizeof(float));

            for (int64_t h = hk * group; h < (hk + 1) * group; h++) {
                const int64_t bh = b * Hq + h;
                const tile_ctx ctx = {a, b, h, 1};
                for (int64_t qi = 0; qi < nq; qi++) {
                    const int kind = tile_kind(a, b, h, qi, kj);
                    if (kind == TILE_EMPTY) continue;
                    const size_t off = (bh * Tqp + qi * BQ) * Dp;
                    const float *lse_t = lse2 + bh * Tqp + qi * BQ;
                    const float *delta_t = delta + bh * Tqp + qi * BQ;
                    /* On a partial tile, the queries each key is seen by start where the
                     * positional rules say (causal: the diagonal); a minimum from the last row
                     * up keeps the bounds non-decreasing, as gemm wants. Before them P and dS
                     * are 0. */
                    const int64_t *starts = NULL;
                    if (kind == TILE_PARTIAL) {
                        for (int64_t r = BK - 1, start = BQ; r >= 0; r--) {
                            int64_t lo, hi;
                            visible_span(a, b, 1, kj * BK + r, &lo, &hi);
                            lo -= qi * BQ, hi -= qi * BQ;
                            if (hi >= lo && hi >= 0) start = min64(start, max64(lo, 0));
                            w.starts[r] = start;
                        }
                        starts = w.starts;
                    }
                    /* S^T = k q^T, but the columns before each row's bound (not with a softcap,
                     * whose tanh of them the gradient would read), and dP^T = v do^T */
                    gemm(bf16, BK, BQ, Dp, k, Dp, q_tiles + off * es, BQ, st, BQ, 0, NULL,
                         th ? NULL : starts, COLS_FROM);
                    gemm(bf16, BK, BQ, Dp, v, Dp, do_tiles + off * es, BQ, dpt, BQ, 0, NULL, NULL,
                         0);
                    for (int64_t r = 0; r < BK; r++) {
                        float *srow = st + r * BQ, *dprow = dpt + r * BQ;
                        float *trow = th ? th + r * BQ : NULL;
                        if (!plain || kind == TILE_PARTIAL)
                            prepare_row(&ctx, kj * BK + r, qi * BQ, BQ, srow, trow,
                                        kind == TILE_PARTIAL);
                        for (int64_t c = 0; c < BQ; c += VW) {
                            vf p = vexp2(vsub(vmul(vload(srow + c), vset1(mult)),
                                              vload(lse_t + c)));
                            vf ds = vmul(p, vsub(vload(dprow + c), vload(delta_t + c)));
                            if (trow) { /* d(cap tanh(x / cap))/dx = 1 - tanh^2 */
                                vf t = vload(trow + c);
                                ds = vmul(ds, vsub(vset1(1.0f), vmul(t, t)));
                            }
                            ds = vmul(ds, vset1(scale));
                            vstore_as(bf16 ? (void *)(pt16 + r * BQ) : (void *)srow, c, p, bf16);
                            vstore(dprow + c, ds);
                            if (bf16) vstore_as(dst16 + r * BQ, c, ds, 1);
                        }
                        if (bf16 && r % 2)
                            store_bf16_pair(dsv16 + (r - 1) * BQ, dprow - BQ, dprow, BQ);
                    }
                    gemm(bf16, BK, Dp, BQ, bf16 ? (void *)pt16 : (void *)st, BQ,
                         do_rows + off * es, Dp, dv, Dp, 1, NULL, starts, K_FROM);
                    gemm(bf16, BK, Dp, BQ, bf16 ? (void *)dst16 : (void *)dpt, BQ,
                         q_rows + off * es, Dp, dk, Dp, 1, NULL, starts, K_FROM);
                    int64_t *done = &dq_done[bh * nq + qi];
                    wait_for_turn(done, previous_key_tile(a, b, h, qi, kj) + 1);
                    gemm(bf16, Dp, BQ, BK, k_tt, BK, bf16 ? (void *)dsv16 : (void *)dpt, BQ,
                         dq + off, BQ, 1, NULL, NULL, 0);
                    __atomic_store_n(done, kj + 1, __ATOMIC_RELEASE);
                }
            }
            for (int64_t r = 0; r < min64(BK, a->k_len - kj * BK); r++) {
                store_f32(row_of(&a->dk, b, hk, kj * BK + r, io_es), dk + r * Dp, D, dt);
                store_f32(row_of(&a->dv, b, hk, kj * BK + r, io_es), dv + r * Dp, D, dt);
            }
        }

#pragma omp barrier
        /* dq, tile by tile from (Dp, BQ) to (BQ, Dp) */
#pragma omp for schedule(static) nowait /* the region ends with a barrier */
        for (int64_t item = 0; item < B * Hq * nq; item++) {
            const int64_t bh = item / nq, qi = item % nq;
            transpose32((uint32_t *)g, (const uint32_t *)(dq + (bh * Tqp + qi * BQ) * Dp), Dp, BQ);
            for (int64_t r = 0; r < min64(BQ, a->q_len - qi * BQ); r++)
                store_f32(row_of(&a->dq, bh / Hq, bh % Hq, qi * BQ + r, io_es), g + r * Dp, D,
                          dt);
        }
    }
    free(dq_done), free(block);
    return 0;
}

/* -- entry points: 0 on success, -1 when memory ran out -------------------------------------- */

int maskedattn_abi_version(void) { return ABI_VERSION; }

/* The struct's size and the offsets of fields spread across it, checked against the ctypes
 * mirror when the library is loaded: a layout that drifted fails loudly, not silently. */
int64_t maskedattn_args_layout(int64_t i) {
    const int64_t layout[] = {
        sizeof(attn_args), offsetof(attn_args, kinds), offsetof(attn_args, causal),
        offsetof(attn_args, chunk), offsetof(attn_args, dense_sk), offsetof(attn_args, alibi),
        offsetof(attn_args, softcap), offsetof(attn_args, scale), offsetof(attn_args, q),
        offsetof(attn_args, dv), offsetof(attn_args, d_lse),
    };
    return i >= 0 && i < (int64_t)(sizeof layout / sizeof layout[0]) ? layout[i] : -1;
}
int maskedattn_has_bf16(void) { return HAVE_BF16; }

int maskedattn_forward(const attn_args *a) {
    const int bf16 = HAVE_BF16 && a->dtype == DT_BF16 && a->block_q > FEW_ROWS;
    return bf16 ? forward_impl(a, 1) : forward_impl(a, 0);
}

int maskedattn_backward(const attn_args *a) {
    return HAVE_BF16 && a->dtype == DT_BF16 ? backward_impl(a, 1) : backward_impl(a, 0);
}
