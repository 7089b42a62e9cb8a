/* Every decoder layer of a decode step (fp32, any batch the caller allows) in one call.
 *
 * A decode step in PyTorch is ~100 small ops per layer (norms, RoPE, KV writes, attention,
 * SiLU, residuals) around four matmuls; at these sizes their dispatch costs more than their
 * arithmetic. Here a layer is: RMSNorm -> QKV (skinny GEMM) -> RoPE -> KV write -> paged
 * attention -> O -> residual -> RMSNorm -> gate/up -> SiLU * up -> down -> residual, each step
 * written the way HF's Llama computes it (fp32 RMSNorm as x * rsqrt(mean(x^2) + eps) then
 * weight *, rotate-half RoPE with a signed sin table, silu(g) = g / (1 + exp(-g))); the files are
 * built with -ffp-contract=off so no multiply-add is fused behind our back.
 * Built by kernels/__init__.py with skinny_gemm.c and paged_decode_attention.c.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "vector_math.h"

int hpcs_skinny_gemm(const float *x, const float *packed, float *y, int64_t m, int64_t n,
                     int64_t k, int threads);
int hpcs_paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                                const int64_t *tables, int64_t max_blocks, const int64_t *lens,
                                float *out, float *scores, int64_t batch, int64_t heads,
                                int64_t kv_heads, int64_t head_dim, int64_t block_size,
                                int64_t max_len, float scale, int threads);

/* One layer's weights: packed linears (skinny_gemm.c layout), optional biases (NULL: none). */
typedef struct {
    const float *input_norm, *post_norm;
    const float *qkv, *qkv_bias, *o, *gate_up, *gate_up_bias, *down, *down_bias;
    float *k_cache, *v_cache; /* [blocks, block_size, kv_heads, head_dim] */
} hpcs_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, block_size;
    int64_t num_blocks, max_positions; /* bounds of the cache and of the RoPE tables */
    float eps, scale;
} hpcs_shape;

static void rms_norm(const float *h, const float *weight, float *out, int64_t m, int64_t hidden,
                     float eps) {
    for (int64_t r = 0; r < m; r++) {
        const float *x = h + r * hidden;
        float sum = 0.0f;
        for (int64_t i = 0; i < hidden; i++) sum += x[i] * x[i];
        const float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
        for (int64_t i = 0; i < hidden; i++) out[r * hidden + i] = weight[i] * (x[i] * inv);
    }
}

static void add_bias(float *y, const float *bias, int64_t m, int64_t n) {
    if (!bias) return;
    for (int64_t r = 0; r < m; r++)
        for (int64_t i = 0; i < n; i++) y[r * n + i] += bias[i];
}

/* In place on heads [count, head_dim] of one row: x * cos + swap_halves(x) * sin_signed. */
static void rope(float *x, int64_t count, int64_t head_dim, const float *cos,
                 const float *sin_signed) {
    const int64_t half = head_dim / 2;
    float rotated[256];
    for (int64_t h = 0; h < count; h++) {
        float *v = x + h * head_dim;
        for (int64_t i = 0; i < head_dim; i++) {
            const float swapped = i < half ? v[i + half] : v[i - half];
            rotated[i] = swapped * sin_signed[i] + v[i] * cos[i];
        }
        for (int64_t i = 0; i < head_dim; i++) v[i] = rotated[i];
    }
}

/* act[r, i] = silu(gate[r, i]) * up[r, i], gate_up rows being [gate | up]. */
static void silu_times_up(const float *gate_up, float *act, int64_t m, int64_t inter,
                          int threads) {
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    const int64_t chunks = (inter + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < m * chunks; j++) {
        const int64_t r = j / chunks, i = (j % chunks) * 16;
        const __mmask16 mask = tail_mask(inter - i);
        const float *gate = gate_up + r * 2 * inter + i;
        const __m512 g = _mm512_maskz_loadu_ps(mask, gate);
        const __m512 u = _mm512_maskz_loadu_ps(mask, gate + inter);
        const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(zero, g));
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(act + r * inter + i, mask, _mm512_mul_ps(silu, u));
    }
}

/* Floats of scratch hpcs_decode_layers needs for m rows and max_len context tokens. */
int64_t hpcs_decode_scratch_floats(const hpcs_shape *s, int64_t m, int64_t max_len) {
    const int64_t qkv = (s->heads + 2 * s->kv_heads) * s->head_dim;
    return m * s->hidden * 2 + m * qkv + 2 * m * s->heads * s->head_dim +
           m * 2 * s->intermediate + m * s->intermediate + m * s->heads * max_len;
}

