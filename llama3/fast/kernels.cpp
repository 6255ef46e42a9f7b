/* CPU kernels for what model.py's block calls, registered as PyTorch operators (torch.ops.llama3.*).
 * See kernels.py.  None of them knows what a Llama block is: model.py calls them.
 *
 *   matvec(x, weight, scales, kind, n)  y = x Wᵀ for a few rows of x (decoding), weights read in place:
 *       kind 0  F32   [N, K] float32
 *       kind 1  BF16  [N, K] bfloat16 (the upper half of a float32)
 *       kind 2  INT8  [N, K] int8 with a float32 scale per row:        w = scale[n] * q
 *       kind 3  INT4  PyTorch's CPU int4 layout (`_convert_weight_to_int4pack_for_cpu`, N % 64 == 0):
 *               bytes [N/64, K, 32]; byte d of (block b, column k) holds the 4-bit value of row
 *               64b + d (low half) and row 64b + d + 32 (high half); bfloat16 scale and zero per
 *               32 columns, [K/32, N, 2]:                                w = (q - 8) * scale + zero
 *       kind 4  INT8_GROUP  [N, K] int8 with a float16 scale per group of G columns, [N, K/G]
 *               (G = 32: GGUF's Q8_0; G % 16 == 0):                      w = scale[n, k / G] * q
 *               and, where `offsets` is given, a float16 offset per group too (GGUF's Q4_1
 *               held exactly, q in 0..15):              w = scale[n, k / G] * q + offset[n, k / G]
 *   dequantize_int4(packed, scales_and_zeros, n)  the INT4 matrix as bfloat16 [N, K] (for prompts)
 *   dequantize_int8(weight, scales, offsets)      the INT8_GROUP matrix as bfloat16 [N, K] (for prompts)
 *   rms_norm(x, weight, eps)            weight * (x / sqrt(mean(x²) + eps)), rounded as model.py rounds
 *   silu_mul(gate, up)                  silu(gate) * up in one pass (FeedForward.kernel)
 *   rope(x, cos, sin)                   model.py's apply_rope: pairs (x[2i], x[2i+1]) rotated
 *   attend(q, k, v, visible)            softmax(q kᵀ / √Dh) v for one query row per sequence, over a
 *                                       KV cache read in place (strided views), each key/value head
 *                                       serving its H/Hkv query heads without copies
 *   dpbf16()                            whether this build has the bf16 x bf16 product (vdpbf16ps)
 *
 * Activations are float32 inside (bfloat16 inputs are read, and answers written, here, widened
 * once; a bf16 x into a bf16 matvec is multiplied as it is where the CPU has AVX512_BF16).  Threads: our own pool (threads.h:
 * chunks claimed one at a time, so a thread the OS did not run costs nothing; at::parallel_for's
 * OpenMP regions waited for it), as many threads as torch.set_num_threads says.  AVX-512 intrinsics for the matrix-vector
 * products where the CPU has them, plain loops the compiler vectorises elsewhere (-DLLAMA3_PLAIN_C).
 */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "softmax.h"
#include "threads.h"
#include "attend_core.h"  // attend's loop, shared with paged_attention.cpp

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#ifndef LLAMA3_NS
#define LLAMA3_NS llama3
#endif

namespace {

enum { F32 = 0, BF16 = 1, INT8 = 2, INT4 = 3, INT8_GROUP = 4 };

struct Matrix {
    int kind, n, k;
    const void *w;
    const void *scales;
};

// bfloat16 <-> float32 (round to nearest even, as PyTorch does): attend_core.h's, one definition
inline float bf16_to_f32(uint16_t b) { return llama3_attend::widen(b); }
inline uint16_t f32_to_bf16(float f) { return llama3_attend::narrow(f); }

/* ---------------------------------------------------------------- matrix-vector products */
/* Each computes rows [n_begin, n_end) of y [B, N] = x [B, K] Wᵀ; every block of weight rows is read
 * from memory once and used for all B rows of x while it sits in the L1 cache. */

#if defined(__AVX512F__) && !defined(LLAMA3_PLAIN_C)
#include <immintrin.h>
#define SIMD 1
#else
#define SIMD 0
#endif

#if SIMD
inline __m512 load16(const float *p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
inline __m512 load16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* Asks for weight bytes a few rows ahead of the ones being multiplied, into L2 (prefetcht1), not
 * L1 (prefetcht0).  A decoding step streams every weight from memory once; one pass over
 * SmolLM2-135M's 30 layers and head (benchmarks/matvec_speed.py --mode model, one thread, load ~5,
 * two rounds): float32 51.6-53.9 ms with T0, 29.5-33.3 with T1, 31.0-35.2 with T2, 53-58 without
 * prefetching; bfloat16 26.4-32.0 / 20.1-25.0 / 23.1-25.1.  (Presumably T0's lines, pulled into
 * the small L1 early, push out what the loop is still reading.) */
inline void prefetch_weights(const void *p) { _mm_prefetch((const char *)p, _MM_HINT_T1); }

/* 4 rows at a time, 16 columns per step (K % 16 == 0, checked in kernels.py).  While working on 4
 * rows it asks for the next 4 rows' cache lines: the hardware prefetcher alone left bf16 and int8
 * at about half the bandwidth float32 reached (measured on 3072 x 576). */
template <typename W>
void matvec_rows(const Matrix &m, const float *xs, float *ys, int batch, int64_t n_begin, int64_t n_end) {
    const W *w = (const W *)m.w;
    const int K = m.k, N = m.n;
    const float *scale = m.kind == INT8 ? (const float *)m.scales : nullptr;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += 4) {
        const int rows = N - n0 < 4 ? N - n0 : 4;
        const W *r0 = w + (size_t)n0 * K;
        const W *r1 = r0 + (rows > 1 ? K : 0), *r2 = r0 + (rows > 2 ? 2 * K : 0), *r3 = r0 + (rows > 3 ? 3 * K : 0);
        for (int b = 0; b < batch; b++) {
            const float *x = xs + (size_t)b * K;
            float *y = ys + (size_t)b * N;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int k = 0; k < K; k += 16) {
                const __m512 xv = _mm512_loadu_ps(x + k);
                if (b == 0 && (k * sizeof(W)) % 64 == 0) {
                    prefetch_weights(r0 + 4 * (size_t)K + k);
                    prefetch_weights(r1 + 4 * (size_t)K + k);
                    prefetch_weights(r2 + 4 * (size_t)K + k);
                    prefetch_weights(r3 + 4 * (size_t)K + k);
                }
                a0 = _mm512_fmadd_ps(load16(r0 + k), xv, a0);
                a1 = _mm512_fmadd_ps(load16(r1 + k), xv, a1);
                a2 = _mm512_fmadd_ps(load16(r2 + k), xv, a2);
                a3 = _mm512_fmadd_ps(load16(r3 + k), xv, a3);
            }
            const float sums[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                                   _mm512_reduce_add_ps(a3)};
            for (int r = 0; r < rows; r++) y[n0 + r] = scale ? sums[r] * scale[n0 + r] : sums[r];
        }
    }
}
#else
inline float widen(float v) { return v; }
inline float widen(uint16_t v) { return bf16_to_f32(v); }
inline float widen(int8_t v) { return (float)v; }

