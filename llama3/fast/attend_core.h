/* The one attention loop of the kernels: softmax(q kᵀ / √Dh) v for decoding queries over cached
 * keys, shared by kernels.cpp's `attend` (a KVCache's contiguous rows) and paged_attention.cpp's
 * `paged_attend` (the engine's blocks).  They differ only in where position p's key and value rows
 * are, which each tells through a `RunAt` (below); so the two give the same bits on the same keys.
 *
 * How it is cut, and why (a decoding step of SmolLM2 at 1000 cached positions: 30 layers x 9 query
 * heads x 1000 keys; one thread spent ~19 ns per (head, key) pair in the loops this replaced, ~70
 * cycles for 128 multiply-adds, and the paged kernel 1.5x that; measured as
 * benchmarks/attention_kernel.py):
 *   - one job is a kv head's group of n_rep query heads (grouped-query attention) over a span of
 *     at most SPAN positions: each key and value row is read from memory once for the group,
 *     not once per query head;
 *   - scores 16 keys at a time: 16 rows' dot products as 16 vectors of partial sums, added across
 *     in one transposing tree (45 instructions for 16 dot products instead of a horizontal sum each);
 *   - the weighted sum of value rows accumulates in registers, 16 rows at a time;
 *   - a long context is cut into spans so that a step with fewer (query, kv head) pairs than
 *     threads still keeps every thread busy; each span keeps its own max and sum and the spans are
 *     joined as in flash-decoding (o = Σ_c e^(m_c - M) o_c / Σ_c e^(m_c - M) l_c).  The cut depends
 *     only on how many keys a query sees, never on the thread count or the batch, so an answer is
 *     the same bits alone or batched, on one thread or many.
 * Without AVX-512 (or -DLLAMA3_PLAIN_C, or Dh > 128) the same spans run as plain loops.
 */
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "softmax.h"
#include "threads.h"

#if defined(__AVX512F__) && !defined(LLAMA3_PLAIN_C)
#include <immintrin.h>
#define LLAMA3_ATTEND_AVX512 1
#endif

namespace llama3_attend {

constexpr int64_t SPAN = 256;  // positions a job covers at most (a multiple of 16)

/* Where keys p, p+1, ... are: `rows` of them from p on lie `stride` elements apart (a KVCache:
 * all the rest; a paged block: up to its end). */
template <typename T>
struct Run {
    const T *k, *v;
    int64_t rows, stride;
};

inline float widen(uint16_t b) {  // bfloat16 -> float32
    uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t narrow(float f) {  // float32 -> bfloat16, round to nearest even as PyTorch does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

inline float as_float(float x) { return x; }
inline float as_float(uint16_t x) { return widen(x); }

/* ---- 16 keys at a time (AVX-512): NC = ceil(Dh / 16) vectors a row, the last masked to Dh ---- */
#ifdef LLAMA3_ATTEND_AVX512
inline __m512 load16(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* d[i] = the sum of a[i]'s 16 lanes, for 16 vectors: a transposing tree of adds. */
inline __m512 sum_each(__m512 a[16]) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; i++)  // 128-bit lanes 0,1: row i; 2,3: row i+8
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)  // lanes: rows i, i+8, i+4, i+12
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[i], t[i + 4], 0x88), _mm512_shuffle_f32x4(t[i], t[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)  // each lane: two sums of u[i]'s row, two of u[i+2]'s
        w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[i], u[i + 2], 0x44), _mm512_shuffle_ps(u[i], u[i + 2], 0xEE));
    const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
    // z holds rows 0 2 1 3 | 8 10 9 11 | 4 6 5 7 | 12 14 13 15; put row i in lane i
    const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    return _mm512_permutexvar_ps(order, z);
}

/* scores[i] = q . k_i * scale for n <= 16 rows k_i = k + i * stride. q: NC * 16 floats, zero past Dh. */
template <int NC, typename T>
inline void score_rows(const float *q, const T *k, int64_t stride, int n, __mmask16 tail, float scale,
                       float *scores) {
    __m512 qv[NC], acc[16];
    for (int j = 0; j < NC; j++) qv[j] = _mm512_loadu_ps(q + 16 * j);
    for (int i = 0; i < 16; i++) {
        acc[i] = _mm512_setzero_ps();
        if (i < n)
            for (int j = 0; j < NC; j++)
                acc[i] = _mm512_fmadd_ps(qv[j], load16(k + i * stride + 16 * j, j == NC - 1 ? tail : 0xFFFF), acc[i]);
    }
    const __mmask16 lanes = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    _mm512_mask_storeu_ps(scores, lanes, _mm512_mul_ps(sum_each(acc), _mm512_set1_ps(scale)));
}