/* h [m, hidden] is the residual stream, updated in place through every layer (the caller
 * applies the final norm). Returns -1, having touched nothing, for shapes it does not handle;
 * past those checks the calls below cannot fail. */
int hpcs_decode_layers(const hpcs_layer *layers, int64_t num_layers, const hpcs_shape *s,
                       float *h, int64_t m, const float *cos_table, const float *sin_table,
                       const int64_t *positions, const int64_t *slots, const int64_t *tables,
                       int64_t max_blocks, const int64_t *lens, float *scratch, int threads) {
    const int64_t hidden = s->hidden, head_dim = s->head_dim, inter = s->intermediate;
    const int64_t q_width = s->heads * head_dim, kv_width = s->kv_heads * head_dim;
    const int64_t qkv_width = q_width + 2 * kv_width;
    const int64_t max_len = max_blocks * s->block_size;
    if (m < 1 || head_dim > 256 || head_dim % 16 || s->heads % s->kv_heads) return -1;
    const int64_t slots_in_cache = s->num_blocks * s->block_size;
    for (int64_t r = 0; r < m; r++) {
        if (lens[r] < 1 || lens[r] > max_len) return -1;
        if (positions[r] < 0 || positions[r] >= s->max_positions) return -1;
        if (slots[r] < 0 || slots[r] >= slots_in_cache) return -1;
        for (int64_t b = 0; b < (lens[r] + s->block_size - 1) / s->block_size; b++)
            if (tables[r * max_blocks + b] < 0 || tables[r * max_blocks + b] >= s->num_blocks)
                return -1;
    }
    float *x = scratch;                       /* [m, hidden] normed input */
    float *delta = x + m * hidden;            /* [m, hidden] a sublayer's output */
    float *qkv = delta + m * hidden;          /* [m, qkv_width] */
    float *q = qkv + m * qkv_width;           /* [m, heads * head_dim] queries, compacted */
    float *attn = q + m * q_width;            /* [m, heads * head_dim] */
    float *gate_up = attn + m * q_width;      /* [m, 2 * inter] */
    float *act = gate_up + m * 2 * inter;     /* [m, inter] */
    float *scores = act + m * inter;          /* [m * heads * max_len] */
    for (int64_t l = 0; l < num_layers; l++) {
        const hpcs_layer *layer = &layers[l];
        rms_norm(h, layer->input_norm, x, m, hidden, s->eps);
        hpcs_skinny_gemm(x, layer->qkv, qkv, m, qkv_width, hidden, threads);
        add_bias(qkv, layer->qkv_bias, m, qkv_width);
        for (int64_t r = 0; r < m; r++) {
            float *row = qkv + r * qkv_width;
            const float *c = cos_table + positions[r] * head_dim;
            const float *sn = sin_table + positions[r] * head_dim;
            rope(row, s->heads + s->kv_heads, head_dim, c, sn); /* q heads, then k heads */
            float *k_slot = layer->k_cache + slots[r] * kv_width;
            float *v_slot = layer->v_cache + slots[r] * kv_width;
            for (int64_t i = 0; i < kv_width; i++) {
                k_slot[i] = row[q_width + i];
                v_slot[i] = row[q_width + kv_width + i];
            }
        }
        /* q rows are strided inside qkv: attention takes them compacted */
        for (int64_t r = 0; r < m; r++)
            for (int64_t i = 0; i < q_width; i++) q[r * q_width + i] = qkv[r * qkv_width + i];
        hpcs_paged_decode_attention(q, layer->k_cache, layer->v_cache, tables, max_blocks, lens,
                                    attn, scores, m, s->heads, s->kv_heads, head_dim,
                                    s->block_size, max_len, s->scale, threads);
        hpcs_skinny_gemm(attn, layer->o, delta, m, hidden, q_width, threads);
        for (int64_t i = 0; i < m * hidden; i++) h[i] = h[i] + delta[i];
        rms_norm(h, layer->post_norm, x, m, hidden, s->eps);
        hpcs_skinny_gemm(x, layer->gate_up, gate_up, m, 2 * inter, hidden, threads);
        add_bias(gate_up, layer->gate_up_bias, m, 2 * inter);
        silu_times_up(gate_up, act, m, inter, threads);
        hpcs_skinny_gemm(act, layer->down, delta, m, hidden, inter, threads);
        add_bias(delta, layer->down_bias, m, hidden);
        for (int64_t i = 0; i < m * hidden; i++) h[i] = h[i] + delta[i];
    }
    return 0;
}