template <typename W>  // one row at a time; the compiler vectorises the inner loop
void matvec_rows(const Matrix &m, const float *xs, float *ys, int batch, int64_t n_begin, int64_t n_end) {
    const W *w = (const W *)m.w;
    const int K = m.k, N = m.n;
    const float *scale = m.kind == INT8 ? (const float *)m.scales : nullptr;
    for (int64_t n = n_begin; n < n_end && n < N; n++)
        for (int b = 0; b < batch; b++) {
            const W *row = w + (size_t)n * K;
            const float *x = xs + (size_t)b * K;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int k = 0; k < K; k++) acc += widen(row[k]) * x[k];
            ys[(size_t)b * N + n] = scale ? acc * scale[n] : acc;
        }
}
#endif

/* With AVX512_BF16 (vdpbf16ps: 32 bf16 products summed in pairs into 16 float32 lanes, one
 * instruction) the bf16 product takes a bf16 x (a bf16 model's activations) as it is, instead of
 * widening every weight to float32 first: 1 instruction per 32 weights instead of 6.  The
 * products are exact in float32, so the answer is the float32 one up to the order of the sums.
 * Measured at 1 thread on SmolLM2-135M's bf16 shapes: 0.83x the widening loop's time where the
 * rows sit in L2 (960 x 576, 576 x 576), 0.92x on 576 x 1536, equal where they stream from L3.
 * Tried and dropped: a float32 x split into two bf16 halves (hi + lo, ~2^-17 relative error)
 * took 1.4x the widening loop's time, and int4 bytes turned into bf16 (q - 8) by vpermb + vpermw
 * look-ups for vdpbf16ps were no faster than widening them to float32 (1.05x). */
#if SIMD && defined(__AVX512BF16__)
#define DPBF16 1

inline __m512 dot_bf16(__m512 acc, __m512i w, __m512i x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
}

/* BF16 rows [n_begin, n_end), 4 at a time, 32 columns per step (a 16-column tail when K % 32 ==
 * 16).  xh [batch, K] bf16. */
void matvec_bf16_pairs(const Matrix &m, const uint16_t *xh, float *ys, int batch, int64_t n_begin,
                       int64_t n_end) {
    const uint16_t *w = (const uint16_t *)m.w;
    const int K = m.k, N = m.n, full = K & ~31;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += 4) {
        const int rows = N - n0 < 4 ? N - n0 : 4;
        const uint16_t *r0 = w + (size_t)n0 * K;
        const uint16_t *r1 = r0 + (rows > 1 ? K : 0), *r2 = r0 + (rows > 2 ? 2 * K : 0),
                       *r3 = r0 + (rows > 3 ? 3 * K : 0);
        for (int b = 0; b < batch; b++) {
            const uint16_t *x = xh + (size_t)b * K;
            float *y = ys + (size_t)b * N;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            auto step = [&](int k, __mmask32 mask) {
                const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + k);
                const __m512i w0 = _mm512_maskz_loadu_epi16(mask, r0 + k), w1 = _mm512_maskz_loadu_epi16(mask, r1 + k),
                              w2 = _mm512_maskz_loadu_epi16(mask, r2 + k), w3 = _mm512_maskz_loadu_epi16(mask, r3 + k);
                a0 = dot_bf16(a0, w0, xv);
                a1 = dot_bf16(a1, w1, xv);
                a2 = dot_bf16(a2, w2, xv);
                a3 = dot_bf16(a3, w3, xv);
            };
            for (int k = 0; k < full; k += 32) {
                if (b == 0) {
                    prefetch_weights(r0 + 4 * (size_t)K + k);
                    prefetch_weights(r1 + 4 * (size_t)K + k);
                    prefetch_weights(r2 + 4 * (size_t)K + k);
                    prefetch_weights(r3 + 4 * (size_t)K + k);
                }
                step(k, 0xFFFFFFFFu);
            }
            if (full < K) step(full, 0xFFFFu);
            const float sums[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                                   _mm512_reduce_add_ps(a3)};
            for (int r = 0; r < rows; r++) y[n0 + r] = sums[r];
        }
    }
}

#else
#define DPBF16 0
#endif

/* INT4: blocks [begin, end) of 64 rows. */
void matvec_int4(const Matrix &m, const float *xs, float *ys, int batch, int64_t blk_begin, int64_t blk_end) {
    const uint8_t *w = (const uint8_t *)m.w;
    const uint16_t *sz = (const uint16_t *)m.scales;  // [K/32, N, 2]
    const int K = m.k, N = m.n;
    for (int64_t blk = blk_begin; blk < blk_end; blk++)
        for (int b = 0; b < batch; b++) {
            const uint8_t *block = w + (size_t)blk * K * 32;
            const float *x = xs + (size_t)b * K;
            float *y = ys + (size_t)b * N + (size_t)blk * 64;
            /* per group of 32 columns: acc[d] = sum q x, then y[d] += scale (acc - 8 sum x) + zero sum x */
#if SIMD
            __m512 out[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int g = 0; g < K / 32; g++) {
                /* byte = lo + 16 hi: sum byte x and sum hi x are taken, lo's sum is the first minus 16x the second */
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  // bytes 0-15, 16-31; hi 0-15, 16-31
                float xsum = 0.f;
                for (int k = g * 32; k < g * 32 + 32; k++) {
                    if (b == 0 && k % 2 == 0) prefetch_weights(block + (size_t)(k + 16) * 32);
                    const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(block + (size_t)k * 32)));
                    const __m512i b1 =
                        _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(block + (size_t)k * 32 + 16)));
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
                const uint16_t *s = sz + ((size_t)g * N + (size_t)blk * 64) * 2;  // 64 (scale, zero) bf16 pairs
                for (int i = 0; i < 4; i++) {  // 16 rows a time: a pair is one 32-bit lane
                    const __m512i pairs = _mm512_loadu_si512(s + 32 * i);
                    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
                    const __m512 zero =
                        _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xFFFF0000)));
                    out[i] = _mm512_fmadd_ps(scale, _mm512_sub_ps(acc[i], eight_xsum),
                                             _mm512_fmadd_ps(zero, xsum_v, out[i]));
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
                    for (int d = 0; d < 32; d++) acc[d] += (float)(bytes[d] & 15) * xk;  // row d
#pragma omp simd
                    for (int d = 0; d < 32; d++) acc[d + 32] += (float)(bytes[d] >> 4) * xk;  // row d + 32
                }
                const uint16_t *s = sz + ((size_t)g * N + (size_t)blk * 64) * 2;
                for (int d = 0; d < 64; d++) {
                    const float scale = bf16_to_f32(s[2 * d]), zero = bf16_to_f32(s[2 * d + 1]);
                    out[d] += scale * (acc[d] - 8.f * xsum) + zero * xsum;
                }
            }
            std::memcpy(y, out, sizeof out);
#endif
        }
}

/* INT8_GROUP (fast/quantize.py): rows [n_begin, n_end), 4 at a time; per group of G columns the
 * products q x are summed in float32, then multiplied by that group's float16 scale and added:
 * y[n] = sum_g scale[n, g] * sum_{k in g} q[n, k] x[k]  (+ sum_g offset[n, g] * xsum[g], where the
 * groups have offsets: xsum[g] = sum_{k in g} x[k], taken once per call by the caller).  The next 4
 * rows are prefetched as above. */
