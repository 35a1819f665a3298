/* How close the shim's Expected Attention logits kernel runs to this CPU's FMA peak: one layer of
 * the Llama-3.1-8B shape (32/8 heads, head_dim 128, NORM RoPE pairs, f16 keys) scored per thread,
 * 1, 2, 4, ... threads at once (the shim's pool runs one layer per thread), against a loop of 12
 * independent FMA chains of the same vector width. Built by scripts/kernel_peak.sh, which pastes
 * the kernel out of csrc/llamakv_shim.c (KERNEL_INC) so the numbers are the shim's own code. */
#include <immintrin.h>
#include <omp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>

static int row_to_float(const uint8_t * row, int32_t type, int64_t n, float * out) {  /* f16 only here */
    (void) type;
    for (int64_t j = 0; j + 8 <= n; j += 8)
        _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (row + 2 * j))));
    return 0;
}

#include KERNEL_INC

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static double peak_loop(long iters) {  /* vector FMAs per second: 12 independent chains, distinct values */
    vwf x, y;
    for (int u = 0; u < VW; ++u) { x[u] = 1.0f + 1e-7f; y[u] = 1e-7f; }
    vwf a0 = x, a1 = 2 * x, a2 = 3 * x, a3 = 4 * x, a4 = 5 * x, a5 = 6 * x, a6 = 7 * x, a7 = 8 * x, a8 = 9 * x,
        a9 = 10 * x, a10 = 11 * x, a11 = 12 * x;
    double t = now();
    for (long n = 0; n < iters; ++n) {
        a0 = a0 * x + y; a1 = a1 * x + y; a2 = a2 * x + y; a3 = a3 * x + y; a4 = a4 * x + y; a5 = a5 * x + y;
        a6 = a6 * x + y; a7 = a7 * x + y; a8 = a8 * x + y; a9 = a9 * x + y; a10 = a10 * x + y; a11 = a11 * x + y;
    }
    t = now() - t;
    const vwf s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
    volatile float sink = s[0]; (void) sink;
    return iters * 12.0 / t;
}

int main(int argc, char ** argv) {
    const int64_t n = argc > 1 ? atol(argv[1]) : 32768;
    const int H = 32, Hk = 8, d = 128, P = 64, F = 2 * d + P;
    uint16_t * keys = malloc(n * Hk * d * 2);
    float * m = malloc(H * F * 4), * anchor = malloc(Hk * d * 4);
    srand(1);
    for (int64_t i = 0; i < n * Hk * d; ++i) keys[i] = _cvtss_sh((float) rand() / RAND_MAX - 0.5f, 0);
    for (int i = 0; i < H * F; ++i) m[i] = (float) rand() / RAND_MAX - 0.5f;
    for (int i = 0; i < Hk * d; ++i) anchor[i] = (float) rand() / RAND_MAX - 0.5f;
    const double vfma_layer = (double) n * H * 5 * P / VW;  /* the logits' own vector FMAs, one layer */
    printf("%d lanes, %lld cells, 32/8 heads, head_dim 128: %.1f M vector FMAs per layer\n", VW, (long long) n,
           vfma_layer / 1e6);
    for (int threads = 1; threads <= omp_get_max_threads(); threads *= 2) {
        double peak = 0, best = 1e9, best_kd = 1e9;
        #pragma omp parallel num_threads(threads) reduction(+:peak)
        { peak += peak_loop(50000000L); }
        for (int rep = 0; rep < 3; ++rep)
            for (int with_kd = 0; with_kd < 2; ++with_kd) {
                double t = now();
                #pragma omp parallel num_threads(threads)
                {
                    float * k = malloc(2 * Hk * d * 4), * z = malloc((size_t) H * n * 4), * kd = malloc(Hk * n * 4);
                    ea_logits_fused((const uint8_t *) keys, 1, Hk * d * 2, n, H, Hk, d, m, F, true,
                                    with_kd ? anchor : NULL, with_kd ? kd : NULL, k, z);
                    free(k); free(z); free(kd);
                }
                t = now() - t;
                if (with_kd) best_kd = t < best_kd ? t : best_kd; else best = t < best ? t : best;
            }
        const double rate = threads * vfma_layer / best;
        printf("threads %2d: peak %5.2f G vector FMA/s; one layer per thread %5.1f ms = %5.2f G/s, %3.0f%% of peak; "
               "with KeyDiff's cosines %5.1f ms\n", threads, peak / 1e9, best * 1e3, rate / 1e9, 100 * rate / peak,
               best_kd * 1e3);
    }
    return 0;
}
