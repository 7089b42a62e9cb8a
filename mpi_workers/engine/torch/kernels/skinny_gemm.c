/* y[m, n] = x[m, k] @ W^T for a few rows (a decode step's batch), fp32, AVX-512.
 *
 * A decode step multiplies a few rows by every weight, so its cost is streaming the weights.
 * W is packed once into groups of 32 output columns stored k-major ([group][k][32]), so each
 * group is one sequential stream; each 32-column slice is loaded once and multiplied into all
 * rows (16 accumulator registers), with a software prefetch running PREFETCH_BYTES ahead.
 * Each output is a plain left-to-right sum over k. Built by kernels/__init__.py.
 */
#include <immintrin.h>
#include <stdint.h>

#define GROUP 32
#define PREFETCH_BYTES 4096

/* W [n, k] row-major -> out [ceil(n / 32)][k][32], columns past n zero. */
void hpcs_pack_weight(const float *w, float *out, int64_t n, int64_t k) {
    int64_t groups = (n + GROUP - 1) / GROUP;
    for (int64_t g = 0; g < groups; g++)
        for (int64_t kk = 0; kk < k; kk++)
            for (int64_t j = 0; j < GROUP; j++) {
                int64_t col = g * GROUP + j;
                out[(g * k + kk) * GROUP + j] = col < n ? w[col * k + kk] : 0.0f;
            }
}

#define DECLARE(r) __m512 lo##r = _mm512_setzero_ps(), hi##r = _mm512_setzero_ps();
#define MULTIPLY(r)                                                   \
    if (rows > r) {                                                   \
        __m512 xr = _mm512_set1_ps(x[r * k + kk]);                   \
        lo##r = _mm512_fmadd_ps(xr, w_lo, lo##r);                     \
        hi##r = _mm512_fmadd_ps(xr, w_hi, hi##r);                     \
    }
#define STORE(r)                                                      \
    if (rows > r) {                                                   \
        _mm512_mask_storeu_ps(y + r * n + col, mask_lo, lo##r);       \
        _mm512_mask_storeu_ps(y + r * n + col + 16, mask_hi, hi##r);  \
    }

/* One 32-column group for ROWS rows of x (each x row stays in L1 across the group). */
#define GROUP_KERNEL(ROWS)                                                                  \
    static void group_##ROWS(const float *x,  const float *wg, float *y, int64_t n,          \
                             int64_t k, int64_t col) {                                       \
        const int rows = ROWS;                                                               \
        DECLARE(0) DECLARE(1) DECLARE(2) DECLARE(3)                                          \
        DECLARE(4) DECLARE(5) DECLARE(6) DECLARE(7)                                          \
        for (int64_t kk = 0; kk < k; kk++) {                                                 \
            const float *wk = wg + kk * GROUP;                                               \
            _mm_prefetch((const char *)wk + PREFETCH_BYTES, _MM_HINT_T0);                    \
            _mm_prefetch((const char *)wk + PREFETCH_BYTES + 64, _MM_HINT_T0);               \
            __m512 w_lo = _mm512_loadu_ps(wk), w_hi = _mm512_loadu_ps(wk + 16);              \
            MULTIPLY(0) MULTIPLY(1) MULTIPLY(2) MULTIPLY(3)                                  \
            MULTIPLY(4) MULTIPLY(5) MULTIPLY(6) MULTIPLY(7)                                  \
        }                                                                                    \
        int64_t left = n - col;                                                              \
        __mmask16 mask_lo = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);             \
        __mmask16 mask_hi = left >= 32   ? 0xFFFF                                            \
                            : left <= 16 ? 0                                                 \
                                         : (__mmask16)((1u << (left - 16)) - 1);             \
        STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5) STORE(6) STORE(7)              \
    }
GROUP_KERNEL(1) GROUP_KERNEL(2) GROUP_KERNEL(3) GROUP_KERNEL(4)
GROUP_KERNEL(5) GROUP_KERNEL(6) GROUP_KERNEL(7) GROUP_KERNEL(8)

typedef void (*group_fn)(const float *, const float *, float *, int64_t, int64_t, int64_t);
static const group_fn GROUP_FOR_ROWS[9] = {0,       group_1, group_2, group_3, group_4,
                                           group_5, group_6, group_7, group_8};

/* threads: the caller's torch thread count (the same OpenMP pool as torch's). More than 8
 * rows go 8 at a time over each group while it is still in L2: the weights still stream once. */
int hpcs_skinny_gemm(const float *x, const float *packed, float *y, int64_t m, int64_t n,
                     int64_t k, int threads) {
    if (m < 1) return -1;
    int64_t groups = (n + GROUP - 1) / GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < groups; g++)
        for (int64_t r = 0; r < m; r += 8) {
            const int64_t rows = m - r < 8 ? m - r : 8;
            GROUP_FOR_ROWS[rows](x + r * k, packed + g * k * GROUP, y + r * n, n, k, g * GROUP);
        }
    return 0;
}