inline float f16_to_f32(uint16_t h) {  // IEEE half -> float, subnormals included
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
    uint32_t u;
    if (exp == 0x1F) u = sign | 0x7F800000 | (mant << 13);
    else if (exp != 0) u = sign | ((exp + 112) << 23) | (mant << 13);
    else {
        float f = (float)mant * (1.f / 16777216.f);  // mant * 2^-24
        std::memcpy(&u, &f, 4);
        u |= sign;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

#if defined(__F16C__) && SIMD
inline float half_scale(uint16_t h) { return _cvtsh_ss(h); }
#else
inline float half_scale(uint16_t h) { return f16_to_f32(h); }
#endif

/* xsum [B, K/G]: each row's sums of x over the groups (what the offsets multiply), into `sums`. */
void group_sums(const float *xs, int batch, int k, int group, float *sums) {
    for (int b = 0; b < batch; b++)
        for (int g = 0; g < k / group; g++) {
            const float *x = xs + (size_t)b * k + (size_t)g * group;
            float total = 0.f;
#pragma omp simd reduction(+ : total)
            for (int c = 0; c < group; c++) total += x[c];
            sums[(size_t)b * (k / group) + g] = total;
        }
}

#if SIMD
inline void widen_halves(const uint16_t *s, float *f, int count) {  // float16 [count] -> float32
    int g = 0;
    for (; g + 16 <= count; g += 16) _mm512_storeu_ps(f + g, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + g))));
    if (g < count) {  // the tail masked (one at a time through _cvtsh_ss cost ~5% of a 576-column product)
        const __mmask16 tail = (__mmask16)((1u << (count - g)) - 1);
        _mm512_mask_storeu_ps(f + g, tail, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail, s + g)));
    }
}

/* The sums of 4 vectors, in lanes 0-3 (one shuffle tree for the 4 rows instead of 4 reductions). */
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m256 b0 = _mm256_add_ps(_mm512_castps512_ps256(a0), _mm512_extractf32x8_ps(a0, 1));
    const __m256 b1 = _mm256_add_ps(_mm512_castps512_ps256(a1), _mm512_extractf32x8_ps(a1, 1));
    const __m256 b2 = _mm256_add_ps(_mm512_castps512_ps256(a2), _mm512_extractf32x8_ps(a2, 1));
    const __m256 b3 = _mm256_add_ps(_mm512_castps512_ps256(a3), _mm512_extractf32x8_ps(a3, 1));
    const __m256 d = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
    return _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
}
#endif

#ifndef LLAMA3_INT8_AHEAD  // rows ahead whose cache lines the int8-groups loop asks for
#define LLAMA3_INT8_AHEAD 4
#endif

#ifndef LLAMA3_INT8_ROWS  // rows a block of the int8-groups loop (a multiple of 4): 8 streamed a model
#define LLAMA3_INT8_ROWS 4  // pass from memory 1.2-1.5x slower than 4 (prefetching 4 or 8 rows ahead)
#endif

#if SIMD
/* One group of G (16 | G) columns of R rows at column k0, summed in float32 and added times the
 * rows' scales (sc[0], sc[SLAB], ...) into a[0..R).  The group's first 16 columns multiply (no
 * zeroed accumulators: fewer instructions per group, which limits this loop when rows sit in the
 * cache). */
template <int R, int G, int SLAB>
inline __attribute__((always_inline)) void int8_group(const int8_t *const *r, const float *x, int k0, int size,
                                                      const float *sc, __m512 *a) {
    __m512 p[R];
    const __m512 x0 = _mm512_loadu_ps(x + k0);
#pragma GCC unroll 8
    for (int i = 0; i < R; i++) p[i] = _mm512_mul_ps(load16(r[i] + k0), x0);
    for (int k = k0 + 16; k < k0 + (G ? G : size); k += 16) {
        const __m512 xv = _mm512_loadu_ps(x + k);
#pragma GCC unroll 8
        for (int i = 0; i < R; i++) p[i] = _mm512_fmadd_ps(load16(r[i] + k), xv, p[i]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; i++) a[i] = _mm512_fmadd_ps(p[i], _mm512_set1_ps(sc[i * SLAB]), a[i]);
}

/* Groups [0, count) of a slab (columns from k_begin) of R rows into acc; with PF, the cache lines
 * `ahead` bytes further on are asked for, one line of each row per 64 columns. */
template <int R, int G, int SLAB, bool PF>
__attribute__((noinline)) void int8_slab(const int8_t *const *rows, size_t ahead, const float *x, int k_begin,
                                         int count, int size, const float *sc, __m512 *acc) {
    const int8_t *r[R];
    __m512 a[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; i++) r[i] = rows[i], a[i] = acc[i];
    const int step = G ? G : size;
    int g = 0;
    if (G && G < 64 && 64 % G == 0) {  // 64 / G groups a cache line: one prefetch per row per line
        constexpr int per_line = G && G < 64 ? 64 / G : 1;
        for (; g + per_line <= count; g += per_line) {
            const int k0 = k_begin + g * step;
            if (PF)
#pragma GCC unroll 8
                for (int i = 0; i < R; i++) prefetch_weights(r[i] + ahead + k0);
            for (int j = 0; j < per_line; j++) int8_group<R, G, SLAB>(r, x, k0 + j * step, size, sc + g + j, a);
        }
    }
    for (; g < count; g++) {
        const int k0 = k_begin + g * step;
        if (PF)
            for (int k = k0; k < k0 + step; k += 16)
                if (k % 64 == 0)
                    for (int i = 0; i < R; i++) prefetch_weights(r[i] + ahead + k);
        int8_group<R, G, SLAB>(r, x, k0, size, sc + g, a);
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; i++) acc[i] = a[i];
}
#endif

/* G: the group size when it is known at compile time (32, GGUF's Q8_0: the group's loop unrolls),
 * 0 when it is read at run time (`group`).  offsets/xsums: nullptr for symmetric groups. */
template <int G>
void matvec_int8_groups(const Matrix &m, int group, const uint16_t *offsets, const float *xsums, const float *xs,
                        float *ys, int batch, int64_t n_begin, int64_t n_end) {
    const int8_t *w = (const int8_t *)m.w;
    const uint16_t *scales = (const uint16_t *)m.scales;  // [N, K/G] float16 bits
    const int K = m.k, N = m.n, size = G ? G : group, groups = K / size;
#if SIMD
    /* Columns in slabs of up to SLAB groups (one slab below K = 8192 at G = 32); the R rows' scales
     * of a slab widened to float32 at a fixed stride (row i at i * SLAB), so each group costs one
     * multiply-add with a broadcast memory operand per row, and one base pointer serves the R rows
     * (4 row pointers and 4 scale pointers had spilled to the stack).  R = 4: with 8 rows a block
     * the loop was as fast with the rows in cache but 1.2-1.5x slower streaming them from memory
     * (a model pass, 3 rounds alternating).  The offsets' part,
     * sum_g offset[n, g] xsum[g], goes into the same accumulators, 16 groups a multiply-add,
     * widened straight from the float16 offsets: read from a just-widened float32 copy (masked
     * loads of fresh stores, which do not forward) it cost ~7% more on 960 x 576 / 3072 x 576
     * with the rows in cache (26.9 vs 29.0 us, 86.3 vs 92.8 us, 1 thread, min of 30, alternating).
     * Measured, and together within noise of the loop before them (rows in cache): the 4-row
     * shuffle reduction, masked (not scalar) widening of the scales' tail, no allocation
     * per call, double-buffered scales, prefetching 8 or 16 rows ahead (streaming: noise).  What bounds this loop: 7 vector instructions per 32 weights a row (widen, convert,
     * multiply, twice, and the scale) against the per-row int8 kernel's 6; the group's scale costs
     * the same as an add in its place (measured), so it is not the multiplier ports. */
    constexpr int SLAB = 256, R = LLAMA3_INT8_ROWS;
    thread_local float widened[R * SLAB];
    for (int64_t n0 = n_begin; n0 < n_end; n0 += R) {
        const int rows = N - n0 < R ? N - n0 : R;
        const int8_t *r[R];
        for (int i = 0; i < R; i++) r[i] = w + (size_t)(n0 + (i < rows ? i : 0)) * K;  // missing rows repeat the first; never stored
        const size_t ahead = (size_t)LLAMA3_INT8_AHEAD * K;
        auto widen_slab = [&](int g0, int slab) {
            for (int i = 0; i < R; i++) {
                const int64_t row = n0 + (i < rows ? i : 0);
                widen_halves(scales + (size_t)row * groups + g0, widened + i * SLAB, slab);
            }
        };
        if (groups <= SLAB) widen_slab(0, groups);  // once for every row of x
        for (int b = 0; b < batch; b++) {
            const float *x = xs + (size_t)b * K;
            __m512 acc[R];
            for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
            for (int g0 = 0; g0 < groups; g0 += SLAB) {
                const int slab = groups - g0 < SLAB ? groups - g0 : SLAB;
                if (groups > SLAB) widen_slab(g0, slab);
                if (b == 0) int8_slab<R, G, SLAB, true>(r, ahead, x, g0 * size, slab, size, widened, acc);
                else int8_slab<R, G, SLAB, false>(r, ahead, x, g0 * size, slab, size, widened, acc);
                if (offsets) {  // + offset . xsum over the slab's groups, into the same lanes
                    const float *xsum = xsums + (size_t)b * groups + g0;
                    for (int g = 0; g < slab; g += 16) {
                        const __mmask16 mask = slab - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (slab - g)) - 1);
                        const __m512 xv = _mm512_maskz_loadu_ps(mask, xsum + g);
                        for (int i = 0; i < R; i++)
                            acc[i] = _mm512_fmadd_ps(
                                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, offsets + (size_t)(n0 + (i < rows ? i : 0)) * groups + g0 + g)),
                                xv, acc[i]);
                    }
                }
            }
            float sums[R];
            for (int i = 0; i < R; i += 4) _mm_storeu_ps(sums + i, reduce4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]));
            float *y = ys + (size_t)b * N;
            for (int i = 0; i < rows; i++) y[n0 + i] = sums[i];
        }
    }