/* o += Σ_i e[i] v_i over n rows v_i = v + i * stride (rows whose weight is 0 skipped). o: NC * 16. */
template <int NC, typename T>
inline void add_rows(const float *e, const T *v, int64_t stride, int n, __mmask16 tail, float *o) {
    __m512 acc[NC];
    for (int j = 0; j < NC; j++) acc[j] = _mm512_loadu_ps(o + 16 * j);
    for (int i = 0; i < n; i++) {
        if (e[i] == 0.f) continue;
        const __m512 w = _mm512_set1_ps(e[i]);
        for (int j = 0; j < NC; j++)
            acc[j] = _mm512_fmadd_ps(w, load16(v + i * stride + 16 * j, j == NC - 1 ? tail : 0xFFFF), acc[j]);
    }
    for (int j = 0; j < NC; j++) _mm512_storeu_ps(o + 16 * j, acc[j]);
}
#endif

/* The same without vectors (NC = 0): any Dh. */
template <typename T>
inline void score_rows_plain(const float *q, const T *k, int64_t stride, int n, int64_t Dh, float scale,
                             float *scores) {
    for (int i = 0; i < n; i++) {
        float s = 0.f;
        const T *row = k + i * stride;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < Dh; d++) s += q[d] * as_float(row[d]);
        scores[i] = s * scale;
    }
}
template <typename T>
inline void add_rows_plain(const float *e, const T *v, int64_t stride, int n, int64_t Dh, float *o) {
    for (int i = 0; i < n; i++) {
        if (e[i] == 0.f) continue;
        const T *row = v + i * stride;
        const float w = e[i];
#pragma omp simd
        for (int64_t d = 0; d < Dh; d++) o[d] += w * as_float(row[d]);
    }
}

/* Asks for the next tile's rows when they do not follow this tile's in memory (the next paged
 * block): the hardware's prefetcher follows a stream but not a jump to another page.  Into L2
 * (prefetcht2), one tile ahead: at 1000 positions of SmolLM2 (one thread, 30 layers, blocks of 16
 * in shuffled order) a paged step took 6.3-6.9 ms without it, 3.7-3.8 ms with it (a contiguous
 * KVCache: 3.4-3.8); into L1 (prefetcht0) or two tiles ahead was no better than none. */
template <typename T, typename RunAt>
inline void ahead(const Run<T> &run, int rows, int64_t p, int64_t end, int64_t Dh, const RunAt &run_at, bool keys) {
    if (p + rows >= end) return;
    const Run<T> next = run_at(p + rows);
    const T *now = keys ? run.k : run.v, *then = keys ? next.k : next.v;
    if (then == now + rows * run.stride) return;  // a stream: the hardware's
    const int64_t n = std::min<int64_t>({16, next.rows, end - p - rows});
    for (int64_t i = 0; i < n; i++) {
        const char *row = (const char *)(then + i * next.stride);
        for (int64_t b = 0; b < Dh * (int64_t)sizeof(T); b += 64) {
#if defined(__x86_64__)  // GCC 12 -O2 deletes __builtin_prefetch in this loop (nothing else happens in it)
            asm volatile("prefetcht2 %0" : : "m"(*(row + b)));
#else
            __builtin_prefetch(row + b, 0, 1);
#endif
        }
    }
}

/* One job: n_rep query heads q [n_rep][W] (W = padded Dh, zero past Dh) over positions
 * [begin, end) of their kv head; -> per head its top score, Σ exp(s - top) and the unnormalised
 * o [n_rep][W] = Σ exp(s - top) v.  visible: nullptr, or whether each position may be seen. */
