/* A recorded decoding step's layer over a KVCache in one operator call (torch.ops.llama3.store_attend):
 * llama3/fast/graph.py's `_Slots.attend`, which model.py's Attention calls as `cache.attend`.
 *
 *   store_attend(q, keys, values, k, v, slot, visible) -> [B, 1, H, Dh] in q's dtype
 *
 *   q        [B, 1, H, Dh]      the new token's queries, tokens first as model.py projects them
 *   keys,    [B, Hkv, L, Dh]    one layer of the cache (KVCache.layers' views: the last dimension
 *   values                      contiguous), float32 or bfloat16
 *   k, v     [B, 1, Hkv, Dh]    the new key and value (any strides, float32 or bfloat16)
 *   slot     int64 [1]          the position they are written at, 0 <= slot < L
 *   visible  None or bool [B or 1, 1, 1, L]: the slots each row may see
 *
 * k, v are written at `slot` in the cache's type (bfloat16 rounded to nearest even, as Tensor.to),
 * then kernels.cpp's `attend` runs over keys 0..slot, the mask cut to the same slots: what the
 * eager step does (KVCache.update returns keys 0..start_pos, the attention slot attends over them),
 * so a replayed step is the eager one bit for bit.  The record held, for each layer, two index_copy_
 * and the four transposes around them and the attention; this is one call (the views below are C++
 * calls, not operators the record's interpreter replays).
 */
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>

#ifndef LLAMA3_NS
#define LLAMA3_NS llama3
#endif
#define LLAMA3_STR2(x) #x
#define LLAMA3_STR(x) LLAMA3_STR2(x)

namespace {

bool is_float(const at::Tensor &t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; }

/* cache[b, h, slot, :] = fresh[b, 0, h, :] for every row b and head h, in the cache's type. */
void store(at::Tensor &cache, const at::Tensor &fresh, int64_t slot) {
    const int64_t B = cache.size(0), Hkv = cache.size(1), Dh = cache.size(3);
    const int64_t cb = cache.stride(0), ch = cache.stride(1), cs = cache.stride(2);
    const int64_t fb = fresh.stride(0), fh = fresh.stride(2), fd = fresh.stride(3);
    const bool to16 = cache.scalar_type() == at::kBFloat16, from16 = fresh.scalar_type() == at::kBFloat16;
    const char *src = (const char *)fresh.data_ptr();
    char *dst = (char *)cache.data_ptr();
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t from = b * fb + h * fh, to = b * cb + h * ch + slot * cs;
            for (int64_t d = 0; d < Dh; d++) {
                const float x = from16 ? (float)((const c10::BFloat16 *)src)[from + d * fd]
                                       : ((const float *)src)[from + d * fd];
                if (to16) ((c10::BFloat16 *)dst)[to + d] = c10::BFloat16(x);
                else ((float *)dst)[to + d] = x;
            }
        }
}

at::Tensor store_attend(const at::Tensor &q, at::Tensor &keys, at::Tensor &values, const at::Tensor &k,
                        const at::Tensor &v, const at::Tensor &slot, const c10::optional<at::Tensor> &visible) {
    TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && keys.scalar_type() == values.scalar_type() &&
                    is_float(keys) && keys.stride(3) == 1 && values.stride(3) == 1,
                "store_attend: keys and values [B, Hkv, L, Dh], float32 or bfloat16, rows contiguous");
    const int64_t B = keys.size(0), Hkv = keys.size(1), L = keys.size(2), Dh = keys.size(3);
    TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == 1 && k.size(2) == Hkv &&
                    k.size(3) == Dh && is_float(k) && is_float(v),
                "store_attend: k and v [B, 1, Hkv, Dh] as the cache's, float32 or bfloat16; got ", k.sizes(),
                " for a cache ", keys.sizes());
    TORCH_CHECK(q.dim() == 4 && q.size(0) == B && q.size(1) == 1 && q.size(3) == Dh && q.size(2) % Hkv == 0,
                "store_attend: q [B, 1, H, Dh] with H a multiple of the cache's ", Hkv, " heads; got ", q.sizes());
    TORCH_CHECK(slot.scalar_type() == at::kLong && slot.numel() == 1 && slot.device().is_cpu(),
                "store_attend: slot is one int64 on the CPU");
    const int64_t at_slot = *slot.data_ptr<int64_t>();
    TORCH_CHECK(at_slot >= 0 && at_slot < L, "store_attend: slot ", at_slot, " is outside the cache's ", L,
                " positions");
    c10::optional<at::Tensor> seen;
    if (visible.has_value()) {
        TORCH_CHECK(visible->size(-1) == L && (visible->size(0) == 1 || visible->size(0) == B) &&
                        visible->numel() == visible->size(0) * L,
                    "store_attend: visible is [B or 1, 1, 1, L] over the cache's ", L, " slots; got ",
                    visible->sizes());
        seen = visible->narrow(-1, 0, at_slot + 1);
    }
    store(keys, k, at_slot);
    store(values, v, at_slot);
    static const auto attend = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow(LLAMA3_STR(LLAMA3_NS) "::attend", "")
                                   .typed<at::Tensor(const at::Tensor &, const at::Tensor &, const at::Tensor &,
                                                     const c10::optional<at::Tensor> &)>();
    const at::Tensor out = attend.call(q.transpose(1, 2), keys.narrow(2, 0, at_slot + 1),
                                       values.narrow(2, 0, at_slot + 1), seen);  // [B, H, 1, Dh]
    return out.transpose(1, 2);                                                 // [B, 1, H, Dh]: the same bytes
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(LLAMA3_NS, m) {
    m.def("store_attend(Tensor q, Tensor(a!) keys, Tensor(b!) values, Tensor k, Tensor v, Tensor slot, "
          "Tensor? visible) -> Tensor");
}

TORCH_LIBRARY_IMPL(LLAMA3_NS, CPU, m) { m.impl("store_attend", TORCH_FN(store_attend)); }
