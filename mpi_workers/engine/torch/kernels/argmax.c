/* Greedy sampling's argmax over each row of the logits, fp32, AVX-512.
 *
 * torch.argmax over [rows, vocab] on CPU measured ~0.45 ms for 8 x 49152 here (about 1 GB/s);
 * a decode step at batch 8 is ~30 ms, so that was 1.5 % of it. Same answer as torch: the first
 * index of the maximum, or of the first NaN when a row has one. Built by kernels/__init__.py.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "vector_math.h"

static int64_t row_argmax(const float *x, int64_t n) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mask = tail_mask(n - i);
        const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), mask, x + i);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        best = _mm512_max_ps(best, v);
    }
    /* torch: NaN is the maximum (the first one wins); else the first index of the top value */
    const float top = _mm512_reduce_max_ps(best);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mask = tail_mask(n - i);
        const __m512 v = _mm512_maskz_loadu_ps(mask, x + i);
        const __mmask16 hit = nan ? _mm512_mask_cmp_ps_mask(mask, v, v, _CMP_UNORD_Q)
                                  : _mm512_mask_cmp_ps_mask(mask, v, _mm512_set1_ps(top), _CMP_EQ_OQ);
        if (hit) return i + __builtin_ctz(hit);
    }
    return 0; /* unreachable: top is one of the values */
}

void hpcs_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) out[r] = row_argmax(x + r * n, n);
}