#else
    for (int64_t n = n_begin; n < n_end && n < N; n++)
        for (int b = 0; b < batch; b++) {
            const int8_t *row = w + (size_t)n * K;
            const float *x = xs + (size_t)b * K;
            float total = 0.f;
            for (int g = 0; g < groups; g++) {
                float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                for (int k = g * size; k < (g + 1) * size; k++) acc += (float)row[k] * x[k];
                total += acc * half_scale(scales[(size_t)n * groups + g]);
                if (offsets)
                    total += half_scale(offsets[(size_t)n * groups + g]) * xsums[(size_t)b * groups + g];
            }
            ys[(size_t)b * N + n] = total;
        }
#endif
}


#if SIMD && defined(__AVX512BW__)
/* x as int16 per group of 32 (issue 15): scale = max|x_g| / 32767, q = round(x / scale), so a
 * group's product is one widen (int8 -> int16), one vpmaddwd, one convert and one multiply-add with
 * the weight scale x activation scale, ~4 instructions per 32 weights instead of ~7.  The int16 step
 * errs by at most scale/2 per element (~1/65536 of the group's largest |x|).  A group holding a
 * non-finite value gets a NaN scale (its products are NaN, as float products with a NaN or an inf
 * would mostly be); an all-zero group gets scale 0 and q 0. */
inline void quantize_x16(const float *x, int k, int16_t *q, float *xscale) {
    for (int g = 0; g < k / 32; g++) {
        const __m512 a = _mm512_loadu_ps(x + 32 * g), b = _mm512_loadu_ps(x + 32 * g + 16);
        const float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const bool finite = std::isfinite(mx) && _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) == 0 &&
                            _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q) == 0;
        const float inv = finite && mx > 0.f ? 32767.f / mx : 0.f;
        xscale[g] = finite ? mx / 32767.f : std::numeric_limits<float>::quiet_NaN();
        const __m512 iv = _mm512_set1_ps(inv);
        _mm256_storeu_si256((__m256i *)(q + 32 * g), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(a, iv))));
        _mm256_storeu_si256((__m256i *)(q + 32 * g + 16), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(b, iv))));
    }
}

#ifndef LLAMA3_INT8_X16_AHEAD  // bytes ahead of the rows being read that matvec_int8_x16 asks L2 for
#define LLAMA3_INT8_X16_AHEAD 12288
#endif

/* INT8_GROUP with G = 32 over int16 x (quantize_x16): rows [n_begin, n_end), R at a time, groups <= 256.
 * Prefetching: the weights stream from memory in a decoding step (the int8 model is ~150 MB, L3
 * 32 MB), and there the hint decides the speed, not the arithmetic.  With the float kernel's
 * _MM_HINT_T0 one block (4 rows) ahead this loop streamed a model pass (30 layers' wqkv, wo, w13,
 * w2 and the head, 149 MB) at ~9 GB/s on one Zen 4 core, 5% slower than the float kernel; asking
 * L2 instead (_MM_HINT_T1; presumably T0's prefetches held L1 miss buffers the loads then waited for)
 * ~12 KB ahead it streamed ~17-21 GB/s (a standalone copy of both loops, one thread, min of 20,
 * variants interleaved; 2 KB ahead ~10, 4 KB ~14, 8-16 KB ~17-21, 24-32 KB no better). */
