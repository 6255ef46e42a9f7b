/* exp(s - top) over a row of attention scores, in place, and their sum: the softmax's middle step,
 * shared by kernels.cpp's attend and paged_attention.cpp.
 *
 * Why not std::exp in the loop: the compiler cannot vectorise it (glibc's vector expf is declared
 * only under -ffast-math), and a decoding step of SmolLM2 at a few hundred positions takes ~40k of
 * them.  With AVX-512: Cephes' expf (exp(x) = 2^n exp(r), |r| <= ln2/2, a degree-6 polynomial for
 * exp(r), within ~2 float32 ulps of std::exp), 16 at a time; a masked score (-inf) and anything
 * below -87.3 (where float32's exp is at most its smallest normal) give exactly 0, as std::exp
 * gives 0 (or a subnormal) there.  Elsewhere (or -DLLAMA3_PLAIN_C) std::exp.
 */
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) && !defined(LLAMA3_PLAIN_C)
#include <immintrin.h>
#endif

namespace llama3_softmax {

#if defined(__AVX512F__) && !defined(LLAMA3_PLAIN_C)
/* exp(x), 16 lanes; 0 where x < -87.3 or outside `lanes` (also used by kernels.cpp's silu_mul). */
inline __m512 exp16(__m512 x, __mmask16 lanes) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), ln2_hi = _mm512_set1_ps(0.693359375f),
                 ln2_lo = _mm512_set1_ps(-2.12194440e-4f), floor_x = _mm512_set1_ps(-87.3f), one = _mm512_set1_ps(1.f);
    const __mmask16 live = _mm512_mask_cmp_ps_mask(lanes, x, floor_x, _CMP_GE_OQ);
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(k, ln2_lo, _mm512_fnmadd_ps(k, ln2_hi, x));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, one));
    return _mm512_maskz_scalef_ps(live, y, k);  // y 2^k; 0 where masked or below the floor
}
#endif

inline float exp_and_sum(float *scores, int64_t n, float top) {
    float total = 0.f;
    int64_t i = 0;
#if defined(__AVX512F__) && !defined(LLAMA3_PLAIN_C)
    const __m512 top_v = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (; i < n; i += 16) {
        const __mmask16 lanes = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, scores + i), top_v), lanes);
        _mm512_mask_storeu_ps(scores + i, lanes, e);
        sum = _mm512_add_ps(sum, e);
    }
    total = _mm512_reduce_add_ps(sum);
#else
    for (; i < n; i++) total += (scores[i] = std::exp(scores[i] - top));
#endif
    return total;
}

}  // namespace llama3_softmax
