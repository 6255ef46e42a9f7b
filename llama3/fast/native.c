/* One Llama decoding step in C: one new token per sequence of a batch, a KV cache.  See native.py.
 *
 * The same arithmetic as `decode_step` in decode.py, written out as loops, so that the
 * ~25 small tensor operations around each block's four matrix-vector products cost
 * nanoseconds instead of the microseconds each PyTorch call takes from Python.  The whole
 * step runs inside one OpenMP parallel region: the matrix-vector products split their rows
 * between the threads, the small serial parts (norms, RoPE, residual adds) run on one.
 *
 * Activations are float32 throughout.  Weights stay in the layout the Python side already
 * holds them in (nothing is copied):
 *
 *   F32   [N, K] float32
 *   BF16  [N, K] bfloat16 (the upper half of a float32)
 *   INT8  [N, K] int8 with a float32 scale per row:        w = scale[n] * q
 *   INT4  PyTorch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`, N % 64 == 0):
 *         bytes [N/64, K, 32]; byte d of (block b, column k) holds the 4-bit value of
 *         row 64b + d (low half) and row 64b + d + 32 (high half); bfloat16 scale and
 *         zero per 32 columns, [K/32, N, 2]:                 w = (q - 8) * scale + zero
 *
 * Compiled at first use with the machine's C compiler (`-O3 -march=native -fopenmp`):
 * AVX-512 intrinsics for the matrix-vector products where the CPU has them, plain loops
 * the compiler vectorises elsewhere (and for everything else).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, INT8 = 2, INT4 = 3 };

typedef struct {
    int kind, n, k;         /* y[n] = sum_k W[n, k] x[k];  W: n rows of k */
    const void *w;
    const void *scales;     /* INT8: float32 [N]; INT4: bfloat16 [K/32, N, 2]; otherwise unused */
} Matrix;

typedef struct {
    const float *attention_norm, *ffn_norm;   /* [D] */
    Matrix wqkv, wo, w13, w2;                 /* [(H + 2 Hkv) Dh, D], [D, H Dh], [2F, D], [D, F] */
} Layer;

typedef struct {
    int dim, n_layers, n_heads, n_kv_heads, head_dim, hidden, vocab, threads;
    float eps;
    const Layer *layers;
    const float *norm;                        /* [D] */
    Matrix head;                              /* [V, D] */
} Model;