template <int R>
void matvec_int8_x16(const Matrix &m, const uint16_t *offsets, const float *xsums, const int16_t *xq,
                     const float *xscales, float *ys, int batch, int64_t n_begin, int64_t n_end) {
    const int8_t *w = (const int8_t *)m.w;
    const uint16_t *scales = (const uint16_t *)m.scales;
    const int K = m.k, N = m.n, groups = K / 32;
    constexpr int SLAB = 256;
    thread_local float widened[R * SLAB], combined[R * SLAB];
    for (int64_t n0 = n_begin; n0 < n_end; n0 += R) {
        const int rows = N - n0 < R ? N - n0 : R;
        const int8_t *r[R];
        for (int i = 0; i < R; i++) {
            const int64_t row = n0 + (i < rows ? i : 0);
            r[i] = w + (size_t)row * K;
            widen_halves(scales + (size_t)row * groups, widened + i * SLAB, groups);
        }
        const size_t ahead = LLAMA3_INT8_X16_AHEAD;
        for (int b = 0; b < batch; b++) {
            const int16_t *x = xq + (size_t)b * K;
            const float *xs = xscales + (size_t)b * groups;
            for (int i = 0; i < R; i++)
#pragma omp simd
                for (int g = 0; g < groups; g++) combined[i * SLAB + g] = widened[i * SLAB + g] * xs[g];
            __m512 acc[R];
            for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();
            for (int g = 0; g < groups; g++) {
                const int k0 = 32 * g;
                if (b == 0 && (k0 & 63) == 0)
#pragma GCC unroll 8
                    for (int i = 0; i < R; i++) prefetch_weights(r[i] + ahead + k0);  // T1 (into L2)
                const __m512i xv = _mm512_loadu_si512((const void *)(x + k0));
#pragma GCC unroll 8
                for (int i = 0; i < R; i++) {
                    const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(r[i] + k0)));
                    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(wv, xv)),
                                             _mm512_set1_ps(combined[i * SLAB + g]), acc[i]);
                }
            }
            if (offsets) {
                const float *xsum = xsums + (size_t)b * groups;
                for (int g = 0; g < groups; g += 16) {
                    const __mmask16 mask = groups - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
                    const __m512 xv = _mm512_maskz_loadu_ps(mask, xsum + g);
                    for (int i = 0; i < R; i++)
                        acc[i] = _mm512_fmadd_ps(
                            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, offsets + (size_t)(n0 + (i < rows ? i : 0)) * groups + g)),
                            xv, acc[i]);
                }
            }
            float sums[R];
            for (int i = 0; i < R; i += 4) _mm_storeu_ps(sums + i, reduce4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]));
            float *y = ys + (size_t)b * N;
            for (int i = 0; i < rows; i++) y[n0 + i] = sums[i];
        }
    }
}
#define LLAMA3_X16 1
#else
#define LLAMA3_X16 0
#endif

/* bfloat16 <-> float32 for a run of values (the compiler vectorises both loops). */
void widen_bf16(const uint16_t *from, float *to, int64_t count) {
#pragma omp simd
    for (int64_t i = 0; i < count; i++) to[i] = bf16_to_f32(from[i]);
}

void narrow_bf16(const float *from, uint16_t *to, int64_t count) {
#pragma omp simd
    for (int64_t i = 0; i < count; i++) to[i] = f32_to_bf16(from[i]);
}

/* Per-call scratch of the thread that calls matvec (workers only read and write through its
 * pointers): no allocation once a call of each size has been made. */
template <typename T>
T *scratch(std::vector<T> &buffer, size_t count) {
    if (buffer.size() < count) buffer.resize(count);
    return buffer.data();
}

}  // namespace

/* x [..., K] (float32 or bfloat16) -> [..., N] in x's dtype.  A bfloat16 x is read and its
 * answer written in bfloat16 here, in C++: converting through ATen (x.to, y.to) cost two more
 * operator calls per product, ~400 a token of SmolLM2 in bf16. */
at::Tensor matvec(const at::Tensor &x, const at::Tensor &weight, const c10::optional<at::Tensor> &scales, int64_t kind,
                  int64_t n, const c10::optional<at::Tensor> &offsets) {
    const int64_t k = x.size(-1);
    TORCH_CHECK(weight.is_contiguous() && weight.device().is_cpu() && k % 16 == 0,
                "matvec: a contiguous CPU weight, K a multiple of 16");
    TORCH_CHECK(kind == INT4 || weight.size(1) == k, "matvec: x has ", k, " columns, the weight ", weight.size(1));
    const bool x16 = x.scalar_type() == at::kBFloat16, native_type = x16 || x.scalar_type() == at::kFloat;
    /* contiguous input (the usual case) is read where it lies: no extra operator calls */
    at::Tensor rows = !native_type ? x.to(at::kFloat).contiguous() : x.is_contiguous() ? x : x.contiguous();
    const int batch = (int)(rows.numel() / k);
    Matrix m{(int)kind, (int)n, (int)k, weight.data_ptr(), scales.has_value() ? scales->data_ptr() : nullptr};
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = n;
    at::Tensor y = at::empty(shape, rows.options());
    thread_local std::vector<float> x_wide, y_wide;
    const bool pairs = DPBF16 && x16 && kind == BF16;  // vdpbf16ps on x as it is (above)
    const float *xs = nullptr;
    const uint16_t *xh = pairs ? (const uint16_t *)rows.data_ptr() : nullptr;
    if (x16 && !pairs) {  // the products that widen their weights to float32 read a float32 x
        float *wide = scratch(x_wide, (size_t)batch * k);
        widen_bf16((const uint16_t *)rows.data_ptr(), wide, (int64_t)batch * k);
        xs = wide;
    } else if (!x16) xs = rows.data_ptr<float>();
    float *ys = x16 ? scratch(y_wide, (size_t)batch * n) : y.data_ptr<float>();
    uint16_t *y16 = x16 ? (uint16_t *)y.data_ptr() : nullptr;
    auto narrow = [&](int64_t lo, int64_t hi) {  // rows [lo, hi) of every x row, into the bf16 answer
        if (y16)
            for (int b = 0; b < batch; b++) narrow_bf16(ys + (size_t)b * n + lo, y16 + (size_t)b * n + lo, hi - lo);
    };
    (void)xh;
    if (kind == INT4) {
        TORCH_CHECK(n % 64 == 0 && scales.has_value() && !offsets.has_value(),
                    "matvec: int4 needs N % 64 == 0 and scales (its zeros are in them)");
        llama3_threads::parallel_for(0, n / 64, 1, [&](int64_t b, int64_t e) {
            matvec_int4(m, xs, ys, batch, b, e);
            narrow(64 * b, 64 * e);
        });
    } else if (kind == INT8_GROUP) {
        TORCH_CHECK(scales.has_value() && scales->scalar_type() == at::kHalf && scales->is_contiguous() &&
                        scales->dim() == 2 && scales->size(0) == n && k % scales->size(1) == 0 &&
                        (k / scales->size(1)) % 16 == 0 && weight.scalar_type() == at::kChar,
                    "matvec: int8 groups need int8 weights and float16 scales [N, K/G], G % 16 == 0");
        const int group = (int)(k / scales->size(1));
        TORCH_CHECK(!offsets.has_value() || (offsets->scalar_type() == at::kHalf && offsets->is_contiguous() &&
                                             offsets->sizes() == scales->sizes()),
                    "matvec: int8 group offsets are float16, shaped as the scales");
        const uint16_t *offs = offsets.has_value() ? (const uint16_t *)offsets->data_ptr() : nullptr;
        thread_local std::vector<float> xsum_buffer;
        float *xsums = offs ? scratch(xsum_buffer, (size_t)batch * (k / group)) : nullptr;
        if (offs) group_sums(xs, batch, (int)k, group, xsums);
        constexpr int R = LLAMA3_INT8_ROWS;  // rows a block (matvec_int8_groups)
#if LLAMA3_X16
        static const bool x16_on = [] { const char *e = std::getenv("LLAMA3_INT8_X16"); return !e || e[0] != '0'; }();
        if (x16_on && group == 32 && k / 32 <= 256) {  // x as int16 groups (quantize_x16)
            thread_local std::vector<int16_t> xq_buffer;
            thread_local std::vector<float> xscale_buffer;
            if (xq_buffer.size() < (size_t)batch * k) xq_buffer.resize((size_t)batch * k);
            float *xsc = scratch(xscale_buffer, (size_t)batch * (k / 32));
            for (int b = 0; b < batch; b++) quantize_x16(xs + (size_t)b * k, (int)k, xq_buffer.data() + (size_t)b * k, xsc + (size_t)b * (k / 32));
            const int16_t *xq = xq_buffer.data();
            llama3_threads::parallel_for(0, (n + R - 1) / R, 1, [&](int64_t b, int64_t e) {
                const int64_t lo = R * b, hi = R * e < n ? R * e : n;
                matvec_int8_x16<R>(m, offs, xsums, xq, xsc, ys, batch, lo, hi);
                narrow(lo, hi);
            });
            return native_type ? y : y.to(x.scalar_type());
        }
#endif
        llama3_threads::parallel_for(0, (n + R - 1) / R, 1, [&](int64_t b, int64_t e) {
            const int64_t lo = R * b, hi = R * e < n ? R * e : n;
            if (group == 32) matvec_int8_groups<32>(m, group, offs, xsums, xs, ys, batch, lo, hi);
            else matvec_int8_groups<0>(m, group, offs, xsums, xs, ys, batch, lo, hi);
            narrow(lo, hi);
        });
    } else {
        TORCH_CHECK(!offsets.has_value(), "matvec: offsets belong to int8 groups (kind 4) only");
        TORCH_CHECK(kind != INT8 || scales.has_value(), "matvec: int8 needs scales");
        llama3_threads::parallel_for(0, (n + 3) / 4, 1, [&](int64_t b, int64_t e) {
            const int64_t lo = 4 * b, hi = 4 * e < n ? 4 * e : n;
            if (kind == F32) matvec_rows<float>(m, xs, ys, batch, lo, hi);
#if DPBF16
            else if (kind == BF16 && pairs) matvec_bf16_pairs(m, xh, ys, batch, lo, hi);
#endif
            else if (kind == BF16) matvec_rows<uint16_t>(m, xs, ys, batch, lo, hi);
            else matvec_rows<int8_t>(m, xs, ys, batch, lo, hi);
            narrow(lo, hi);
        });
    }
    return native_type ? y : y.to(x.scalar_type());
}

