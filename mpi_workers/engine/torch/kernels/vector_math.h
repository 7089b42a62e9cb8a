/* Vector helpers shared by the kernels: exp from glibc's libmvec (AVX-512 variant, the one
 * GCC itself calls when it vectorizes expf), masked tails. */
#ifndef HPCS_VECTOR_MATH_H
#define HPCS_VECTOR_MATH_H
#include <immintrin.h>
#include <stdint.h>

__m512 _ZGVeN16v_expf(__m512 x);

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* s[i] = exp(s[i] - shift) for i < n; returns the sum of the new values. */
static inline float exp_shifted_sum(float *s, int64_t n, float shift) {
    const __m512 by = _mm512_set1_ps(shift);
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mask = tail_mask(n - i);
        const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + i), by));
        _mm512_mask_storeu_ps(s + i, mask, e);
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, e));
    }
    return _mm512_reduce_add_ps(total);
}
#endif
