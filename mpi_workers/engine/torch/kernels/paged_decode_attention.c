/* Decode attention read straight from the paged KV cache: fp32, AVX-512, one query per row.
 *
 * The PyTorch path first copies every sequence's blocks into a contiguous buffer (two
 * index_selects per layer) and then runs SDPA over the padded batch; here each (sequence,
 * query head) task walks its block table and reads K/V where they lie. Softmax is the plain
 * two-pass one (max, then exp and sum, vectorized) over the scaled scores. Built by kernels/__init__.py.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "vector_math.h"

#define MAX_VECTORS 16 /* head_dim up to 256 */

static inline float dot(const float *a, const float *b, int64_t vectors) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < vectors; i++)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16 * i), _mm512_loadu_ps(b + 16 * i), acc);
    return _mm512_reduce_add_ps(acc);
}

/* q, out: [batch, heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim];
 * tables: [batch, max_blocks]; lens: [batch]; scores: scratch of batch * heads * max_len.
 * Returns -1 (nothing written) for shapes it does not handle. */
int hpcs_paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                                const int64_t *tables, int64_t max_blocks, const int64_t *lens,
                                float *out, float *scores, int64_t batch, int64_t heads,
                                int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                int64_t max_len, float scale, int threads) {
    if (head_dim % 16 || head_dim / 16 > MAX_VECTORS || heads % kv_heads) return -1;
    for (int64_t b = 0; b < batch; b++)
        if (lens[b] < 1 || lens[b] > max_len || lens[b] > max_blocks * block_size) return -1;
    const int64_t group = heads / kv_heads, vectors = head_dim / 16;
    const int64_t row = kv_heads * head_dim; /* floats per cached token */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < batch * heads; task++) {
        const int64_t b = task / heads, h = task % heads, kvh = h / group, len = lens[b];
        const float *query = q + task * head_dim;
        const int64_t *table = tables + b * max_blocks;
        float *s = scores + task * max_len;
        float top = -INFINITY;
        for (int64_t t = 0; t < len; t++) {
            const int64_t slot = table[t / block_size] * block_size + t % block_size;
            s[t] = dot(query, k_cache + slot * row + kvh * head_dim, vectors) * scale;
            top = s[t] > top ? s[t] : top;
        }
        const float total = exp_shifted_sum(s, len, top);
        __m512 acc[MAX_VECTORS];
        for (int64_t i = 0; i < vectors; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t t = 0; t < len; t++) {
            const int64_t slot = table[t / block_size] * block_size + t % block_size;
            const float *value = v_cache + slot * row + kvh * head_dim;
            const __m512 p = _mm512_set1_ps(s[t]);
            for (int64_t i = 0; i < vectors; i++)
                acc[i] = _mm512_fmadd_ps(p, _mm512_loadu_ps(value + 16 * i), acc[i]);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / total);
        for (int64_t i = 0; i < vectors; i++)
            _mm512_storeu_ps(out + task * head_dim + 16 * i, _mm512_mul_ps(acc[i], inv));
    }
    return 0;
}
