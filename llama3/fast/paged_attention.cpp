/* Attention over the engine's paged KV cache, read in place (torch.ops.llama3.paged_attend).
 * See llama3/engine/paged_cache.py, which calls it, and its pure-PyTorch twin `paged_attention_torch`.
 *
 *   paged_attend(q, k_cache, v_cache, tables, query_row, query_pos, block_size) -> [T, H, Dh]
 *   paged_store_attend(q, k_cache, v_cache, k, v, write_block, write_offset, tables, query_row,
 *                      query_pos, block_size)   the same after writing k, v [1, N, Hkv, Dh] at their
 *                      slots, for q [1, N, H, Dh] -> [1, N, H, Dh] (tokens first, as model.py hands them)
 *
 *   q          [T, H, Dh]          the step's new queries, side by side (any float type)
 *   k_cache,   [n_blocks, Hkv, block_size, Dh]   one layer of the block pool, float32 or bfloat16:
 *   v_cache                        each head's positions in a block contiguous (strides [.., .., Dh, 1]);
 *                                  blocks and heads any strides, the same for both (the engine's pool is
 *                                  head-major, a view of [Hkv, n_blocks, block_size, Dh]: see paged_cache.py)
 *   tables     int64 [R, M]        row r's block table (its blocks in position order; padding unused)
 *   query_row  int64 [T]           which row (sequence) query t belongs to
 *   query_pos  int64 [T]           its position: it sees keys 0..query_pos[t] of its own row
 *
 * Query t, head h reads key/value head h / (H / Hkv) (grouped-query heads share it, no copies),
 * block by block through its row's table: softmax(q kᵀ / √Dh) v over the keys it may see.  So
 * rows of different lengths, prompt chunks and single decoding tokens all go in one call, and
 * no key is gathered or copied.  Float32 inside; the loop itself (kv-head groups, spans of a long
 * context over the kernels' threads) is attend_core.h's, as kernels.cpp's attend runs it.
 */
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifndef LLAMA3_NS
#define LLAMA3_NS llama3
#endif

#include "attend_core.h"  // the attention loop itself, shared with kernels.cpp's attend