typedef struct {                              /* scratch for B rows, allocated by the caller */
    float *xb;       /* [B, D] normed input */
    float *att;      /* [B, H Dh] attention output */
    float *qkv;      /* [B, (H + 2 Hkv) Dh] */
    float *proj;     /* [B, D] output of wo and w2 */
    float *gate_up;  /* [B, 2F] */
    float *hidden;   /* [B, F] silu(gate) * up */
    float *scores;   /* [H, max_len] (one row's attention at a time) */
} Scratch;

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {   /* round to nearest even, as PyTorch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* ---------------------------------------------------------------- matrix-vector products */
/* Each is called by every thread of the parallel region; `omp for` splits the rows of W.
 * x [B, K] -> y [B, N]: B input rows (one per sequence of a batch, usually 1), each block of
 * weight rows read from memory once and used for all B while it sits in the L1 cache. */

/* Two versions of each: plain loops any C compiler vectorises somewhat, and AVX-512
 * intrinsics that keep 4 rows' partial sums in registers and read each piece of x once
 * for them (~2x faster here, where the plain loops are limited by converting weights,
 * not by memory).  -DLLAMA3_PLAIN_C builds the plain ones on any CPU (the tests run both). */
#if defined(__AVX512F__) && !defined(LLAMA3_PLAIN_C)
#include <immintrin.h>
#define SIMD 1
#else
#define SIMD 0
#endif

#if SIMD
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 load16_int8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* 4 rows at a time, 16 columns per step; K % 16 == 0 (checked on the Python side).  While
 * working on 4 rows it asks for the next 4 rows' cache lines: the hardware prefetcher alone
 * left bf16 and int8 at about half the bandwidth float32 reached (measured on 3072 x 576). */
#define SIMD_ROWS(NAME, WTYPE, LOAD16)                                                            \
static void NAME(const Matrix *m, const float *xs, float *ys, int batch) {                        \
    const WTYPE *w = (const WTYPE *)m->w;                                                         \
    const int K = m->k, N = m->n;                                                                 \
    const float *scale = m->kind == INT8 ? (const float *)m->scales : NULL;                       \
    _Pragma("omp for schedule(static)")                                                           \
    for (int n0 = 0; n0 < N; n0 += 4) {                                                           \
        const int rows = N - n0 < 4 ? N - n0 : 4;                                                 \
        const WTYPE *r0 = w + (size_t)n0 * K;                                                     \
        const WTYPE *r1 = r0 + (rows > 1 ? K : 0), *r2 = r0 + (rows > 2 ? 2 * K : 0),             \
                    *r3 = r0 + (rows > 3 ? 3 * K : 0);                                            \
        for (int b = 0; b < batch; b++) {                                                         \
            const float *x = xs + (size_t)b * K;                                                  \
            float *y = ys + (size_t)b * N;                                                        \
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                           \
            for (int k = 0; k < K; k += 16) {                                                     \
                const __m512 xv = _mm512_loadu_ps(x + k);                                         \
                if (b == 0 && (k * sizeof(WTYPE)) % 64 == 0) {                                    \
                    _mm_prefetch((const char *)(r0 + 4 * (size_t)K + k), _MM_HINT_T0);            \
                    _mm_prefetch((const char *)(r1 + 4 * (size_t)K + k), _MM_HINT_T0);            \
                    _mm_prefetch((const char *)(r2 + 4 * (size_t)K + k), _MM_HINT_T0);            \
                    _mm_prefetch((const char *)(r3 + 4 * (size_t)K + k), _MM_HINT_T0);            \
                }                                                                                 \
                a0 = _mm512_fmadd_ps(LOAD16(r0 + k), xv, a0);                                     \
                a1 = _mm512_fmadd_ps(LOAD16(r1 + k), xv, a1);                                     \
                a2 = _mm512_fmadd_ps(LOAD16(r2 + k), xv, a2);                                     \
                a3 = _mm512_fmadd_ps(LOAD16(r3 + k), xv, a3);                                     \
            }                                                                                     \
            const float sums[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1),            \
                                   _mm512_reduce_add_ps(a2), _mm512_reduce_add_ps(a3)};           \
            for (int r = 0; r < rows; r++) y[n0 + r] = scale ? sums[r] * scale[n0 + r] : sums[r]; \
        }                                                                                         \
    }                                                                                             \
}
SIMD_ROWS(matvec_f32, float, load16_f32)
SIMD_ROWS(matvec_bf16, uint16_t, load16_bf16)
SIMD_ROWS(matvec_int8, int8_t, load16_int8)

#else
static inline float as_float(float v) { return v; }
static inline float int8_to_f32(int8_t v) { return (float)v; }

/* One row at a time; the compiler vectorises the inner loop. */
#define PLAIN_ROWS(NAME, WTYPE, WIDEN)                                                    \
static void NAME(const Matrix *m, const float *xs, float *ys, int batch) {               \
    const WTYPE *w = (const WTYPE *)m->w;                                                 \
    const int K = m->k, N = m->n;                                                         \
    const float *scale = m->kind == INT8 ? (const float *)m->scales : NULL;               \
    _Pragma("omp for schedule(static)")                                                   \
    for (int n = 0; n < N; n++)                                                           \
        for (int b = 0; b < batch; b++) {                                                 \
            const WTYPE *row = w + (size_t)n * K;                                         \
            const float *x = xs + (size_t)b * K;                                          \
            float acc = 0.f;                                                              \
            _Pragma("omp simd reduction(+:acc)")                                          \
            for (int k = 0; k < K; k++) acc += WIDEN(row[k]) * x[k];                      \
            ys[(size_t)b * N + n] = scale ? acc * scale[n] : acc;                         \
        }                                                                                 \
}
PLAIN_ROWS(matvec_f32, float, as_float)
PLAIN_ROWS(matvec_bf16, uint16_t, bf16_to_f32)
PLAIN_ROWS(matvec_int8, int8_t, int8_to_f32)
#endif

