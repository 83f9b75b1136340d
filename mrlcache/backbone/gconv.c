/* Grouped 3x3 convolution, stride 1, zero padding 1, float32, channels-last, AVX2 + FMA.
 *
 * x: (B, T, F, C) contiguous (a (B, C, T, F) tensor in channels-last memory), y likewise.
 * C is a multiple of 8; each group has G = 2 or 4 input and output channels (groups of 1
 * and 8 ran slower here than oneDNN's own kernels, which the inference copy keeps for them).
 * w: packed by mrlcache/backbone/gconv.py as [C / 8][3 * 3 taps][G][8 lanes]: lane j of
 *    vector (c8, tap, k) is the weight from input channel k of output channel c8 * 8 + j's
 *    group to that output channel, at that tap (dt, df) in row-major order.
 * bias: (C,).
 *
 * One 8-lane vector holds 8 / G whole groups. For input index k, every lane needs the k-th
 * input channel of its own group: one in-lane shuffle (vpermilps). oneDNN runs these small groups through its general brgemm
 * convolution at 16-24 GFLOP/s on this project's AVX2 CPU (benchmarks/README.md). Zero
 * padding: a tap outside the input reads a vector of zeros.
 */
#include <immintrin.h>
#include <stdint.h>

#define NP 4 /* output pixels (along F) computed together: 2 * NP accumulator chains */

/* exp(y) for y <= 0: y = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts, Cody and Waite), exp(r)
 * by its Taylor series to r^7 (truncation below 1e-8 relative), times 2^n through the
 * exponent bits. Below -87 the result is 0 (the callers multiply it by numbers below 1). */
static inline __m256 exp_neg(__m256 y)
{
    y = _mm256_max_ps(y, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), y);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* GELU with the exact erf form, x / 2 * (1 + erf(x / sqrt 2)), as torch.nn.GELU() computes it.
 * erf(z) = 1 - t (a1 + a2 t + ... + a5 t^4) exp(-z^2), t = 1 / (1 + p z) for z >= 0, odd in z:
 * Abramowitz and Stegun, Handbook of Mathematical Functions, formula 7.1.26 (|error| <= 1.5e-7). */
static inline __m256 gelu(__m256 x)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
    const __m256 az = _mm256_andnot_ps(sign, z);
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(az, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
    __m256 q = _mm256_set1_ps(1.061405429f);
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-1.453152027f));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(1.421413741f));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-0.284496736f));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(0.254829592f));
    const __m256 tail = _mm256_mul_ps(_mm256_mul_ps(q, t), exp_neg(_mm256_mul_ps(az, _mm256_sub_ps(_mm256_setzero_ps(), az))));
    /* 1 + erf(z) is the tail itself for z < 0 (no cancellation) and 2 - tail for z >= 0 */
    const __m256 neg = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 one_plus_erf = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.0f), tail), tail, neg);
    return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), one_plus_erf);
}

/* GELU over n (a multiple of 8) floats in place: run over a whole output row once it is
 * written (still in L1), many independent vectors overlap their long dependency chains. */
static void gelu_row(float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i += 8)
        _mm256_storeu_ps(y + i, gelu(_mm256_loadu_ps(y + i)));
}

static const float ZEROS[8] __attribute__((aligned(32))) = {0};

static inline __attribute__((always_inline)) __m256 spread(__m256 v, int g, int k)
{
    if (g == 2)
        return k == 0 ? _mm256_permute_ps(v, 0xA0) : _mm256_permute_ps(v, 0xF5);
    switch (k) { /* g == 4 */
    case 0: return _mm256_permute_ps(v, 0x00);
    case 1: return _mm256_permute_ps(v, 0x55);
    case 2: return _mm256_permute_ps(v, 0xAA);
    default: return _mm256_permute_ps(v, 0xFF);
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
    for (int p = 0; p < np; p++) {
        const __m256 v = _mm256_add_ps(acc[p][0], acc[p][1]);
        _mm256_storeu_ps(out + p * C, v);
    }
}

/* One function per group size, so that inside OpenMP's outlined loop body the group size
 * is a constant and the shuffles and loops above unroll. */
#define ROWS(G)                                                                          \
    static void rows_##G(const float *x, const float *w, const float *bias, float *y,    \
                         int64_t B, int64_t T, int64_t F, int64_t C, int act, int threads) \
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
            if (act)                                                                     \
                gelu_row(y + bt * F * C, F * C);                                          \
        }                                                                                \
    }
ROWS(2)
ROWS(4)

/* act: 0 none, 1 GELU (exact form) on the output. Returns 0, or -1 for a group size or channel
 * count this kernel does not handle. */
int mrl_gconv3x3(const float *x, const float *w, const float *bias, float *y,
                 int64_t B, int64_t T, int64_t F, int64_t C, int g, int act, int threads)
{
    if (C % 8 != 0)
        return -1;
    switch (g) {
    case 2: rows_2(x, w, bias, y, B, T, F, C, act, threads); return 0;
    case 4: rows_4(x, w, bias, y, B, T, F, C, act, threads); return 0;
    default: return -1;
    }
}
