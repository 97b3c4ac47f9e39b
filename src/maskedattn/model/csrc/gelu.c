/* GELU and its gradient over a contiguous float32 or bfloat16 array, both forms:
 *
 *   exact (erf):  y = x Phi(x),      Phi(x) = (1 + erf(x / sqrt 2)) / 2
 *   tanh:         y = x s(2u),       u = sqrt(2/pi) (x + 0.044715 x^3), s the logistic function
 *                                    (x s(2u) is x (1 + tanh u) / 2, GPT-2's form, rewritten)
 *
 * torch's CPU kernels evaluate erf (or tanh) and, in the backward, a second exponential for
 * the density; here one exponential serves both: erf by Abramowitz & Stegun 7.1.26 (absolute
 * error 1.5e-7, the formula torch's vectorised erf uses too) needs exp(-x^2/2), which is also
 * the normal density's. Every step is computed in float32; bfloat16 is read widened and
 * rounded to nearest even on the way out, as torch rounds.
 *
 * Vectors of VW floats: AVX-512 where the CPU has it, else AVX2 + FMA (the macros below).
 * Each element gets the same instruction sequence wherever it falls (tails are padded to a
 * whole vector), so results do not depend on the thread count.
 * No PyTorch headers: Python passes pointers to contiguous tensors (maskedattn/model/gelu.py).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
typedef __mmask16 vm;
typedef __m512i vi;
#define vset1(x) _mm512_set1_ps(x)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vsub(a, b) _mm512_sub_ps(a, b)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vdiv(a, b) _mm512_div_ps(a, b)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vabs(a) _mm512_abs_ps(a)
#define vmax(a, b) _mm512_max_ps(a, b)
#define vmin(a, b) _mm512_min_ps(a, b)
#define vlt(a, b) _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ)
#define vsel(m, yes, no) _mm512_mask_blend_ps(m, no, yes)
#define vround(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vscale2(p, n) _mm512_scalef_ps(p, n) /* p 2^n, to 0 or inf where it leaves the range */
#define vload_f32(p) _mm512_loadu_ps(p)
#define vstore_f32(p, x) _mm512_storeu_ps(p, x)
#define vload_bf16(p) _mm512_castsi512_ps(_mm512_slli_epi32( \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define ibits(x) _mm512_castps_si512(x)
#define iset1(x) _mm512_set1_epi32(x)
#define iadd(a, b) _mm512_add_epi32(a, b)
#define iand(a, b) _mm512_and_si512(a, b)
#define isrl(a, n) _mm512_srli_epi32(a, n)
#define ior(a, b) _mm512_or_si512(a, b)
#define igt_sel(a, b, yes, no) _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(a, b), no, yes)
#define istore_u16(p, x) _mm256_storeu_si256((__m256i *)(p), _mm512_cvtepi32_epi16(x))
#else
#define VW 8
typedef __m256 vf;
typedef __m256 vm;
typedef __m256i vi;
#define vset1(x) _mm256_set1_ps(x)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vdiv(a, b) _mm256_div_ps(a, b)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vabs(a) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a)
#define vmax(a, b) _mm256_max_ps(a, b)
#define vmin(a, b) _mm256_min_ps(a, b)
#define vlt(a, b) _mm256_cmp_ps(a, b, _CMP_LT_OQ)
#define vsel(m, yes, no) _mm256_blendv_ps(no, yes, m)
#define vround(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
/* p 2^n for integral |n| <= 200 in two factors, each a normal float: 0 or inf past the range */
static inline __attribute__((always_inline)) vf vscale2(vf p, vf n) {
    vf half = vround(vmul(n, vset1(0.5f)));
    __m256i a = _mm256_cvtps_epi32(half), b = _mm256_cvtps_epi32(vsub(n, half));
    vf fa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(127)), 23));
    vf fb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(127)), 23));
    return vmul(vmul(p, fa), fb);
}
#define vload_f32(p) _mm256_loadu_ps(p)
#define vstore_f32(p, x) _mm256_storeu_ps(p, x)
#define vload_bf16(p) _mm256_castsi256_ps(_mm256_slli_epi32( \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define ibits(x) _mm256_castps_si256(x)
#define iset1(x) _mm256_set1_epi32(x)
#define iadd(a, b) _mm256_add_epi32(a, b)
#define iand(a, b) _mm256_and_si256(a, b)
#define isrl(a, n) _mm256_srli_epi32(a, n)
#define ior(a, b) _mm256_or_si256(a, b)
#define igt_sel(a, b, yes, no) _mm256_blendv_epi8(no, yes, _mm256_cmpgt_epi32(a, b))
/* values below 2^16: packus keeps them; it packs within 128-bit lanes, the permute joins them */
#define istore_u16(p, x) _mm_storeu_si128((__m128i *)(p), _mm256_castsi256_si128( \
    _mm256_permute4x64_epi64(_mm256_packus_epi32(x, x), 0xd8)))