static void matvec_int4(const Matrix *m, const float *xs, float *ys, int batch) {
    const uint8_t *w = (const uint8_t *)m->w;
    const uint16_t *sz = (const uint16_t *)m->scales;    /* [K/32, N, 2] */
    const int K = m->k, N = m->n;
    #pragma omp for schedule(static)
    for (int blk = 0; blk < N / 64; blk++)               /* a block of 64 rows: [K, 32] bytes */
    for (int b = 0; b < batch; b++) {
        const uint8_t *block = w + (size_t)blk * K * 32;
        const float *x = xs + (size_t)b * K;
        float *y = ys + (size_t)b * N + (size_t)blk * 64;
        /* per group of 32 columns: acc[d] = sum q x, then y[d] += scale (acc - 8 sum x) + zero sum x */
#if SIMD
        __m512 out[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
                                                                             /* rows 0-15, 16-31, 32-47, 48-63 */
        for (int g = 0; g < K / 32; g++) {
            /* byte = lo + 16 hi: sum byte x and sum hi x are taken, lo's sum is the first minus 16x the second */
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;      /* bytes 0-15, 16-31; hi 0-15, 16-31 */
            float xsum = 0.f;
            for (int k = g * 32; k < g * 32 + 32; k++) {
                if (b == 0 && k % 2 == 0) _mm_prefetch((const char *)(block + (size_t)(k + 16) * 32), _MM_HINT_T0);  /* +~10% */
                const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(block + (size_t)k * 32)));
                const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(block + (size_t)k * 32 + 16)));
                const __m512 xk = _mm512_set1_ps(x[k]);
                xsum += x[k];
                a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b0), xk, a0);
                a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b1), xk, a1);
                a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4)), xk, a2);
                a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4)), xk, a3);
            }
            const __m512 sixteen = _mm512_set1_ps(16.f), eight_xsum = _mm512_set1_ps(8.f * xsum),
                         xsum_v = _mm512_set1_ps(xsum);
            const __m512 acc[4] = {_mm512_fnmadd_ps(sixteen, a2, a0), _mm512_fnmadd_ps(sixteen, a3, a1), a2, a3};
            const uint16_t *s = sz + ((size_t)g * N + (size_t)blk * 64) * 2;   /* 64 (scale, zero) bf16 pairs */
            for (int i = 0; i < 4; i++) {                /* 16 rows a time: a pair is one 32-bit lane */
                const __m512i pairs = _mm512_loadu_si512(s + 32 * i);
                const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
                const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xFFFF0000)));
                out[i] = _mm512_fmadd_ps(scale, _mm512_sub_ps(acc[i], eight_xsum), _mm512_fmadd_ps(zero, xsum_v, out[i]));
            }
        }
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(y + 16 * i, out[i]);
#else
        float out[64] = {0};
        for (int g = 0; g < K / 32; g++) {
            float acc[64] = {0}, xsum = 0.f;
            for (int k = g * 32; k < g * 32 + 32; k++) {
                const uint8_t *bytes = block + (size_t)k * 32;
                const float xk = x[k];
                xsum += xk;
                #pragma omp simd
                for (int d = 0; d < 32; d++) acc[d] += (float)(bytes[d] & 15) * xk;       /* row d */
                #pragma omp simd
                for (int d = 0; d < 32; d++) acc[d + 32] += (float)(bytes[d] >> 4) * xk;  /* row d + 32 */
            }
            const uint16_t *s = sz + ((size_t)g * N + (size_t)blk * 64) * 2;
            #pragma omp simd
            for (int d = 0; d < 64; d++) {
                const float scale = bf16_to_f32(s[2 * d]), zero = bf16_to_f32(s[2 * d + 1]);
                out[d] += scale * (acc[d] - 8.f * xsum) + zero * xsum;
            }
        }
        memcpy(y, out, sizeof out);