/* An INT4 matrix as bfloat16 [N, K] (w = (q - 8) * scale + zero, rounded once), for prompts:
 * a 16-bit matrix-matrix product beats the int4 kernel from a few dozen rows of input on. */
at::Tensor dequantize_int4(const at::Tensor &packed, const at::Tensor &scales_and_zeros, int64_t n) {
    const int64_t k = scales_and_zeros.size(0) * 32;
    const uint8_t *w = (const uint8_t *)packed.data_ptr();
    const uint16_t *sz = (const uint16_t *)scales_and_zeros.data_ptr();
    at::Tensor out = at::empty({n, k}, packed.options().dtype(at::kBFloat16));
    uint16_t *o = (uint16_t *)out.data_ptr();
    llama3_threads::parallel_for(0, (n / 64) * (k / 32), 1, [&](int64_t begin, int64_t end) {
        for (int64_t tile_id = begin; tile_id < end; tile_id++) {  // one tile: 64 rows x 32 columns
            const int64_t b = tile_id / (k / 32), g = tile_id % (k / 32);
            const uint8_t *bytes = w + ((size_t)b * k + (size_t)g * 32) * 32;  // [32 columns, 32]
            float scale[64], offset[64], tile[64][32];
            for (int d = 0; d < 64; d++) {
                const uint16_t *s = sz + ((size_t)g * n + (size_t)b * 64 + d) * 2;
                scale[d] = bf16_to_f32(s[0]);
                offset[d] = bf16_to_f32(s[1]) - 8.f * scale[d];
            }
            for (int c = 0; c < 32; c++)
                for (int d = 0; d < 32; d++) {
                    tile[d][c] = (float)(bytes[c * 32 + d] & 15);
                    tile[d + 32][c] = (float)(bytes[c * 32 + d] >> 4);
                }
            for (int d = 0; d < 64; d++) {
                uint16_t *row = o + ((size_t)b * 64 + d) * k + (size_t)g * 32;
                for (int c = 0; c < 32; c++) row[c] = f32_to_bf16(tile[d][c] * scale[d] + offset[d]);
            }
        }
    });
    return out;
}

/* An INT8_GROUP matrix as bfloat16 [N, K] (w = scale * q (+ offset), computed in float32 and rounded
 * once), for prompts: the same numbers as fast/quantize.py's `dequantize_int8(..., torch.bfloat16)`
 * in one pass over the matrix, where PyTorch took three (widen q, multiply, round) plus a float32
 * temporary of 4 bytes a weight.  Rows are split between the threads. */
at::Tensor dequantize_int8(const at::Tensor &weight, const at::Tensor &scales, const c10::optional<at::Tensor> &offsets) {
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous() && scales.dim() == 2 &&
                    scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.size(0) == weight.size(0) &&
                    scales.size(1) > 0 && weight.size(1) % scales.size(1) == 0,
                "dequantize_int8: int8 weights [N, K] and float16 scales [N, K/G]");
    TORCH_CHECK(!offsets.has_value() || (offsets->scalar_type() == at::kHalf && offsets->is_contiguous() &&
                                         offsets->sizes() == scales.sizes()),
                "dequantize_int8: offsets are float16, shaped as the scales");
    const int64_t n = weight.size(0), k = weight.size(1), groups = scales.size(1), size = k / groups;
    const int8_t *q = (const int8_t *)weight.data_ptr();
    const uint16_t *s = (const uint16_t *)scales.data_ptr();
    const uint16_t *o = offsets.has_value() ? (const uint16_t *)offsets->data_ptr() : nullptr;
    at::Tensor out = at::empty({n, k}, weight.options().dtype(at::kBFloat16));
    uint16_t *wide = (uint16_t *)out.data_ptr();
    llama3_threads::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; r++)
            for (int64_t g = 0; g < groups; g++) {
                const float scale = half_scale(s[r * groups + g]), offset = o ? half_scale(o[r * groups + g]) : 0.f;
                const int8_t *in = q + r * k + g * size;
                uint16_t *to = wide + r * k + g * size;
#pragma omp simd
                for (int64_t c = 0; c < size; c++) to[c] = f32_to_bf16((float)in[c] * scale + offset);
            }
    });
    return out;
}

/* A row of float32 or bfloat16 values as float32: in place when it is float32, else widened into
 * `buffer`. */
inline const float *as_float(const void *row, bool bf16, int64_t count, std::vector<float> &buffer) {
    if (!bf16) return (const float *)row;
    float *to = scratch(buffer, (size_t)count);
    widen_bf16((const uint16_t *)row, to, count);
    return to;
}