namespace {

using llama3_attend::narrow;
using llama3_attend::widen;

/* A pool layer [n_blocks, Hkv, block_size, Dh] whose (block, head) rows are contiguous: strides
 * [any, any, Dh, 1] (contiguous, or the engine's head-major view). */
bool rows_contiguous(const at::Tensor &cache) {
    return cache.dim() == 4 && cache.stride(3) == 1 && cache.stride(2) == cache.size(3);
}

/* Queries over their rows' blocks: position p of row r is at offset p % block_size of block
 * tables[r, p / block_size]; there each kv head's block_size rows are contiguous, kv head g of
 * block b at b * block_stride + g * head_stride. */
template <typename T>
struct PagedKeys {
    const T *k, *v;
    const int64_t *tables, *rows, *positions;
    int64_t table_width, block_size, block_stride, head_stride, Dh;
    int64_t seen(int64_t t) const { return positions[t] + 1; }  // keys 0..position
    const bool *visible(int64_t) const { return nullptr; }
    llama3_attend::Run<T> run(int64_t t, int64_t g, int64_t p) const {
        const int64_t block = tables[rows[t] * table_width + p / block_size], offset = p % block_size;
        const int64_t at = block * block_stride + g * head_stride + offset * Dh;
        return {k + at, v + at, block_size - offset, Dh};
    }
};

/* q and the answer float32, or both bfloat16 (q16): a bf16 model's queries are read, and its
 * answer written, here (converting through ATen cost two operator calls a layer). */
template <typename T>
void attend_all(const void *qp, bool q16, const T *kp, const T *vp, const int64_t *tables, int64_t table_width,
                const int64_t *rows, const int64_t *positions, void *op, int64_t T_, int64_t H, int64_t Hkv,
                int64_t Dh, int64_t block_size, int64_t block_stride, int64_t head_stride) {
    const PagedKeys<T> keys{kp, vp, tables, rows, positions, table_width, block_size, block_stride, head_stride, Dh};
    llama3_attend::attend_queries<T>(qp, q16, op, T_, H, Hkv, Dh, keys);
}

at::Tensor paged_attend(const at::Tensor &q, const at::Tensor &k_cache, const at::Tensor &v_cache,
                        const at::Tensor &tables, const at::Tensor &query_row, const at::Tensor &query_pos,
                        int64_t block_size) {
    TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
                "paged_attend: q [T, H, Dh], k_cache and v_cache [n_blocks, Hkv, block_size, Dh]");
    const int64_t T_ = q.size(0), H = q.size(1), Dh = q.size(2), Hkv = k_cache.size(1);
    TORCH_CHECK(k_cache.size(3) == Dh && k_cache.size(2) == block_size && H % Hkv == 0 && block_size > 0,
                "paged_attend: head or block sizes do not match");
    TORCH_CHECK(rows_contiguous(k_cache) && k_cache.strides() == v_cache.strides() &&
                    k_cache.scalar_type() == v_cache.scalar_type(),
                "paged_attend: a cache layer whose blocks hold each head's rows contiguously, keys and values "
                "of one type and layout");
    const bool bf16 = k_cache.scalar_type() == at::kBFloat16;
    TORCH_CHECK(bf16 || k_cache.scalar_type() == at::kFloat, "paged_attend: a float32 or bfloat16 cache");
    TORCH_CHECK(tables.scalar_type() == at::kLong && query_row.scalar_type() == at::kLong &&
                    query_pos.scalar_type() == at::kLong && tables.dim() == 2 && query_row.numel() == T_ &&
                    query_pos.numel() == T_,
                "paged_attend: int64 tables [R, M], query_row [T], query_pos [T]");
    const bool q16 = q.scalar_type() == at::kBFloat16;
    at::Tensor qf = q16 || q.scalar_type() == at::kFloat ? q : q.to(at::kFloat);
    if (!qf.is_contiguous()) qf = qf.contiguous();
    at::Tensor tab = tables.contiguous(), rows = query_row.contiguous(), pos = query_pos.contiguous();
    const int64_t *row_p = rows.data_ptr<int64_t>(), *pos_p = pos.data_ptr<int64_t>();
    const int64_t R = tab.size(0), M = tab.size(1), n_blocks = k_cache.size(0);
    const int64_t *tab_p = tab.data_ptr<int64_t>();
    for (int64_t t = 0; t < T_; t++) {  // every slot read must be inside the pool
        TORCH_CHECK(row_p[t] >= 0 && row_p[t] < R && pos_p[t] >= 0 && pos_p[t] / block_size < M,
                    "paged_attend: query ", t, " is outside its block table");
        for (int64_t b = 0; b <= pos_p[t] / block_size; b++) {
            const int64_t block = tab_p[row_p[t] * M + b];
            TORCH_CHECK(block >= 0 && block < n_blocks, "paged_attend: block ", block,
                        " is outside the pool");
        }
    }
    at::Tensor out = at::empty({T_, H, Dh}, qf.options());
    if (bf16)
        attend_all<uint16_t>(qf.data_ptr(), q16, (const uint16_t *)k_cache.data_ptr(),
                             (const uint16_t *)v_cache.data_ptr(), tab_p, M, row_p, pos_p, out.data_ptr(), T_, H, Hkv,
                             Dh, block_size, k_cache.stride(0), k_cache.stride(1));
    else
        attend_all<float>(qf.data_ptr(), q16, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tab_p, M, row_p,
                          pos_p, out.data_ptr(), T_, H, Hkv, Dh, block_size, k_cache.stride(0), k_cache.stride(1));
    return q16 || q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}

/* Writes new [1, N, Hkv, Dh] (any strides, float32 or bfloat16) into cache [n_blocks, Hkv,
 * block_size, Dh] (rows_contiguous) at (write_block[n], write_offset[n]) for each token n, in the cache's type
 * (bfloat16 rounded to nearest even, as Tensor.to). */