#endif
    }
}

static void matvec(const Matrix *m, const float *x, float *y, int batch) {
    switch (m->kind) {
    case F32: matvec_f32(m, x, y, batch); break;
    case BF16: matvec_bf16(m, x, y, batch); break;
    case INT8: matvec_int8(m, x, y, batch); break;
    default: matvec_int4(m, x, y, batch); break;
    }
}

/* ---------------------------------------------------------------- the small parts */

static void rms_norm(float *out, const float *x, const float *weight, int n, float eps) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inv);
}

/* RoPE on one head [Dh]: pairs (x[2i], x[2i+1]) rotated by angle i, as a complex multiply. */
static void rope(float *v, const float *cos, const float *sin, int head_dim) {
    for (int i = 0; i < head_dim / 2; i++) {
        const float a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * cos[i] - b * sin[i];
        v[2 * i + 1] = a * sin[i] + b * cos[i];
    }
}

/* q . row and out += p * row for one cached key / value row [Dh] (float32 or bfloat16). */
static inline float dot_row(const float *q, const void *cache, int bf16, size_t at, int Dh) {
    float dot = 0.f;
    if (bf16) {
        const uint16_t *row = (const uint16_t *)cache + at;
        #pragma omp simd reduction(+:dot)
        for (int i = 0; i < Dh; i++) dot += q[i] * bf16_to_f32(row[i]);
    } else {
        const float *row = (const float *)cache + at;
        #pragma omp simd reduction(+:dot)
        for (int i = 0; i < Dh; i++) dot += q[i] * row[i];
    }
    return dot;
}

static inline void add_row(float *out, float p, const void *cache, int bf16, size_t at, int Dh) {
    if (bf16) {
        const uint16_t *row = (const uint16_t *)cache + at;
        #pragma omp simd
        for (int i = 0; i < Dh; i++) out[i] += p * bf16_to_f32(row[i]);
    } else {
        const float *row = (const float *)cache + at;
        #pragma omp simd
        for (int i = 0; i < Dh; i++) out[i] += p * row[i];
    }
}

/* softmax(q k^T / sqrt(Dh)) v for the H query heads over cached positions 0..pos, in three
 * parts that each split between the threads, so a long context is read once, by all of them:
 *   scores   by position: each cached key row is read once, for the n_rep query heads sharing it;
 *   softmax  by head;
 *   sum      by 16-wide slices of the head dimension: each thread reads its slice of every
 *            value row and adds it into its slice of every head's output (no reduction needed).
 * q [H, Dh]; cache rows of group g at base + g * head_stride + t * Dh; scores [H, max_len];
 * visible [pos + 1]: which cached positions this row may attend to (NULL: all). */
