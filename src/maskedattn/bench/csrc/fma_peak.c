/* The CPU's float32 multiply-add peak: independent FMA chains that never leave the registers.
 *
 * The attention benchmark reports the kernel's GFLOP/s as a share of this number. Built with
 * the attention kernel's instruction-set flags, so that the peak is that of the vectors the
 * kernel uses (AVX-512: 16 lanes, AVX2: 8). CHAINS independent accumulators cover the FMA
 * latency times the FMA ports (4 cycles x 2 ports needs 8 in flight; more does no harm).
 * acc = acc * a + b converges to b / (1 - a): no overflow, no subnormals to slow it down.
 */
#include <immintrin.h>
#include <stdint.h>

#if defined(__AVX512F__)
#define VW 16
#define CHAINS 16
typedef __m512 vf;
#define vset1(x) _mm512_set1_ps(x)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vstore(p, x) _mm512_storeu_ps(p, x)
#else
#define VW 8
#define CHAINS 12
typedef __m256 vf;
#define vset1(x) _mm256_set1_ps(x)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vstore(p, x) _mm256_storeu_ps(p, x)
#endif

/* Runs `iters` rounds of CHAINS vector FMAs on each of `n_threads` threads; returns the float
 * operations done (2 per lane per FMA). */
double fma_peak_run(int64_t iters, int n_threads) {
    double flops = 0.0;
#pragma omp parallel num_threads(n_threads) reduction(+ : flops)
    {
        vf acc[CHAINS];
        const vf a = vset1(0.999f), b = vset1(1e-3f);
#pragma GCC unroll 16
        for (int j = 0; j < CHAINS; j++) acc[j] = vset1((float)j);
        for (int64_t i = 0; i < iters; i++) {
#pragma GCC unroll 16
            for (int j = 0; j < CHAINS; j++) acc[j] = vfma(acc[j], a, b);
        }
        vf sum = acc[0];
#pragma GCC unroll 16
        for (int j = 1; j < CHAINS; j++) sum = vadd(sum, acc[j]);
        float out[VW];
        vstore(out, sum);
        /* the result is used, so the loop cannot be dropped */
        flops += 2.0 * VW * CHAINS * (double)iters + (out[0] != out[0]);
    }
    return flops;
}