void store(at::Tensor &cache, const at::Tensor &fresh, const int64_t *blocks, const int64_t *offsets) {
    const int64_t Hkv = cache.size(1), Dh = cache.size(3), N = fresh.size(1);
    const int64_t sb = cache.stride(0), sg = cache.stride(1);
    const int64_t sn = fresh.stride(1), sh = fresh.stride(2), sd = fresh.stride(3);
    const bool to16 = cache.scalar_type() == at::kBFloat16, from16 = fresh.scalar_type() == at::kBFloat16;
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t dst = blocks[n] * sb + h * sg + offsets[n] * Dh, src = h * sh + n * sn;
            for (int64_t d = 0; d < Dh; d++) {
                const float x = from16 ? widen(((const uint16_t *)fresh.data_ptr())[src + d * sd])
                                       : ((const float *)fresh.data_ptr())[src + d * sd];
                if (to16) ((uint16_t *)cache.data_ptr())[dst + d] = narrow(x);
                else ((float *)cache.data_ptr())[dst + d] = x;
            }
        }
}

/* One call for a recorded decoding step's layer: store the new keys and values k, v [1, N, Hkv, Dh]
 * at their slots, then paged_attend the queries q [1, N, H, Dh] -> [1, N, H, Dh] (the trace of a step
 * held, for each layer, two index_put_ and the selects, transposes and casts feeding them: ~6
 * operator calls a block; then the select, transposes and unsqueeze around the call and
 * model.py's: 7 more). */
at::Tensor paged_store_attend(const at::Tensor &q, at::Tensor &k_cache, at::Tensor &v_cache, const at::Tensor &k,
                              const at::Tensor &v, const at::Tensor &write_block, const at::Tensor &write_offset,
                              const at::Tensor &tables, const at::Tensor &query_row, const at::Tensor &query_pos,
                              int64_t block_size) {
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && rows_contiguous(k_cache) &&
                    k_cache.strides() == v_cache.strides() && k_cache.scalar_type() == v_cache.scalar_type() &&
                    (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16),
                "paged_store_attend: float32 or bfloat16 caches [n_blocks, Hkv, block_size, Dh], each head's rows "
                "of a block contiguous");
    TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == 1 && k.size(2) == k_cache.size(1) &&
                    k.size(3) == k_cache.size(3) && k.scalar_type() == v.scalar_type() &&
                    (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
                "paged_store_attend: k, v [1, N, Hkv, Dh], float32 or bfloat16");
    TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && q.size(1) == k.size(1),
                "paged_store_attend: q [1, N, H, Dh], one query per new key");
    const int64_t N = k.size(1), n_blocks = k_cache.size(0);
    TORCH_CHECK(write_block.scalar_type() == at::kLong && write_offset.scalar_type() == at::kLong &&
                    write_block.numel() == N && write_offset.numel() == N,
                "paged_store_attend: int64 write_block [N], write_offset [N]");
    at::Tensor blocks = write_block.contiguous(), offsets = write_offset.contiguous();
    const int64_t *b = blocks.data_ptr<int64_t>(), *o = offsets.data_ptr<int64_t>();
    for (int64_t n = 0; n < N; n++)
        TORCH_CHECK(b[n] >= 0 && b[n] < n_blocks && o[n] >= 0 && o[n] < k_cache.size(2),
                    "paged_store_attend: slot ", n, " is outside the pool");
    store(k_cache, k, b, o);
    store(v_cache, v, b, o);
    return paged_attend(q[0], k_cache, v_cache, tables, query_row, query_pos, block_size).unsqueeze(0);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(LLAMA3_NS, m) {
    m.def("paged_attend(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor query_row, "
          "Tensor query_pos, int block_size) -> Tensor");
    m.def("paged_store_attend(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
          "Tensor write_block, Tensor write_offset, Tensor tables, Tensor query_row, Tensor query_pos, "
          "int block_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(LLAMA3_NS, CPU, m) {
    m.impl("paged_attend", TORCH_FN(paged_attend));
    m.impl("paged_store_attend", TORCH_FN(paged_store_attend));
}