static void attend(const float *q, const void *k_cache, const void *v_cache, int bf16, size_t base,
                   size_t head_stride, int pos, int max_len, int H, int Hkv, int Dh, const uint8_t *visible,
                   float *scores, float *out) {
    const int n_rep = H / Hkv;
    const float scale = 1.f / sqrtf((float)Dh);
    #pragma omp for schedule(static)
    for (int t = 0; t <= pos; t++)
        for (int g = 0; g < Hkv; g++) {
            const size_t at = base + g * head_stride + (size_t)t * Dh;
            for (int h = g * n_rep; h < (g + 1) * n_rep; h++)
                scores[(size_t)h * max_len + t] = visible && !visible[t] ? -INFINITY  /* masked: weight 0 */
                    : dot_row(q + (size_t)h * Dh, k_cache, bf16, at, Dh) * scale;
        }
    #pragma omp for schedule(static)
    for (int h = 0; h < H; h++) {
        float *score = scores + (size_t)h * max_len, top = -INFINITY, total = 0.f;
        for (int t = 0; t <= pos; t++) top = score[t] > top ? score[t] : top;
        #pragma omp simd reduction(+:total)
        for (int t = 0; t <= pos; t++) total += (score[t] = expf(score[t] - top));
        const float inverse = 1.f / total;
        #pragma omp simd
        for (int t = 0; t <= pos; t++) score[t] *= inverse;
    }
    #pragma omp for schedule(static)
    for (int i0 = 0; i0 < Dh; i0 += 16) {
        const int width = Dh - i0 < 16 ? Dh - i0 : 16;
        for (int h = 0; h < H; h++)
            for (int i = i0; i < i0 + width; i++) out[(size_t)h * Dh + i] = 0.f;
        for (int g = 0; g < Hkv; g++)
            for (int t = 0; t <= pos; t++) {
                const size_t at = base + g * head_stride + (size_t)t * Dh + i0;
                for (int h = g * n_rep; h < (g + 1) * n_rep; h++)
                    add_row(out + (size_t)h * Dh + i0, scores[(size_t)h * max_len + t], v_cache, bf16, at, width);
            }
    }
}

/* ---------------------------------------------------------------- the step */

/* One new token for each of B rows of a batch, all at cache slot pos:
 * x [B, D]: the new tokens' embeddings (overwritten); cos, sin [B, Dh/2] for each row's position;
 * k_cache, v_cache: [n_layers, cache_rows, Hkv, max_len, Dh] (float32, or bfloat16 when
 * cache_bf16), of which rows 0..B-1 are used; visible: NULL, or uint8 [B, pos + 1] saying which
 * cached positions each row may attend to (a left-padded batch hides its padding);
 * writes slot pos of every layer and row, and the logits [B, V]. */
void llama3_decode_step(const Model *model, float *x, const float *cos, const float *sin, int pos,
                        void *k_cache, void *v_cache, int cache_bf16, int max_len, int batch, int cache_rows,
                        const uint8_t *visible, const Scratch *s, float *logits) {
    const int D = model->dim, H = model->n_heads, Hkv = model->n_kv_heads, Dh = model->head_dim;
    const int F = model->hidden, QKV = (H + 2 * Hkv) * Dh;
    const size_t head_stride = (size_t)max_len * Dh, row_stride = (size_t)Hkv * head_stride;
    const size_t layer_stride = (size_t)cache_rows * row_stride;

    #pragma omp parallel num_threads(model->threads)
    {
        for (int l = 0; l < model->n_layers; l++) {
            const Layer *layer = &model->layers[l];
            /* ---- attention: x = x + wo(attend(q, cached k, cached v)) */
            #pragma omp single
            for (int b = 0; b < batch; b++)
                rms_norm(s->xb + (size_t)b * D, x + (size_t)b * D, layer->attention_norm, D, model->eps);
            matvec(&layer->wqkv, s->xb, s->qkv, batch);             /* [B, q (H Dh) | k (Hkv Dh) | v (Hkv Dh)] */
            #pragma omp single
            for (int b = 0; b < batch; b++) {
                float *qkv = s->qkv + (size_t)b * QKV;
                const float *c = cos + (size_t)b * (Dh / 2), *sn = sin + (size_t)b * (Dh / 2);
                for (int h = 0; h < H + Hkv; h++) rope(qkv + (size_t)h * Dh, c, sn, Dh);  /* q and k */
                const float *k = qkv + (size_t)H * Dh, *v = k + (size_t)Hkv * Dh;
                for (int g = 0; g < Hkv; g++) {                     /* store this position's k, v */
                    const size_t at = l * layer_stride + b * row_stride + g * head_stride + (size_t)pos * Dh;
                    for (int i = 0; i < Dh; i++) {
                        if (cache_bf16) {
                            ((uint16_t *)k_cache)[at + i] = f32_to_bf16(k[g * Dh + i]);
                            ((uint16_t *)v_cache)[at + i] = f32_to_bf16(v[g * Dh + i]);
                        } else {
                            ((float *)k_cache)[at + i] = k[g * Dh + i];
                            ((float *)v_cache)[at + i] = v[g * Dh + i];
                        }
                    }
                }
            }
            for (int b = 0; b < batch; b++)                         /* [B, H Dh] */
                attend(s->qkv + (size_t)b * QKV, k_cache, v_cache, cache_bf16, l * layer_stride + b * row_stride,
                       head_stride, pos, max_len, H, Hkv, Dh, visible ? visible + (size_t)b * (pos + 1) : NULL,
                       s->scores, s->att + (size_t)b * H * Dh);
            matvec(&layer->wo, s->att, s->proj, batch);
            /* ---- feed-forward: x = x + w2(silu(gate) * up) */
            #pragma omp single
            for (int b = 0; b < batch; b++) {
                float *xr = x + (size_t)b * D;
                for (int i = 0; i < D; i++) xr[i] += s->proj[(size_t)b * D + i];
                rms_norm(s->xb + (size_t)b * D, xr, layer->ffn_norm, D, model->eps);
            }
            matvec(&layer->w13, s->xb, s->gate_up, batch);          /* [B, gate (F) | up (F)] */
            #pragma omp for schedule(static)
            for (int i = 0; i < batch * F; i++) {                   /* silu(gate) * up, packed into [B, F] */
                const float *row = s->gate_up + (size_t)(i / F) * 2 * F;
                const float gate = row[i % F];
                s->hidden[i] = gate / (1.f + expf(-gate)) * row[F + i % F];
            }
            matvec(&layer->w2, s->hidden, s->proj, batch);
            #pragma omp single
            for (int i = 0; i < batch * D; i++) x[i] += s->proj[i];
        }
        #pragma omp single
        for (int b = 0; b < batch; b++)
            rms_norm(s->xb + (size_t)b * D, x + (size_t)b * D, model->norm, D, model->eps);
        matvec(&model->head, s->xb, logits, batch);
    }
}

