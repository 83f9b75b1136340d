/* Grouped 3x3 convolution, stride 1, zero padding 1, float32, channels-last, AVX2 + FMA.
 *
 * x: (B, T, F, C) contiguous (a (B, C, T, F) tensor in channels-last memory), y likewise.
 * C is a multiple of 8; each group has G = 1, 2, 4 or 8 input and output channels.
 * w: packed by mrlcache/backbone/gconv.py as [C / 8][3 * 3 taps][G][8 lanes]: lane j of
 *    vector (c8, tap, k) is the weight from input channel k of output channel c8 * 8 + j's
 *    group to that output channel, at that tap (dt, df) in row-major order.
 * bias: (C,).
 *
 * One 8-lane vector holds 8 / G whole groups. For input index k, every lane needs the k-th
 * input channel of its own group: an in-lane shuffle for G <= 4 (vpermilps), a cross-lane
 * one for G = 8 (vpermps). oneDNN runs these small groups through its general brgemm
 * convolution at 16-24 GFLOP/s on this project's AVX2 CPU (benchmarks/README.md). Zero
 * padding: a tap outside the input reads a vector of zeros.
 */
#include <immintrin.h>
#include <stdint.h>

#define NP 4 /* output pixels (along F) computed together: 2 * NP accumulator chains */

static const float ZEROS[8] __attribute__((aligned(32))) = {0};

static inline __attribute__((always_inline)) __m256 spread(__m256 v, int g, int k)
{
    switch (g) {
    case 1: return v;
    case 2:
        return k == 0 ? _mm256_permute_ps(v, 0xA0) : _mm256_permute_ps(v, 0xF5);
    case 4:
        switch (k) {
        case 0: return _mm256_permute_ps(v, 0x00);
        case 1: return _mm256_permute_ps(v, 0x55);
        case 2: return _mm256_permute_ps(v, 0xAA);
        default: return _mm256_permute_ps(v, 0xFF);
        }
    default:
        return _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(k));
    }
}

/* np output pixels starting at f, channels c8 * 8 .. c8 * 8 + 7, of row (b, t). */
static inline __attribute__((always_inline)) void block(
    const float *x, const float *w, const float *bias, float *y,
    int64_t b, int64_t t, int64_t f, int64_t c8, int64_t T, int64_t F, int64_t C, int g, int np)
{
    __m256 acc[NP][2];
    const __m256 bv = _mm256_loadu_ps(bias + c8 * 8);
    for (int p = 0; p < np; p++) {
        acc[p][0] = bv;
        acc[p][1] = _mm256_setzero_ps();
    }
    for (int dt = 0; dt < 3; dt++) {
        const int64_t tt = t + dt - 1;
        if (tt < 0 || tt >= T)
            continue;
        const float *row = x + ((b * T + tt) * F) * C + c8 * 8;
        for (int df = 0; df < 3; df++) {
            const float *wt = w + ((c8 * 9 + dt * 3 + df) * g) * 8;
            __m256 v[NP];
            for (int p = 0; p < np; p++) {
                const int64_t ff = f + p + df - 1;
                v[p] = _mm256_loadu_ps(ff < 0 || ff >= F ? ZEROS : row + ff * C);
            }
            for (int k = 0; k < g; k++) {
                const __m256 wk = _mm256_loadu_ps(wt + k * 8);
                for (int p = 0; p < np; p++)
                    acc[p][k & 1] = _mm256_fmadd_ps(spread(v[p], g, k), wk, acc[p][k & 1]);
            }
        }
    }
    float *out = y + ((b * T + t) * F + f) * C + c8 * 8;
    for (int p = 0; p < np; p++)
        _mm256_storeu_ps(out + p * C, _mm256_add_ps(acc[p][0], acc[p][1]));
}

/* One function per group size, so that inside OpenMP's outlined loop body the group size
 * is a constant and the shuffles and loops above unroll. */
#define ROWS(G)                                                                          \
    static void rows_##G(const float *x, const float *w, const float *bias, float *y,    \
                         int64_t B, int64_t T, int64_t F, int64_t C, int threads)        \
    {                                                                                    \
        const int64_t nc8 = C / 8;                                                       \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                \
        for (int64_t bt = 0; bt < B * T; bt++) {                                         \
            const int64_t b = bt / T, t = bt % T;                                        \
            for (int64_t c8 = 0; c8 < nc8; c8++) {                                       \
                int64_t f = 0;                                                           \
                for (; f + NP <= F; f += NP)                                             \
                    block(x, w, bias, y, b, t, f, c8, T, F, C, G, NP);                   \
                for (; f < F; f++)                                                       \
                    block(x, w, bias, y, b, t, f, c8, T, F, C, G, 1);                    \
            }                                                                            \
        }                                                                                \
    }
ROWS(1)
ROWS(2)
ROWS(4)
ROWS(8)

/* Returns 0, or -1 for a group size this kernel does not handle. */
int mrl_gconv3x3(const float *x, const float *w, const float *bias, float *y,
                 int64_t B, int64_t T, int64_t F, int64_t C, int g, int threads)
{
    if (C % 8 != 0)
        return -1;
    switch (g) {
    case 1: rows_1(x, w, bias, y, B, T, F, C, threads); return 0;
    case 2: rows_2(x, w, bias, y, B, T, F, C, threads); return 0;
    case 4: rows_4(x, w, bias, y, B, T, F, C, threads); return 0;
    case 8: rows_8(x, w, bias, y, B, T, F, C, threads); return 0;
    default: return -1;
    }
}