#endif

enum { DT_F32 = 0, DT_BF16 = 1 };
#define CHUNK 16384 /* elements per task: 64 KiB of float32, a share of the L2 */

INLINE vf load(const void *p, int64_t i, int dtype) {
    return dtype == DT_F32 ? vload_f32((const float *)p + i)
                           : vload_bf16((const uint16_t *)p + i); /* a float32's top half */
}

/* float32, or bfloat16 rounded to nearest even (NaN kept quiet), as torch rounds. */
INLINE void store(void *p, int64_t i, vf v, int dtype) {
    if (dtype == DT_F32) {
        vstore_f32((float *)p + i, v);
        return;
    }
#if defined(__AVX512BF16__)
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), (__m256i)_mm512_cvtneps_pbh(v));
#else
    vi u = ibits(v);
    vi rounded = isrl(iadd(u, iadd(iset1(0x7fff), iand(isrl(u, 16), iset1(1)))), 16);
    vi quiet = ior(isrl(u, 16), iset1(0x40));
    istore_u16((uint16_t *)p + i,
               igt_sel(iand(u, iset1(0x7fffffff)), iset1(0x7f800000), quiet, rounded));
#endif
}

/* 2^w: 2^round(w) times a polynomial in the fraction (relative error ~1e-7), 0 and inf past
 * float's range. vmax and vmin return their second operand for a NaN: NaN stays NaN. */
INLINE vf exp2v(vf w) {
    w = vmin(vset1(200.0f), vmax(vset1(-200.0f), w));
    vf n = vround(w);
    vf f = vsub(w, n); /* in [-1/2, 1/2] */
    vf p = vset1(1.5403530e-4f); /* Taylor: ln(2)^k / k! */
    p = vfma(p, f, vset1(1.3333558e-3f));
    p = vfma(p, f, vset1(9.6181291e-3f));
    p = vfma(p, f, vset1(5.5504109e-2f));
    p = vfma(p, f, vset1(2.4022651e-1f));
    p = vfma(p, f, vset1(6.9314718e-1f));
    p = vfma(p, f, vset1(1.0f));
    return vscale2(p, n);
}

#define LOG2E 1.4426950408889634f

/* Phi(x) and the normal density phi(x), from one exponential. */
INLINE void normal(vf x, vf *cdf, vf *pdf) {
    vf e = exp2v(vmul(vmul(x, x), vset1(-0.5f * LOG2E))); /* exp(-x^2 / 2) */
    vf z = vmul(vabs(x), vset1(0.70710678118654752f));
    vf t = vdiv(vset1(1.0f), vfma(vset1(0.3275911f), z, vset1(1.0f)));
    vf r = vset1(1.061405429f);
    r = vfma(r, t, vset1(-1.453152027f));
    r = vfma(r, t, vset1(1.421413741f));
    r = vfma(r, t, vset1(-0.284496736f));
    r = vfma(r, t, vset1(0.254829592f));
    vf tail = vmul(vmul(r, t), vmul(e, vset1(0.5f))); /* (1 - erf z) / 2 = Phi(-|x|) */
    *cdf = vsel(vlt(x, vset1(0.0f)), tail, vsub(vset1(1.0f), tail));
    *pdf = vmul(e, vset1(0.39894228040143268f));
}

#define SQRT_2_OVER_PI 0.79788456080286536f
#define CUBIC 0.044715f

/* s(2u) of GPT-2's tanh form. */
INLINE vf logistic_2u(vf x) {
    vf x2 = vmul(x, x);
    vf u = vmul(vmul(x, vfma(x2, vset1(CUBIC), vset1(1.0f))), vset1(SQRT_2_OVER_PI));
    return vdiv(vset1(1.0f), vadd(vset1(1.0f), exp2v(vmul(u, vset1(-2.0f * LOG2E)))));
}

INLINE vf forward(vf x, int tanh_form) {
    if (tanh_form) return vmul(x, logistic_2u(x));
    vf cdf, pdf;
    normal(x, &cdf, &pdf);
    return vmul(x, cdf);
}