template <int NC, typename T, typename RunAt>
void span(const float *q, int64_t n_rep, int64_t Dh, int64_t W, float scale, int64_t begin, int64_t end,
          const bool *visible, const RunAt &run_at, float *scores, float *top, float *total, float *o) {
    const int64_t n = end - begin;
#ifdef LLAMA3_ATTEND_AVX512
    const __mmask16 tail = Dh % 16 ? (__mmask16)((1u << (Dh % 16)) - 1) : (__mmask16)0xFFFF;
#endif
    for (int64_t p = begin; p < end;) {  // scores, 16 rows (or a run's end) at a time
        const Run<T> run = run_at(p);
        const int rows = (int)std::min<int64_t>({16, run.rows, end - p});
        ahead(run, rows, p, end, Dh, run_at, true);
        for (int64_t r = 0; r < n_rep; r++) {
            float *s = scores + r * n + (p - begin);
            if constexpr (NC > 0) {
#ifdef LLAMA3_ATTEND_AVX512
                score_rows<NC>(q + r * W, run.k, run.stride, rows, tail, scale, s);
#endif
            } else {
                score_rows_plain(q + r * W, run.k, run.stride, rows, Dh, scale, s);
            }
            if (visible)
                for (int i = 0; i < rows; i++)
                    if (!visible[p + i]) s[i] = -INFINITY;
        }
        p += rows;
    }
    for (int64_t r = 0; r < n_rep; r++) {  // exp(s - top), their sum
        float *s = scores + r * n, best = -INFINITY;
        for (int64_t i = 0; i < n; i++) best = s[i] > best ? s[i] : best;
        top[r] = best;
        if (best == -INFINITY) {  // every key of the span hidden: it adds nothing to the join
            std::fill(s, s + n, 0.f);
            total[r] = 0.f;
        } else {
            total[r] = llama3_softmax::exp_and_sum(s, n, best);
        }
        std::fill(o + r * W, o + (r + 1) * W, 0.f);
    }
    for (int64_t p = begin; p < end;) {  // Σ exp(s - top) v, 16 rows at a time
        const Run<T> run = run_at(p);
        const int rows = (int)std::min<int64_t>({16, run.rows, end - p});
        ahead(run, rows, p, end, Dh, run_at, false);
        for (int64_t r = 0; r < n_rep; r++) {
            const float *e = scores + r * n + (p - begin);
            if constexpr (NC > 0) {
#ifdef LLAMA3_ATTEND_AVX512
                add_rows<NC>(e, run.v, run.stride, rows, tail, o + r * W);
#endif
            } else {
                add_rows_plain(e, run.v, run.stride, rows, Dh, o + r * W);
            }
        }
        p += rows;
    }
}

/* Every query t (of T_) over the positions it sees, its H heads in kv-head groups.
 *   q, out     [T_, H, Dh] contiguous, float32 or bfloat16 (q16: both bfloat16)
 *   keys.seen(t)       how many positions query t sees (0..seen-1)
 *   keys.visible(t)    nullptr or bool [seen] (false: hidden from t)
 *   keys.run(t, g, p)  Run<T> of kv head g's rows from position p
 */