/* One matrix-vector product on its own (for tests and benchmarks of the kernels). */
void llama3_matvec(const Matrix *m, const float *x, float *y, int batch, int threads) {
    #pragma omp parallel num_threads(threads)
    matvec(m, x, y, batch);
}

/* An INT4 matrix as bfloat16 [N, K] (w = (q - 8) * scale + zero, rounded once), for prefill:
 * a 16-bit matrix-matrix product beats the int4 kernel from a few dozen rows of input on. */
void llama3_dequantize_int4(const Matrix *m, uint16_t *out, int threads) {
    const uint8_t *w = (const uint8_t *)m->w;
    const uint16_t *sz = (const uint16_t *)m->scales;    /* [K/32, N, 2] */
    const int K = m->k, N = m->n;
    #pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int b = 0; b < N / 64; b++)
        for (int g = 0; g < K / 32; g++) {               /* one tile: 64 rows x 32 columns */
            const uint8_t *bytes = w + ((size_t)b * K + (size_t)g * 32) * 32;   /* [32 columns, 32] */
            float scale[64], offset[64], tile[64][32];
            for (int d = 0; d < 64; d++) {
                const uint16_t *s = sz + ((size_t)g * N + (size_t)b * 64 + d) * 2;
                scale[d] = bf16_to_f32(s[0]);
                offset[d] = bf16_to_f32(s[1]) - 8.f * scale[d];
            }
            for (int k = 0; k < 32; k++)
                for (int d = 0; d < 32; d++) {
                    tile[d][k] = (float)(bytes[k * 32 + d] & 15);
                    tile[d + 32][k] = (float)(bytes[k * 32 + d] >> 4);
                }
            for (int d = 0; d < 64; d++) {
                uint16_t *row = out + ((size_t)b * 64 + d) * K + (size_t)g * 32;
                for (int k = 0; k < 32; k++) row[k] = f32_to_bf16(tile[d][k] * scale[d] + offset[d]);
            }
        }
}