/* weight * (x / sqrt(mean(x²) + eps)): the sum in float32, the normalised row rounded to x's dtype
 * and then multiplied by the weight in the result's dtype, as model.py's RMSNorm does.  A bf16 x
 * or weight is read as it is (converting through ATen cost an operator call each, per norm). */
at::Tensor rms_norm(const at::Tensor &x, const at::Tensor &weight, double eps) {
    const int64_t d = x.size(-1);
    const at::Tensor rows = x.is_contiguous() ? x : x.contiguous();  // no reshape, no view: ~1 us a call
    at::Tensor w = weight;
    const bool w16 = w.scalar_type() == at::kBFloat16;
    if (!(w16 || w.scalar_type() == at::kFloat)) w = w.to(at::kFloat);
    if (!w.is_contiguous()) w = w.contiguous();
    const auto out_type = c10::promoteTypes(x.scalar_type(), weight.scalar_type());
    at::Tensor out = at::empty(x.sizes(), rows.options().dtype(out_type));
    const bool in16 = rows.scalar_type() == at::kBFloat16, out16 = out_type == at::kBFloat16;
    TORCH_CHECK((in16 || rows.scalar_type() == at::kFloat) && (out16 || out_type == at::kFloat) && w.numel() == d,
                "rms_norm: float32 or bfloat16, a weight per column");
    const int64_t count = d ? rows.numel() / d : 0;
    const void *in = rows.data_ptr(), *wp = w.data_ptr();  // pointers read once: data_ptr() per element cost ~15 us a row
    void *to = out.data_ptr();
    const float inv_d = 1.f / (float)d;
    llama3_threads::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
        thread_local std::vector<float> row_buffer, weight_buffer, out_buffer;
        const float *wf = as_float(wp, w16, d, weight_buffer);
        float *y = scratch(out_buffer, (size_t)d);
        for (int64_t r = begin; r < end; r++) {
            const float *row = as_float(in16 ? (const void *)((const uint16_t *)in + r * d)
                                             : (const void *)((const float *)in + r * d),
                                        in16, d, row_buffer);
            float ss = 0.f;
#pragma omp simd reduction(+ : ss)
            for (int64_t i = 0; i < d; i++) ss += row[i] * row[i];
            const float inv = 1.f / std::sqrt(ss * inv_d + (float)eps);
            if (in16) {  // .type_as(x): the normalised row in bf16, then times the weight
#pragma omp simd
                for (int64_t i = 0; i < d; i++) y[i] = wf[i] * bf16_to_f32(f32_to_bf16(row[i] * inv));
            } else {
#pragma omp simd
                for (int64_t i = 0; i < d; i++) y[i] = wf[i] * (row[i] * inv);
            }
            if (out16) narrow_bf16(y, (uint16_t *)to + r * d, d);
            else std::memcpy((float *)to + r * d, y, d * sizeof(float));
        }
    });
    return out;
}

/* silu(gate) * up, each row of F values read where it lies (w13's output split in two: a row
 * stride of 2F), the answer contiguous in gate's dtype.  float32: silu(g) = g / (1 + exp(-g)),
 * then times up; bfloat16: silu rounded to bf16, then the product rounded, as F.silu(gate) * up
 * rounds.  Rows: B*T of [B, T, F] (or [N, F]) whose leading dimensions are evenly strided. */
at::Tensor silu_mul(const at::Tensor &gate, const at::Tensor &up) {
    TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type() && gate.dim() >= 1 &&
                    (gate.scalar_type() == at::kFloat || gate.scalar_type() == at::kBFloat16),
                "silu_mul: gate and up of one shape, float32 or bfloat16");
    const int64_t F = gate.size(-1), rows = F ? gate.numel() / F : 0;
    auto evenly = [&](const at::Tensor &t) {  // rows at one stride, values contiguous
        if (t.stride(-1) != 1 && F > 1) return false;
        for (int64_t d = 0; d + 2 < t.dim(); d++)
            if (t.size(d) > 1 && t.stride(d) != t.stride(d + 1) * t.size(d + 1)) return false;
        return true;
    };
    const at::Tensor g = evenly(gate) ? gate : gate.contiguous(), u = evenly(up) ? up : up.contiguous();
    const int64_t gs = g.dim() >= 2 ? g.stride(-2) : F, us = u.dim() >= 2 ? u.stride(-2) : F;
    at::Tensor out = at::empty(gate.sizes(), gate.options().memory_format(at::MemoryFormat::Contiguous));
    const bool b16 = g.scalar_type() == at::kBFloat16;
    const char *gp = (const char *)g.data_ptr(), *upp = (const char *)u.data_ptr();
    char *op = (char *)out.data_ptr();
    const size_t elem = b16 ? 2 : 4;
    llama3_threads::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        thread_local std::vector<float> gb, ub, yb;
        for (int64_t r = begin; r < end; r++) {
            const float *gr = as_float(gp + r * gs * elem, b16, F, gb), *ur = as_float(upp + r * us * elem, b16, F, ub);
            float *y = b16 ? scratch(yb, (size_t)F) : (float *)(op + r * F * elem);
            int64_t i = 0;
#if defined(__AVX512F__) && !defined(LLAMA3_PLAIN_C)
            const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
            for (; i < F; i += 16) {
                const __mmask16 lanes = F - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (F - i)) - 1);
                const __m512 x = _mm512_maskz_loadu_ps(lanes, gr + i);
                __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, llama3_softmax::exp16(_mm512_sub_ps(zero, x), lanes)));
                if (b16) {  // silu rounded to bf16 (to nearest even; silu of a finite bf16 is finite)
                    const __m512i bits = _mm512_castps_si512(s);
                    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
                    s = _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))),
                                                             _mm512_set1_epi32((int)0xFFFF0000u)));
                }
                _mm512_mask_storeu_ps(y + i, lanes, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(lanes, ur + i)));
            }
#else
            for (; i < F; i++) {
                float s = gr[i] / (1.f + std::exp(-gr[i]));
                if (b16) s = bf16_to_f32(f32_to_bf16(s));
                y[i] = s * ur[i];
            }
#endif
            if (b16) narrow_bf16(y, (uint16_t *)(op + r * F * elem), F);
        }
    });
    return out;
}

/* x [B, T, H, Dh] (float32 or bfloat16, each head's Dh values contiguous); cos, sin float32
 * [T, Dh/2] or [B, T, Dh/2].  The answer is contiguous, in x's dtype (rotated in float32, rounded
 * once, as apply_rope's float32 arithmetic on a bf16 x is). */