template <typename T, typename Keys>
void attend_queries(const void *qp, bool q16, void *op, int64_t T_, int64_t H, int64_t Hkv, int64_t Dh,
                    const Keys &keys) {
    const int64_t n_rep = H / Hkv;
    const float scale = 1.f / std::sqrt((float)Dh);
    int nc = 0;  // vectors a row, 0: plain loops
#ifdef LLAMA3_ATTEND_AVX512
    if (Dh <= 128) nc = (int)((Dh + 15) / 16);
#endif
    const int64_t W = nc ? 16 * nc : Dh;
    struct Job {
        int64_t t, g, begin, end, part;  // part: where its partial answer goes (-1: straight to out)
    };
    thread_local std::vector<Job> jobs;
    thread_local std::vector<float> parts;  // per split job: n_rep x (top, total, o[W])
    jobs.clear();
    int64_t n_parts = 0, work = 0;
    for (int64_t t = 0; t < T_; t++) {
        const int64_t seen = keys.seen(t), spans = std::max<int64_t>(1, (seen + SPAN - 1) / SPAN);
        for (int64_t g = 0; g < Hkv; g++)
            for (int64_t c = 0; c < spans; c++)
                jobs.push_back({t, g, c * SPAN, std::min(seen, (c + 1) * SPAN), spans > 1 ? n_parts++ : -1});
        work += seen * Hkv;
    }
    const int64_t part_size = n_rep * (W + 2);
    if ((int64_t)parts.size() < n_parts * part_size) parts.resize(n_parts * part_size);
    float *part_p = parts.data();
    // Each thread gets at least MIN_WORK multiply-adds: a step over a short context is a few
    // microseconds of work, less than waking the pool (and a descheduled worker would stall it).
    const int64_t MIN_WORK = 1 << 16, per_job = (work / (int64_t)jobs.size() + 1) * n_rep * 2 * Dh;
    const Job *job_p = jobs.data();
    llama3_threads::parallel_for(0, (int64_t)jobs.size(), std::max<int64_t>(1, MIN_WORK / per_job),
                                 [&](int64_t first, int64_t last) {
        thread_local std::vector<float> q_buffer, o_buffer, scores, tops, totals;
        q_buffer.resize(n_rep * W);
        o_buffer.resize(n_rep * W);
        tops.resize(n_rep);
        totals.resize(n_rep);
        if ((int64_t)scores.size() < n_rep * SPAN) scores.resize(n_rep * SPAN);
        float *top = tops.data(), *total = totals.data();
        for (int64_t j = first; j < last; j++) {
            const Job &job = job_p[j];
            const int64_t head0 = job.t * H + job.g * n_rep;  // the group's first (t, h) row
            for (int64_t r = 0; r < n_rep; r++) {
                float *qw = q_buffer.data() + r * W;
                for (int64_t d = 0; d < Dh; d++)
                    qw[d] = q16 ? widen(((const uint16_t *)qp)[(head0 + r) * Dh + d])
                                : ((const float *)qp)[(head0 + r) * Dh + d];
                std::fill(qw + Dh, qw + W, 0.f);
            }
            const int64_t t = job.t, g = job.g;
            auto run_at = [&](int64_t p) { return keys.run(t, g, p); };
            float *o = o_buffer.data();
            const bool *visible = keys.visible(t);
            switch (nc) {
#define LLAMA3_SPAN(N) \
    case N: span<N, T>(q_buffer.data(), n_rep, Dh, W, scale, job.begin, job.end, visible, run_at, scores.data(), top, total, o); break;
                LLAMA3_SPAN(1) LLAMA3_SPAN(2) LLAMA3_SPAN(3) LLAMA3_SPAN(4)
                LLAMA3_SPAN(5) LLAMA3_SPAN(6) LLAMA3_SPAN(7) LLAMA3_SPAN(8)
#undef LLAMA3_SPAN
                default: span<0, T>(q_buffer.data(), n_rep, Dh, W, scale, job.begin, job.end, visible, run_at,
                                    scores.data(), top, total, o);
            }
            for (int64_t r = 0; r < n_rep; r++) {
                if (job.part >= 0) {  // one span of several: kept for the join below
                    float *keep = part_p + job.part * part_size + r * (W + 2);
                    keep[0] = top[r], keep[1] = total[r];
                    std::memcpy(keep + 2, o + r * W, W * sizeof(float));
                    continue;
                }
                const float inverse = 1.f / total[r];
                const int64_t at = (head0 + r) * Dh;
                for (int64_t d = 0; d < Dh; d++) {
                    const float x = o[r * W + d] * inverse;
                    if (q16) ((uint16_t *)op)[at + d] = narrow(x);
                    else ((float *)op)[at + d] = x;
                }
            }
        }
    });
    if (!n_parts) return;
    // Join the spans of each (query, head): their maxima to the largest, their sums and answers scaled to it.
    std::vector<float> joined(W);
    for (size_t j = 0; j < jobs.size();) {
        const Job &first = jobs[j];
        if (first.part < 0) { j++; continue; }
        size_t after = j;
        while (after < jobs.size() && jobs[after].t == first.t && jobs[after].g == first.g) after++;
        for (int64_t r = 0; r < n_rep; r++) {
            float best = -INFINITY;
            for (size_t c = j; c < after; c++) best = std::max(best, part_p[jobs[c].part * part_size + r * (W + 2)]);
            float sum = 0.f;
            std::fill(joined.begin(), joined.end(), 0.f);
            for (size_t c = j; c < after; c++) {
                const float *keep = part_p + jobs[c].part * part_size + r * (W + 2);
                const float weight = keep[0] == -INFINITY ? 0.f : std::exp(keep[0] - best);
                sum += weight * keep[1];
                for (int64_t d = 0; d < Dh; d++) joined[d] += weight * keep[2 + d];
            }
            const float inverse = 1.f / sum;
            const int64_t at = (first.t * H + first.g * n_rep + r) * Dh;
            for (int64_t d = 0; d < Dh; d++) {
                const float x = joined[d] * inverse;
                if (q16) ((uint16_t *)op)[at + d] = narrow(x);
                else ((float *)op)[at + d] = x;
            }
        }
        j = after;
    }
}

}  // namespace llama3_attend