/* d/dx of x s(2u) is s + x s (1 - s) 2 du/dx; of x Phi(x), Phi + x phi. */
INLINE vf derivative(vf x, int tanh_form) {
    if (tanh_form) {
        vf s = logistic_2u(x);
        vf du2 = vmul(vfma(vmul(x, x), vset1(3.0f * CUBIC), vset1(1.0f)),
                      vset1(2.0f * SQRT_2_OVER_PI));
        return vfma(vmul(vmul(x, s), vsub(vset1(1.0f), s)), du2, s);
    }
    vf cdf, pdf;
    normal(x, &cdf, &pdf);
    return vfma(x, pdf, cdf);
}

/* One vector at element i of y = gelu(x), or (backward) of dx = dy * gelu'(x). */
INLINE vf one(const void *dy, const void *x, int64_t i, int dtype, int tanh_form, int backward) {
    vf v = load(x, i, dtype);
    return backward ? vmul(load(dy, i, dtype), derivative(v, tanh_form)) : forward(v, tanh_form);
}

/* Elements [lo, hi). Called with constant dtype, form and direction, so each variant compiles
 * to its own straight loop. */
INLINE void run(const void *dy, const void *x, void *out, int64_t lo, int64_t hi, int dtype,
                int tanh_form, int backward) {
    int64_t i = lo;
    for (; i + VW <= hi; i += VW) store(out, i, one(dy, x, i, dtype, tanh_form, backward), dtype);
    if (i == hi) return;
    /* The tail through one padded vector, so it is computed exactly as the body is. */
    size_t es = dtype == DT_F32 ? 4 : 2, n = (size_t)(hi - i);
    _Alignas(64) unsigned char bx[VW * 4] = {0}, bdy[VW * 4] = {0}, bout[VW * 4];
    memcpy(bx, (const char *)x + i * es, n * es);
    if (backward) memcpy(bdy, (const char *)dy + i * es, n * es);
    store(bout, 0, one(bdy, bx, 0, dtype, tanh_form, backward), dtype);
    memcpy((char *)out + i * es, bout, n * es);
}

typedef void (*chunk_fn)(const void *dy, const void *x, void *out, int64_t lo, int64_t hi);

#define VARIANT(NAME, DTYPE, TANH, BACKWARD)                                                   \
    static void NAME(const void *dy, const void *x, void *out, int64_t lo, int64_t hi) {       \
        run(dy, x, out, lo, hi, DTYPE, TANH, BACKWARD);                                        \
    }
VARIANT(fwd_f32_erf, DT_F32, 0, 0)
VARIANT(fwd_f32_tanh, DT_F32, 1, 0)
VARIANT(fwd_bf16_erf, DT_BF16, 0, 0)
VARIANT(fwd_bf16_tanh, DT_BF16, 1, 0)
VARIANT(bwd_f32_erf, DT_F32, 0, 1)
VARIANT(bwd_f32_tanh, DT_F32, 1, 1)
VARIANT(bwd_bf16_erf, DT_BF16, 0, 1)
VARIANT(bwd_bf16_tanh, DT_BF16, 1, 1)
static const chunk_fn VARIANTS[2][2][2] = { /* [backward][dtype][tanh_form] */
    {{fwd_f32_erf, fwd_f32_tanh}, {fwd_bf16_erf, fwd_bf16_tanh}},
    {{bwd_f32_erf, bwd_f32_tanh}, {bwd_bf16_erf, bwd_bf16_tanh}},
};

static void run_all(const void *dy, const void *x, void *out, int64_t n, int dtype,
                    int tanh_form, int threads) {
    chunk_fn fn = VARIANTS[dy != NULL][dtype == DT_BF16][tanh_form != 0];
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    if (threads > chunks) threads = (int)chunks;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t lo = c * CHUNK, hi = lo + CHUNK < n ? lo + CHUNK : n;
        fn(dy, x, out, lo, hi);
    }
}

/* Floats per vector: 16 with AVX-512, 8 with AVX2 (where torch's exact form is the faster). */
int gelu_lanes(void) { return VW; }

/* y = gelu(x) over n elements of dtype (DT_*); tanh_form: GPT-2's approximation. */
void gelu_forward(const void *x, void *y, int64_t n, int dtype, int tanh_form, int threads) {
    run_all(NULL, x, y, n, dtype, tanh_form, threads);
}

/* dx = dy * gelu'(x) over n elements, all three of dtype. */
void gelu_backward(const void *dy, const void *x, void *dx, int64_t n, int dtype,
                   int tanh_form, int threads) {
    run_all(dy, x, dx, n, dtype, tanh_form, threads);
}