at::Tensor rope(const at::Tensor &x, const at::Tensor &cos, const at::Tensor &sin) {
    TORCH_CHECK(x.dim() == 4 && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
                "rope: x [B, T, H, Dh], float32 tables");
    const int64_t B = x.size(0), T = x.size(1), H = x.size(2), Dh = x.size(3), half = Dh / 2;
    at::Tensor xs = x;
    const bool x16 = x.scalar_type() == at::kBFloat16;
    if (!(x16 || x.scalar_type() == at::kFloat)) xs = x.to(at::kFloat);
    if (xs.stride(3) != 1) xs = xs.contiguous();
    at::Tensor c = cos.contiguous(), s = sin.contiguous();
    const bool per_row = c.dim() == 3;
    at::Tensor out = at::empty({B, T, H, Dh}, xs.options());
    const int64_t sb = xs.stride(0), st = xs.stride(1), sh = xs.stride(2);
    const char *xi = (const char *)xs.data_ptr();
    const size_t elem = x16 ? 2 : 4;
    const float *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
    char *o = (char *)out.data_ptr();
    llama3_threads::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
        thread_local std::vector<float> in_buffer, out_buffer;
        float *w = scratch(out_buffer, (size_t)Dh);
        for (int64_t bt = begin; bt < end; bt++) {
            const int64_t b = bt / T, t = bt % T, table_row = per_row ? bt : t;
            const float *cr = cp + table_row * half, *sr = sp + table_row * half;
            for (int64_t h = 0; h < H; h++) {
                const float *v = as_float(xi + (b * sb + t * st + h * sh) * elem, x16, Dh, in_buffer);
                float *dest = x16 ? w : (float *)(o + ((bt * H + h) * Dh) * elem);
#pragma omp simd
                for (int64_t i = 0; i < half; i++) {
                    const float a = v[2 * i], bb = v[2 * i + 1];
                    dest[2 * i] = a * cr[i] - bb * sr[i];
                    dest[2 * i + 1] = a * sr[i] + bb * cr[i];
                }
                if (x16) narrow_bf16(w, (uint16_t *)(o + ((bt * H + h) * Dh) * elem), Dh);
            }
        }
    });
    return x16 || x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

/* A KVCache's rows for attend_core.h: row b's positions 0..S-1 of kv head g, `st` elements apart. */
template <typename T>
struct CacheKeys {
    const T *k, *v;
    const bool *mask;  // nullptr, or bool [B or 1, S] (mask_stride 0: one row for all)
    int64_t mask_stride, S, sb, sh, st;
    int64_t seen(int64_t) const { return S; }
    const bool *visible(int64_t b) const { return mask ? mask + b * mask_stride : nullptr; }
    llama3_attend::Run<T> run(int64_t b, int64_t g, int64_t p) const {
        const int64_t at = b * sb + g * sh + p * st;
        return {k + at, v + at, S - p, st};
    }
};

/* q [B, H, 1, Dh]; k, v [B, Hkv, S, Dh] views (the last dimension contiguous, float32 or bfloat16);
 * visible: None or bool [B or 1, S], or [B or 1, 1, 1, S] (the same bytes: a model's mask as it comes)
 * (False: that key is hidden from the row).  -> [B, H, 1, Dh] in q's dtype (a bf16 q is read, and its
 * answer written, here: no ATen conversions). */
at::Tensor attend(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                  const c10::optional<at::Tensor> &visible) {
    const int64_t B = q.size(0), H = q.size(1), Dh = q.size(3), Hkv = k.size(1), S = k.size(2);
    TORCH_CHECK(q.size(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && k.scalar_type() == v.scalar_type() &&
                    k.strides() == v.strides() && H % Hkv == 0,
                "attend: one query row, key/value rows contiguous");
    const bool bf16 = k.scalar_type() == at::kBFloat16;
    TORCH_CHECK(bf16 || k.scalar_type() == at::kFloat, "attend: a float32 or bfloat16 cache");
    const bool q16 = q.scalar_type() == at::kBFloat16;
    at::Tensor qs = q16 || q.scalar_type() == at::kFloat ? q : q.to(at::kFloat);
    if (!qs.is_contiguous()) qs = qs.contiguous();
    at::Tensor out = at::empty({B, H, 1, Dh}, qs.options());
    at::Tensor mask;
    const bool *seen = nullptr;
    int64_t mask_stride = 0;
    if (visible.has_value()) {
        mask = visible->scalar_type() == at::kBool ? *visible : visible->to(at::kBool);
        if (!mask.is_contiguous()) mask = mask.contiguous();
        TORCH_CHECK(mask.dim() >= 1 && (mask.size(0) == 1 || mask.size(0) == B) && mask.numel() == mask.size(0) * S,
                    "attend: visible is [B or 1, S] (or [B or 1, 1, 1, S])");
        seen = mask.data_ptr<bool>();
        mask_stride = mask.size(0) == 1 ? 0 : S;
    }
    const int64_t sb = k.stride(0), sh = k.stride(1), st = k.stride(2);
    if (bf16)
        llama3_attend::attend_queries<uint16_t>(qs.data_ptr(), q16, out.data_ptr(), B, H, Hkv, Dh,
                                                CacheKeys<uint16_t>{(const uint16_t *)k.data_ptr(),
                                                                    (const uint16_t *)v.data_ptr(), seen, mask_stride,
                                                                    S, sb, sh, st});
    else
        llama3_attend::attend_queries<float>(qs.data_ptr(), q16, out.data_ptr(), B, H, Hkv, Dh,
                                             CacheKeys<float>{k.data_ptr<float>(), v.data_ptr<float>(), seen,
                                                              mask_stride, S, sb, sh, st});
    return q16 || q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

/* The thread pool's counters (threads.h): jobs, shared_jobs, worker_chunks, losses, solo_jobs, lost_seconds. */
std::vector<double> thread_stats(bool reset) {
    const llama3_threads::Stats s = llama3_threads::stats();
    if (reset) llama3_threads::reset_stats();
    return {(double)s.jobs, (double)s.shared_jobs, (double)s.worker_chunks, (double)s.losses, (double)s.solo_jobs,
            s.lost_seconds};
}

/* Whether this build's bf16 matvec takes a bf16 x through vdpbf16ps (AVX512_BF16 at compile time):
 * tests compare that path with the widening one where it is there, and fail where the CPU has the
 * instruction and the build lost it. */
bool dpbf16() { return DPBF16; }

TORCH_LIBRARY(LLAMA3_NS, m) {
    m.def("matvec(Tensor x, Tensor weight, Tensor? scales, int kind, int n, Tensor? offsets=None) -> Tensor");
    m.def("dequantize_int4(Tensor packed, Tensor scales_and_zeros, int n) -> Tensor");
    m.def("dequantize_int8(Tensor weight, Tensor scales, Tensor? offsets=None) -> Tensor");
    m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
    m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
    m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
    m.def("attend(Tensor q, Tensor k, Tensor v, Tensor? visible) -> Tensor");
    m.def("thread_stats(bool reset=False) -> float[]");
    m.def("dpbf16() -> bool");
}

TORCH_LIBRARY_IMPL(LLAMA3_NS, CPU, m) {
    m.impl("matvec", TORCH_FN(matvec));
    m.impl("dequantize_int4", TORCH_FN(dequantize_int4));
    m.impl("dequantize_int8", TORCH_FN(dequantize_int8));
    m.impl("rms_norm", TORCH_FN(rms_norm));
    m.impl("rope", TORCH_FN(rope));
    m.impl("silu_mul", TORCH_FN(silu_mul));
    m.impl("attend", TORCH_FN(attend));
}

TORCH_LIBRARY_IMPL(LLAMA3_NS, CatchAll, m) {
    m.impl("thread_stats", TORCH_FN(thread_stats));
    m.impl("dpbf16", TORCH_FN(dpbf16));
}
