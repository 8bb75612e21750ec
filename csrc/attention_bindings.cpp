// pybind11 bindings of the fused attention family (see csrc/bindings.h).
//
// Each entry point takes its tensors as TensorViews (csrc/tensor_view.h), by name, and the
// problem's options as one AttentionOptions (named fields, all required). The bindings check
// every view against q (shapes, dtypes, devices, strides) and fill the kernels' Params: a
// missing, swapped or mis-shaped tensor raises here instead of reaching a kernel.
#include <pybind11/pybind11.h>

#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "attention.h"
#include "attention_cpu.h"
#include "bindings.h"
#include "common.h"
#include "tensor_view.h"

namespace py = pybind11;
using namespace genfast;

namespace {

// What a call's signature fixes (genfast/ops/attention.py builds one per signature).
struct AttentionOptions {
  double scale = 1.0;               // applied to q.k before the softmax (already resolved, never NaN)
  double softcap = 0.0;             // > 0: scores become softcap * tanh(scores / softcap)
  int64_t window_left = -1;         // keys at most this far left of the query's diagonal; -1: unbounded
  int64_t window_right = -1;        // ... right of it; 0 with window_left -1: causal
  bool align_bottom_right = false;  // the diagonal ends at the last key (flash-attn), not the first (SDPA)
  double dropout_p = 0.0;           // CPU only (the CUDA kernels have no dropout)
  bool seq_first = false;           // CPU forward: q, k, v and out come as (B, S, H, D), flash-attn's layout,
                                    // instead of (B, H, S, D) (no transposed views, no copy of out)
};

// A tensor of the call as the kernels index it, (B, H, S, D): with seq_first, dims 1 and 2 swap.
TensorView heads_first(const TensorView& t, const AttentionOptions& o) {
  if (!o.seq_first || !t.present || t.ndim != 4) return t;
  TensorView v = t;
  std::swap(v.shape[1], v.shape[2]);
  std::swap(v.strides[1], v.strides[2]);
  return v;
}

// The backward writes dq, dk, dv densely in (B, H, S, D), and so do the CUDA kernels write out.
void no_seq_first(const char* fn, const AttentionOptions& o) {
  if (o.seq_first)
    fail_value(fn, "seq_first is an option of the CPU forward only; this entry point takes (B, H, S, D) tensors");
}

// CUDA launch shape: varlen grid bounds, GQA packing and split-KV decode.
struct AttentionCudaLaunch {
  int64_t max_seqlen_q = 0;  // varlen: the longest query / key sequence (size the grids)
  int64_t max_seqlen_k = 0;
  bool pack_gqa = false;  // the H / Hk query heads of one key head share a block
  int num_splits = 1;     // > 1: keys split into chunks (out_partial / lse_partial workspaces)
};

// Decode: where each batch row's keys live (attention::Params leftpad_k / kv_batch_idx /
// block_table). All absent for every other call.
struct CacheIndex {
  TensorView cache_leftpad, cache_batch_idx, block_table;
  bool any() const { return cache_leftpad.present || cache_batch_idx.present || block_table.present; }
};

// The common part of every entry: q, k, v and the optional inputs, checked, into Params.
attention::Params make_params(const char* fn, const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView& alibi, const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_k,
                              const TensorView& seqused_k, const AttentionOptions& o,
                              const CacheIndex& cache = CacheIndex{}) {
  expect_float_dtype(fn, "q", q);
  expect_ndim(fn, "q", q, 4);
  expect_ndim(fn, "k", k, 4);
  expect_ndim(fn, "v", v, 4);
  for (auto [name, t] : {std::pair<const char*, const TensorView*>{"k", &k}, {"v", &v}}) {
    expect_dtype(fn, name, *t, q.dtype);
    expect_same_device(fn, name, *t, q);
    expect_unit_last_stride(fn, name, *t);
  }
  expect_unit_last_stride(fn, "q", q);
  expect_same_shape(fn, "v", v, "k", k);
  attention::Params p;
  p.dtype = q.dtype;
  p.B = q.size(0);
  p.H = q.size(1);
  p.Sq = q.size(2);
  p.D = q.size(3);
  p.Hk = k.size(1);
  p.Sk = k.size(2);
  // A paged cache or cache_batch_idx: k's first dim is the pool (blocks / cache rows), not B.
  const bool pooled = cache.block_table.present || cache.cache_batch_idx.present;
  if ((!pooled && k.size(0) != p.B) || k.size(3) != p.D)
    fail_value(fn, "k must have shape (" + std::string(pooled ? "pool" : std::to_string(p.B)) + ", Hk, Sk, " +
                       std::to_string(p.D) + ") to match q " + describe(q) + ", got " + describe(k));
  if (p.Hk < 1 || p.H % p.Hk != 0)
    fail_value(fn, "the query heads (" + std::to_string(p.H) + ") must be a multiple of the key heads (" +
                       std::to_string(p.Hk) + ")");
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.q_ss = q.stride(2);
  p.k_sb = k.stride(0);
  p.k_sh = k.stride(1);
  p.k_ss = k.stride(2);
  p.v_sb = v.stride(0);
  p.v_sh = v.stride(1);
  p.v_ss = v.stride(2);
  if (cu_seqlens_q.present != cu_seqlens_k.present) fail_value(fn, "cu_seqlens_q and cu_seqlens_k go together");
  if (cu_seqlens_q.present) {
    if (p.B != 1) fail_value(fn, "varlen problems have batch 1 (sequences packed along Sq), got q " + describe(q));
    for (auto [name, t] :
         {std::pair<const char*, const TensorView*>{"cu_seqlens_q", &cu_seqlens_q}, {"cu_seqlens_k", &cu_seqlens_k}}) {
      expect_dtype(fn, name, *t, I32);
      expect_ndim(fn, name, *t, 1);
      expect_contiguous(fn, name, *t);
      expect_same_device(fn, name, *t, q);
    }
    expect_same_shape(fn, "cu_seqlens_k", cu_seqlens_k, "cu_seqlens_q", cu_seqlens_q);
    if (cu_seqlens_q.size(0) < 1) fail_value(fn, "cu_seqlens_q must have at least one entry");
    p.cu_q = cu_seqlens_q.ptr<const int32_t>();
    p.cu_k = cu_seqlens_k.ptr<const int32_t>();
    p.nseq = cu_seqlens_q.size(0) - 1;
  }
  if (seqused_k.present) {
    expect_dtype(fn, "seqused_k", seqused_k, I32);
    expect_shape(fn, "seqused_k", seqused_k, {p.B});
    expect_contiguous(fn, "seqused_k", seqused_k);
    expect_same_device(fn, "seqused_k", seqused_k, q);
    p.seqused_k = seqused_k.ptr<const int32_t>();
  }
  if (cache.any()) {
    if (!seqused_k.present || cu_seqlens_q.present)
      fail_value(fn,
                 "cache_leftpad, cache_batch_idx and block_table are decode inputs: they need seqused_k and no "
                 "cu_seqlens");
    if (cache.block_table.present && cache.cache_batch_idx.present)
      fail_value(fn, "a paged cache (block_table) takes no cache_batch_idx: the table already maps rows to blocks");
    for (auto [name, t] : {std::pair<const char*, const TensorView*>{"cache_leftpad", &cache.cache_leftpad},
                           {"cache_batch_idx", &cache.cache_batch_idx}}) {
      if (!t->present) continue;
      expect_dtype(fn, name, *t, I32);
      expect_shape(fn, name, *t, {p.B});
      expect_contiguous(fn, name, *t);
      expect_same_device(fn, name, *t, q);
    }
    p.leftpad_k = cache.cache_leftpad.present ? cache.cache_leftpad.ptr<const int32_t>() : nullptr;
    p.kv_batch_idx = cache.cache_batch_idx.present ? cache.cache_batch_idx.ptr<const int32_t>() : nullptr;
    p.num_blocks = k.size(0);
    if (cache.block_table.present) {
      const TensorView& t = cache.block_table;
      expect_dtype(fn, "block_table", t, I32);
      expect_ndim(fn, "block_table", t, 2);
      expect_shape(fn, "block_table", t, {p.B, -1});
      expect_unit_last_stride(fn, "block_table", t);
      expect_same_device(fn, "block_table", t, q);
      p.block_table = t.ptr<const int32_t>();
      p.block_table_sb = t.stride(0);
      p.page_size = k.size(2);
      if (p.page_size < 1) fail_value(fn, "a paged cache needs pages of at least one row, got k " + describe(k));
      p.Sk = t.size(1) * p.page_size;
    }
  }
  if (alibi.present) {
    expect_dtype(fn, "alibi_slopes", alibi, F32);
    if (alibi.ndim == 1)
      expect_shape(fn, "alibi_slopes", alibi, {p.H});
    else
      expect_shape(fn, "alibi_slopes", alibi, {p.cu_q ? p.nseq : p.B, p.H});  // varlen: one row per sequence
    expect_contiguous(fn, "alibi_slopes", alibi);
    expect_same_device(fn, "alibi_slopes", alibi, q);
    p.alibi = alibi.ptr<const float>();
    p.alibi_sb = alibi.ndim == 1 ? 0 : p.H;
  }
  p.scale = o.scale;
  p.softcap = o.softcap;
  p.window_left = o.window_left;
  p.window_right = o.window_right;
  p.align_bottom_right = o.align_bottom_right;
  p.dropout_p = o.dropout_p;
  return p;
}

// out (B, H, Sq, D) in q's dtype, with unit last stride (CPU) or contiguous (CUDA), and lse
// (B, H, Sq) in the compute type, contiguous.
void set_out_lse(const char* fn, attention::Params& p, const TensorView& q, const TensorView& out,
                 const TensorView& lse, int lse_dtype, bool out_written, bool strided_out) {
  if (out_written) {
    expect_dtype(fn, "out", out, q.dtype);
    expect_same_shape(fn, "out", out, "q", q);
    if (strided_out)
      expect_unit_last_stride(fn, "out", out);
    else
      expect_contiguous(fn, "out", out);
    expect_same_device(fn, "out", out, q);
    p.out = out.data;
    p.o_sb = out.stride(0);
    p.o_sh = out.stride(1);
    p.o_ss = out.stride(2);
  }
  expect_dtype(fn, "lse", lse, lse_dtype);
  expect_shape(fn, "lse", lse, {p.B, p.H, p.Sq});
  expect_contiguous(fn, "lse", lse);
  expect_same_device(fn, "lse", lse, q);
  p.lse = lse.data;
}

void set_bias(const char* fn, attention::Params& p, const TensorView& q, const TensorView& bias) {
  if (!bias.present) return;
  expect_dtype(fn, "bias", bias, q.dtype);
  expect_shape(fn, "bias", bias, {p.B, p.H, p.Sq, p.Sk});  // broadcast views (stride 0) are fine
  expect_same_device(fn, "bias", bias, q);
  p.bias = bias.data;
  p.bias_sb = bias.stride(0);
  p.bias_sh = bias.stride(1);
  p.bias_si = bias.stride(2);
  p.bias_sj = bias.stride(3);
}

// dout (B, H, Sq, D) with unit last stride; dq like q, dk / dv like k, all dense.
void set_grads(const char* fn, attention::Params& p, const TensorView& q, const TensorView& k, const TensorView& dout,
               const TensorView& dq, const TensorView& dk, const TensorView& dv) {
  expect_dtype(fn, "dout", dout, q.dtype);
  expect_same_shape(fn, "dout", dout, "q", q);
  expect_unit_last_stride(fn, "dout", dout);
  expect_same_device(fn, "dout", dout, q);
  p.dout = dout.data;
  p.do_sb = dout.stride(0);
  p.do_sh = dout.stride(1);
  p.do_ss = dout.stride(2);
  for (auto [name, t, like, like_name] :
       {std::tuple<const char*, const TensorView*, const TensorView*, const char*>{"dq", &dq, &q, "q"},
        {"dk", &dk, &k, "k"},
        {"dv", &dv, &k, "v"}}) {
    expect_dtype(fn, name, *t, q.dtype);
    expect_same_shape(fn, name, *t, like_name, *like);
    expect_contiguous(fn, name, *t);
    expect_same_device(fn, name, *t, q);
  }
  p.dq = dq.data;
  p.dk = dk.data;
  p.dv = dv.data;
}

int lse_dtype_of(int dtype) { return dtype == F64 ? F64 : F32; }

size_t float_bytes(int dtype) { return dtype == F64 ? 8 : dtype == F32 ? 4 : 2; }

// Where each batch row's cache lives, as host pointers (CPU tensors): the values checked by
// check_cache_index and used by the CPU append.
struct CacheRows {
  int64_t B = 0;
  const int32_t* seqlens = nullptr;    // (B,) positions already in the cache
  int64_t capacity = 0;                // positions a row can hold
  int64_t pool_rows = 0;               // cache batch rows, or blocks of a paged cache
  int64_t page_size = 0;               // 0: not paged
  const int32_t* leftpad = nullptr;    // (B,) or null
  const int32_t* batch_idx = nullptr;  // (B,) or null
  const int32_t* table = nullptr;      // (B, max_blocks) rows table_sb apart, or null
  int64_t table_sb = 0;

  int64_t row_of(int64_t b) const { return batch_idx != nullptr ? batch_idx[b] : b; }
  // (cache row or block, row inside it) of position j of batch row b.
  std::pair<int64_t, int64_t> locate(int64_t b, int64_t j) const {
    if (table == nullptr) return {row_of(b), j};
    return {table[b * table_sb + j / page_size], j % page_size};
  }
};

// Every position a row writes (new_tokens after seqlens[b]) or reads ([leftpad[b], seqlens[b] +
// new_tokens)) exists: a clear error naming the argument otherwise. `lengths` names seqlens.
void check_cache_index(const char* fn, const CacheRows& c, int64_t new_tokens, const char* lengths) {
  for (int64_t b = 0; b < c.B; ++b) {
    const auto row = [b] { return "[" + std::to_string(b) + "]"; };  // built only for a message
    const int64_t n = c.seqlens[b], end = n + new_tokens, start = c.leftpad != nullptr ? c.leftpad[b] : 0;
    if (n < 0) fail_value(fn, std::string(lengths) + row() + " = " + std::to_string(n) + " must be >= 0");
    if (end > c.capacity)
      fail_value(fn, std::string(c.table != nullptr ? "the block_table's pages hold " : "the cache holds ") +
                         std::to_string(c.capacity) + " positions per row but " + lengths + row() + " = " +
                         std::to_string(n) + " + " + std::to_string(new_tokens) + " new tokens needs " +
                         std::to_string(end) + "; the cache is too small");
    if (start < 0 || start > n)
      fail_value(fn, "cache_leftpad" + row() + " = " + std::to_string(start) + " must be in [0, " + lengths + row() +
                         " = " + std::to_string(n) + "]");
    if (c.batch_idx != nullptr && (c.batch_idx[b] < 0 || c.batch_idx[b] >= c.pool_rows))
      fail_value(fn, "cache_batch_idx" + row() + " = " + std::to_string(c.batch_idx[b]) + " is not a row of the " +
                         std::to_string(c.pool_rows) + "-row cache");
    if (c.table == nullptr || end == start) continue;
    for (int64_t i = start / c.page_size; i <= (end - 1) / c.page_size; ++i) {
      const int32_t block = c.table[b * c.table_sb + i];
      if (block < 0 || block >= c.pool_rows)
        fail_value(fn, "block_table[" + std::to_string(b) + ", " + std::to_string(i) + "] = " + std::to_string(block) +
                           " is not a block of the " + std::to_string(c.pool_rows) + "-block cache");
    }
  }
}

// The decode's index values in Params (CPU tensors): every key a row reads exists.
void check_cache_values(const char* fn, const attention::Params& p) {
  if (p.seqused_k == nullptr) return;
  CacheRows c;
  c.B = p.B;
  c.seqlens = p.seqused_k;
  c.capacity = p.Sk;
  c.pool_rows = p.kv_batch_idx != nullptr || p.block_table != nullptr ? p.num_blocks : p.B;
  c.page_size = p.page_size;
  c.leftpad = p.leftpad_k;
  c.batch_idx = p.kv_batch_idx;
  c.table = p.block_table;
  c.table_sb = p.block_table_sb;
  check_cache_index(fn, c, 0, "seqused_k");
}

// flash_attn_with_kvcache's index tensors (CPU, int32) as CacheRows, shapes checked. k_cache in
// the caller's layout: (B_cache, S_max, Hk, D), or (num_blocks, page_size, Hk, D) with a table.
CacheRows cache_rows_of(const char* fn, const TensorView& k_cache, const TensorView& cache_seqlens,
                        const TensorView& cache_leftpad, const TensorView& cache_batch_idx,
                        const TensorView& block_table) {
  CacheRows c;
  expect_dtype(fn, "cache_seqlens", cache_seqlens, I32);
  expect_ndim(fn, "cache_seqlens", cache_seqlens, 1);
  expect_contiguous(fn, "cache_seqlens", cache_seqlens);
  expect_cpu(fn, "cache_seqlens", cache_seqlens);
  c.B = cache_seqlens.size(0);
  c.seqlens = cache_seqlens.ptr<const int32_t>();
  c.pool_rows = k_cache.size(0);
  c.capacity = k_cache.size(1);
  for (auto [name, t] : {std::pair<const char*, const TensorView*>{"cache_leftpad", &cache_leftpad},
                         {"cache_batch_idx", &cache_batch_idx}}) {
    if (!t->present) continue;
    expect_dtype(fn, name, *t, I32);
    expect_shape(fn, name, *t, {c.B});
    expect_contiguous(fn, name, *t);
    expect_cpu(fn, name, *t);
  }
  if (cache_leftpad.present) c.leftpad = cache_leftpad.ptr<const int32_t>();
  if (cache_batch_idx.present) c.batch_idx = cache_batch_idx.ptr<const int32_t>();
  if (block_table.present) {
    if (cache_batch_idx.present) fail_value(fn, "a paged cache (block_table) takes no cache_batch_idx");
    expect_dtype(fn, "block_table", block_table, I32);
    expect_ndim(fn, "block_table", block_table, 2);
    expect_shape(fn, "block_table", block_table, {c.B, -1});
    expect_unit_last_stride(fn, "block_table", block_table);
    expect_cpu(fn, "block_table", block_table);
    c.table = block_table.ptr<const int32_t>();
    c.table_sb = block_table.stride(0);
    c.page_size = k_cache.size(1);
    if (c.page_size < 1)
      fail_value(fn, "a paged cache needs pages of at least one row, got k_cache " + describe(k_cache));
    c.capacity = block_table.size(1) * c.page_size;
  } else if (!cache_batch_idx.present && c.pool_rows != c.B) {
    fail_value(fn, "k_cache has " + std::to_string(c.pool_rows) + " rows for " + std::to_string(c.B) +
                       " batch rows (pass cache_batch_idx to read other rows)");
  }
  return c;
}

// k / v (B, S_new, Hk, D) to be written into k_cache / v_cache (B_cache, S_max, Hk, D) or a paged
// cache's (num_blocks, page_size, Hk, D): dtypes, devices, strides and shapes against the cache
// (batch -1: any; the caller checks it against cache_seqlens).
void check_append(const char* fn, const TensorView& k_cache, const TensorView& v_cache, const TensorView& k,
                  const TensorView& v, int64_t batch) {
  expect_cpu(fn, "k_cache", k_cache);
  expect_float_dtype(fn, "k_cache", k_cache);
  expect_ndim(fn, "k_cache", k_cache, 4);
  expect_same_shape(fn, "v_cache", v_cache, "k_cache", k_cache);
  expect_ndim(fn, "k", k, 4);
  expect_same_shape(fn, "v", v, "k", k);
  for (auto [name, t] : {std::pair<const char*, const TensorView*>{"v_cache", &v_cache}, {"k", &k}, {"v", &v}}) {
    expect_dtype(fn, name, *t, k_cache.dtype);
    expect_cpu(fn, name, *t);
  }
  for (auto [name, t] :
       {std::pair<const char*, const TensorView*>{"k_cache", &k_cache}, {"v_cache", &v_cache}, {"k", &k}, {"v", &v}})
    expect_unit_last_stride(fn, name, *t);
  expect_shape(fn, "k", k, {batch, -1, k_cache.size(2), k_cache.size(3)});
}

// The rows of k / v copied to positions c.seqlens[b] + t (checked by check_append and
// check_cache_index first).
void copy_append(const CacheRows& c, const TensorView& k_cache, const TensorView& v_cache, const TensorView& k,
                 const TensorView& v) {
  const int64_t Hk = k_cache.size(2), S_new = k.size(1);
  const size_t item = float_bytes(k_cache.dtype), row_bytes = size_t(k_cache.size(3)) * item;
  for (auto [cache, src] : {std::pair<const TensorView*, const TensorView*>{&k_cache, &k}, {&v_cache, &v}})
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t t = 0; t < S_new; ++t) {
        const auto [block, row] = c.locate(b, c.seqlens[b] + t);
        for (int64_t h = 0; h < Hk; ++h) {
          char* dst = static_cast<char*>(cache->data) +
                      (block * cache->stride(0) + row * cache->stride(1) + h * cache->stride(2)) * item;
          const char* from = static_cast<const char*>(src->data) +
                             (b * src->stride(0) + t * src->stride(1) + h * src->stride(2)) * item;
          std::memcpy(dst, from, row_bytes);
        }
      }
}

// k / v (B, S_new, Hk, D) written into k_cache / v_cache at positions cache_seqlens[b] .. +
// S_new of batch row b (flash-attn's in-place cache update): cache row cache_batch_idx[b] (or b)
// of (B_cache, S_max, Hk, D), or the pages of a paged cache (num_blocks, page_size, Hk, D)
// through block_table. Every position is checked (check_cache_index) before anything is written.
void kvcache_append_cpu(const char* fn, const TensorView& k_cache, const TensorView& v_cache, const TensorView& k,
                        const TensorView& v, const TensorView& cache_seqlens, const TensorView& cache_batch_idx,
                        const TensorView& block_table) {
  check_append(fn, k_cache, v_cache, k, v, -1);
  const CacheRows c = cache_rows_of(fn, k_cache, cache_seqlens, TensorView{}, cache_batch_idx, block_table);
  expect_shape(fn, "k", k, {c.B, -1, k_cache.size(2), k_cache.size(3)});
  check_cache_index(fn, c, k.size(1), "cache_seqlens");
  copy_append(c, k_cache, v_cache, k, v);
}

// Rotary embedding of one row (genfast.reference.attention.rotary_embedding): pairs (d, d + half)
// or, interleaved, (2d, 2d + 1) rotated by (cos[d], sin[d]) in the compute type; dims from
// 2 * half on copied. dst may be src.
template <typename T, typename C>
void rotate_row(T* dst, const T* src, int64_t D, const C* cos, const C* sin, int64_t half, bool interleaved) {
  using F = typename Compute<T>::type;
  for (int64_t d = 0; d < half; ++d) {
    const F c = F(to_float(cos[d])), s = F(to_float(sin[d]));
    const int64_t i1 = interleaved ? 2 * d : d, i2 = interleaved ? 2 * d + 1 : d + half;
    const F x1 = F(to_float(src[i1])), x2 = F(to_float(src[i2]));
    const F a = x1 * c, b = x2 * s, e = x1 * s, f = x2 * c;  // rounded one by one, as torch does
    dst[i1] = from_compute<T>(a - b);
    dst[i2] = from_compute<T>(e + f);
  }
  if (dst != src) std::memcpy(dst + 2 * half, src + 2 * half, size_t(D - 2 * half) * sizeof(T));
}

// flash_attn_with_kvcache's rotary step on the CPU: q_out = rotary(q) at positions
// cache_seqlens[b] + i (or cache_seqlens[b] when q_same_position), and rotary(k), v appended at
// positions cache_seqlens[b] + t (as kvcache_append_cpu), in one pass. Layout (B, S, H, D).
template <typename T, typename C>
void rotary_append_typed(const CacheRows& c, const TensorView& q, const TensorView& q_out, const TensorView& k_cache,
                         const TensorView& v_cache, const TensorView& k, const TensorView& v, const C* cos,
                         const C* sin, int64_t half, bool interleaved, bool q_same_position) {
  const int64_t D = q.size(3), Hk = k.size(2), S_new = k.size(1);
  for (int64_t b = 0; b < c.B; ++b) {
    for (int64_t i = 0; i < q.size(1); ++i) {
      const int64_t pos = c.seqlens[b] + (q_same_position ? 0 : i);
      for (int64_t h = 0; h < q.size(2); ++h)
        rotate_row(static_cast<T*>(q_out.data) + b * q_out.stride(0) + i * q_out.stride(1) + h * q_out.stride(2),
                   static_cast<const T*>(q.data) + b * q.stride(0) + i * q.stride(1) + h * q.stride(2), D,
                   cos + pos * half, sin + pos * half, half, interleaved);
    }
    for (int64_t t = 0; t < S_new; ++t) {
      const int64_t pos = c.seqlens[b] + t;
      const auto [block, row] = c.locate(b, pos);
      for (int64_t h = 0; h < Hk; ++h) {
        T* kd =
            static_cast<T*>(k_cache.data) + block * k_cache.stride(0) + row * k_cache.stride(1) + h * k_cache.stride(2);
        T* vd =
            static_cast<T*>(v_cache.data) + block * v_cache.stride(0) + row * v_cache.stride(1) + h * v_cache.stride(2);
        rotate_row(kd, static_cast<const T*>(k.data) + b * k.stride(0) + t * k.stride(1) + h * k.stride(2), D,
                   cos + pos * half, sin + pos * half, half, interleaved);
        std::memcpy(vd, static_cast<const T*>(v.data) + b * v.stride(0) + t * v.stride(1) + h * v.stride(2),
                    size_t(D) * sizeof(T));
      }
    }
  }
}

void rotary_append_cpu(const char* fn, const TensorView& q, const TensorView& q_out, const TensorView& k_cache,
                       const TensorView& v_cache, const TensorView& k, const TensorView& v,
                       const TensorView& cache_seqlens, const TensorView& cos, const TensorView& sin, bool interleaved,
                       bool q_same_position, const TensorView& cache_batch_idx, const TensorView& block_table) {
  expect_cpu(fn, "q", q);
  expect_float_dtype(fn, "q", q);
  expect_ndim(fn, "q", q, 4);
  expect_ndim(fn, "k_cache", k_cache, 4);
  expect_same_shape(fn, "v_cache", v_cache, "k_cache", k_cache);
  expect_ndim(fn, "k", k, 4);
  expect_same_shape(fn, "v", v, "k", k);
  expect_same_shape(fn, "q_out", q_out, "q", q);
  for (auto [name, t] : {std::pair<const char*, const TensorView*>{"q_out", &q_out},
                         {"k_cache", &k_cache},
                         {"v_cache", &v_cache},
                         {"k", &k},
                         {"v", &v}}) {
    expect_dtype(fn, name, *t, q.dtype);
    expect_cpu(fn, name, *t);
  }
  for (auto [name, t] : {std::pair<const char*, const TensorView*>{"q", &q},
                         {"q_out", &q_out},
                         {"k_cache", &k_cache},
                         {"v_cache", &v_cache},
                         {"k", &k},
                         {"v", &v}})
    expect_unit_last_stride(fn, name, *t);
  const CacheRows c = cache_rows_of(fn, k_cache, cache_seqlens, TensorView{}, cache_batch_idx, block_table);
  const int64_t D = q.size(3);
  expect_shape(fn, "q", q, {c.B, -1, -1, D});
  expect_shape(fn, "k", k, {c.B, -1, k_cache.size(2), D});
  check_cache_index(fn, c, k.size(1), "cache_seqlens");
  expect_ndim(fn, "rotary_cos", cos, 2);
  expect_same_shape(fn, "rotary_sin", sin, "rotary_cos", cos);
  expect_dtype(fn, "rotary_sin", sin, cos.dtype);
  expect_contiguous(fn, "rotary_cos", cos);
  expect_contiguous(fn, "rotary_sin", sin);
  expect_cpu(fn, "rotary_cos", cos);
  const int64_t half = cos.size(1);
  if (half < 1 || 2 * half > D)
    fail_value(fn, "rotary_cos must be (seqlen_ro, rotary_dim / 2) with 0 < rotary_dim <= " + std::to_string(D) +
                       ", got " + describe(cos));
  const int64_t reach = std::max<int64_t>(k.size(1), q_same_position ? 1 : q.size(1));
  for (int64_t b = 0; b < c.B; ++b)
    if (c.seqlens[b] + reach > cos.size(0))
      fail_value(fn, "rotary_cos has " + std::to_string(cos.size(0)) + " positions but row " + std::to_string(b) +
                         " needs position " + std::to_string(c.seqlens[b] + reach - 1));
  auto with_cos = [&](auto tag_t) {
    using T = decltype(tag_t);
    switch (cos.dtype) {
      case F32:
        return rotary_append_typed<T>(c, q, q_out, k_cache, v_cache, k, v, cos.ptr<const float>(),
                                      sin.ptr<const float>(), half, interleaved, q_same_position);
      case F64:
        return rotary_append_typed<T>(c, q, q_out, k_cache, v_cache, k, v, cos.ptr<const double>(),
                                      sin.ptr<const double>(), half, interleaved, q_same_position);
      case F16:
        return rotary_append_typed<T>(c, q, q_out, k_cache, v_cache, k, v, cos.ptr<const half_t>(),
                                      sin.ptr<const half_t>(), half, interleaved, q_same_position);
      case BF16:
        return rotary_append_typed<T>(c, q, q_out, k_cache, v_cache, k, v, cos.ptr<const bf16_t>(),
                                      sin.ptr<const bf16_t>(), half, interleaved, q_same_position);
    }
    fail_type(fn, "rotary_cos must be a float tensor, got " + describe(cos));
  };
  switch (q.dtype) {
    case F32: return with_cos(float{});
    case F64: return with_cos(double{});
    case F16: return with_cos(half_t{});
    case BF16: return with_cos(bf16_t{});
  }
  fail_type(fn, "q must be a float tensor, got " + describe(q));
}

int checked_threads(const char* fn, int num_threads) {
  if (num_threads < 1) fail_value(fn, "num_threads must be >= 1, got " + std::to_string(num_threads));
  return num_threads;
}

std::string repr(const AttentionOptions& o) {
  std::ostringstream s;
  s << "AttentionOptions(scale=" << o.scale << ", softcap=" << o.softcap << ", window_left=" << o.window_left
    << ", window_right=" << o.window_right << ", align_bottom_right=" << (o.align_bottom_right ? "True" : "False")
    << ", dropout_p=" << o.dropout_p << ", seq_first=" << (o.seq_first ? "True" : "False") << ")";
  return s.str();
}

#ifdef GENFAST_WITH_CUDA
attention::CudaArgs cuda_args(const char* fn, attention::Params p, const TensorView& q, const AttentionCudaLaunch& l,
                              uintptr_t stream) {
  expect_cuda(fn, "q", q);
  if (p.dtype != F16 && p.dtype != BF16)
    fail_type(fn, "the CUDA kernels take float16 or bfloat16, got q " + describe(q));
  if (p.dropout_p != 0.0) fail_value(fn, "the CUDA kernels have no dropout");
  attention::CudaArgs a;
  a.p = p;
  a.max_seqlen_q = l.max_seqlen_q;
  a.max_seqlen_k = l.max_seqlen_k;
  a.pack_gqa = l.pack_gqa;
  a.num_splits = l.num_splits;
  a.stream = stream;
  a.device = q.device < 0 ? 0 : q.device;  // the CPU-hosted emulation runs on CPU tensors
  return a;
}
#endif

}  // namespace

GENFAST_REGISTER_BINDINGS(attention) {
  m.attr("ATTENTION_CUDA_BACKWARD_MAX_HEAD_DIM") = attention::kBackwardMaxHeadDim;
  py::class_<AttentionOptions>(m, "AttentionOptions", "Options of one attention problem (all keyword, all required).")
      .def(py::init([](double scale, double softcap, int64_t window_left, int64_t window_right, bool align_bottom_right,
                       double dropout_p, bool seq_first) {
             const char* fn = "AttentionOptions";
             if (!(scale == scale)) fail_value(fn, "scale is NaN (resolve the default 1/sqrt(D) first)");
             if (softcap < 0) fail_value(fn, "softcap must be >= 0");
             if (window_left < -1 || window_right < -1) fail_value(fn, "window sizes must be >= -1");
             if (!(dropout_p >= 0 && dropout_p < 1)) fail_value(fn, "dropout_p must be in [0, 1)");
             AttentionOptions o;
             o.scale = scale;
             o.softcap = softcap;
             o.window_left = window_left;
             o.window_right = window_right;
             o.align_bottom_right = align_bottom_right;
             o.dropout_p = dropout_p;
             o.seq_first = seq_first;
             return o;
           }),
           py::kw_only(), py::arg("scale"), py::arg("softcap"), py::arg("window_left"), py::arg("window_right"),
           py::arg("align_bottom_right"), py::arg("dropout_p"), py::arg("seq_first"))
      .def_readonly("scale", &AttentionOptions::scale)
      .def_readonly("softcap", &AttentionOptions::softcap)
      .def_readonly("window_left", &AttentionOptions::window_left)
      .def_readonly("window_right", &AttentionOptions::window_right)
      .def_readonly("align_bottom_right", &AttentionOptions::align_bottom_right)
      .def_readonly("dropout_p", &AttentionOptions::dropout_p)
      .def_readonly("seq_first", &AttentionOptions::seq_first)
      .def("__repr__", &repr);

  m.def(
      "attention_forward_cpu",
      [](const TensorView& q_in, const TensorView& k_in, const TensorView& v_in, const TensorView& out_in,
         const TensorView& lse, const TensorView& bias, const TensorView& alibi_slopes, const TensorView& cu_seqlens_q,
         const TensorView& cu_seqlens_k, const TensorView& seqused_k, const TensorView& keep_mask, uint64_t seed,
         const AttentionOptions& options, int num_threads, const TensorView& cache_leftpad,
         const TensorView& cache_batch_idx, const TensorView& block_table, const TensorView& k_new,
         const TensorView& v_new) {
        const char* fn = "attention_forward_cpu";
        const TensorView q = heads_first(q_in, options), k = heads_first(k_in, options), v = heads_first(v_in, options),
                         out = heads_first(out_in, options);
        expect_cpu(fn, "q", q);
        // A decode step with new tokens (flash_attn_with_kvcache's k, v): k_new / v_new are written
        // into the cache at seqused_k[b] + t, then row b attends to seqused_k[b] + S_new keys. One
        // call instead of a check, an append, an add and the attention: decode is host-bound.
        TensorView seqused = seqused_k;
        std::vector<int32_t> lengths;  // seqused_k + S_new
        CacheRows rows;
        if (k_new.present || v_new.present) {
          const char* user = "flash_attn_with_kvcache";
          if (!k_new.present || !v_new.present) fail_value(fn, "k_new and v_new go together");
          if (!options.seq_first || !seqused_k.present || cu_seqlens_q.present)
            fail_value(fn,
                       "k_new / v_new append to a decode's cache: they need seq_first, seqused_k and no cu_seqlens");
          check_append(user, k_in, v_in, k_new, v_new, -1);
          rows = cache_rows_of(user, k_in, seqused_k, cache_leftpad, cache_batch_idx, block_table);
          expect_shape(user, "k", k_new, {rows.B, -1, k_in.size(2), k_in.size(3)});
          check_cache_index(user, rows, k_new.size(1), "cache_seqlens");  // so the sums below fit in int32
          lengths.resize(size_t(rows.B));
          for (int64_t b = 0; b < rows.B; ++b) lengths[size_t(b)] = int32_t(rows.seqlens[b] + k_new.size(1));
          seqused.data = lengths.data();  // seqused_k's dtype, shape and (contiguous) strides
        }
        attention::Params p = make_params(fn, q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused, options,
                                          CacheIndex{cache_leftpad, cache_batch_idx, block_table});
        if (p.seqused_k != nullptr) {
          expect_cpu(fn, "seqused_k", seqused_k);
          check_cache_values(fn, p);
        }
        set_out_lse(fn, p, q, out, lse, lse_dtype_of(q.dtype), true, true);
        set_bias(fn, p, q, bias);
        if (keep_mask.present) {
          expect_dtype(fn, "keep_mask", keep_mask, BOOL);
          expect_shape(fn, "keep_mask", keep_mask, {p.B, p.H, p.Sq, p.Sk});
          expect_contiguous(fn, "keep_mask", keep_mask);
          p.keep_mask = keep_mask.ptr<uint8_t>();
        }
        p.seed = seed;
        p.num_threads = checked_threads(fn, num_threads);
        py::gil_scoped_release release;
        if (k_new.present) copy_append(rows, k_in, v_in, k_new, v_new);  // every check above passed
        attention::forward_cpu(p);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("bias"),
      py::arg("alibi_slopes"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("seqused_k"),
      py::arg("keep_mask"), py::arg("seed"), py::arg("options"), py::arg("num_threads"),
      py::arg("cache_leftpad") = py::none(), py::arg("cache_batch_idx") = py::none(),
      py::arg("block_table") = py::none(), py::arg("k_new") = py::none(), py::arg("v_new") = py::none());
  m.def(
      "attention_backward_cpu",
      [](const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
         const TensorView& lse, const TensorView& dq, const TensorView& dk, const TensorView& dv,
         const TensorView& bias, const TensorView& alibi_slopes, const TensorView& cu_seqlens_q,
         const TensorView& cu_seqlens_k, uint64_t seed, const AttentionOptions& options, int num_threads) {
        const char* fn = "attention_backward_cpu";
        no_seq_first(fn, options);
        expect_cpu(fn, "q", q);
        attention::Params p = make_params(fn, q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, TensorView{}, options);
        set_out_lse(fn, p, q, out, lse, lse_dtype_of(q.dtype), true, true);
        set_bias(fn, p, q, bias);
        set_grads(fn, p, q, k, dout, dq, dk, dv);
        p.seed = seed;
        p.num_threads = checked_threads(fn, num_threads);
        py::gil_scoped_release release;
        attention::backward_cpu(p);
      },
      py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("dq"),
      py::arg("dk"), py::arg("dv"), py::arg("bias"), py::arg("alibi_slopes"), py::arg("cu_seqlens_q"),
      py::arg("cu_seqlens_k"), py::arg("seed"), py::arg("options"), py::arg("num_threads"));

  m.def(
      "attention_kvcache_append_cpu",
      [](const TensorView& k_cache, const TensorView& v_cache, const TensorView& k, const TensorView& v,
         const TensorView& cache_seqlens, const TensorView& cache_batch_idx, const TensorView& block_table) {
        kvcache_append_cpu("attention_kvcache_append_cpu", k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx,
                           block_table);
      },
      py::arg("k_cache"), py::arg("v_cache"), py::kw_only(), py::arg("k"), py::arg("v"), py::arg("cache_seqlens"),
      py::arg("cache_batch_idx") = py::none(), py::arg("block_table") = py::none());
  m.def(
      "attention_rotary_append_cpu",
      [](const TensorView& q, const TensorView& q_out, const TensorView& k_cache, const TensorView& v_cache,
         const TensorView& k, const TensorView& v, const TensorView& cache_seqlens, const TensorView& rotary_cos,
         const TensorView& rotary_sin, bool interleaved, bool q_same_position, const TensorView& cache_batch_idx,
         const TensorView& block_table) {
        rotary_append_cpu("attention_rotary_append_cpu", q, q_out, k_cache, v_cache, k, v, cache_seqlens, rotary_cos,
                          rotary_sin, interleaved, q_same_position, cache_batch_idx, block_table);
      },
      "flash_attn_with_kvcache's rotary step (flash-attn layout): q_out = rotary(q); rotary(k) and v "
      "appended into the caches at cache_seqlens[b] + t, every position checked first.",
      py::arg("q"), py::arg("q_out"), py::arg("k_cache"), py::arg("v_cache"), py::kw_only(), py::arg("k"), py::arg("v"),
      py::arg("cache_seqlens"), py::arg("rotary_cos"), py::arg("rotary_sin"), py::arg("interleaved"),
      py::arg("q_same_position"), py::arg("cache_batch_idx"), py::arg("block_table"));
  m.def(
      "attention_check_cache_index_cpu",
      [](const TensorView& k_cache, const TensorView& cache_seqlens, int64_t new_tokens,
         const TensorView& cache_leftpad, const TensorView& cache_batch_idx, const TensorView& block_table) {
        const char* fn = "flash_attn_with_kvcache";
        expect_ndim(fn, "k_cache", k_cache, 4);
        const CacheRows c = cache_rows_of(fn, k_cache, cache_seqlens, cache_leftpad, cache_batch_idx, block_table);
        check_cache_index(fn, c, new_tokens, "cache_seqlens");
      },
      "Checks flash_attn_with_kvcache's index values (CPU tensors; k_cache in flash-attn's layout): every "
      "position a row writes or reads exists, else ValueError.",
      py::arg("k_cache"), py::kw_only(), py::arg("cache_seqlens"), py::arg("new_tokens"), py::arg("cache_leftpad"),
      py::arg("cache_batch_idx"), py::arg("block_table"));

#ifdef GENFAST_WITH_CUDA
  py::class_<AttentionCudaLaunch>(m, "AttentionCudaLaunch",
                                  "Launch shape of the CUDA attention kernels (all keyword, all required).")
      .def(py::init([](int64_t max_seqlen_q, int64_t max_seqlen_k, bool pack_gqa, int num_splits) {
             if (max_seqlen_q < 0 || max_seqlen_k < 0) fail_value("AttentionCudaLaunch", "max_seqlen_q/k must be >= 0");
             if (num_splits < 1) fail_value("AttentionCudaLaunch", "num_splits must be >= 1");
             return AttentionCudaLaunch{max_seqlen_q, max_seqlen_k, pack_gqa, num_splits};
           }),
           py::kw_only(), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("pack_gqa"), py::arg("num_splits"))
      .def_readonly("max_seqlen_q", &AttentionCudaLaunch::max_seqlen_q)
      .def_readonly("max_seqlen_k", &AttentionCudaLaunch::max_seqlen_k)
      .def_readonly("pack_gqa", &AttentionCudaLaunch::pack_gqa)
      .def_readonly("num_splits", &AttentionCudaLaunch::num_splits);

  // Tensor-core forward / split-KV decode and backward (kernels/attention.cu).
  m.def(
      "attention_forward_cuda",
      [](const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse,
         const TensorView& alibi_slopes, const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_k,
         const TensorView& seqused_k, const TensorView& out_partial, const TensorView& lse_partial,
         const AttentionOptions& options, const AttentionCudaLaunch& launch, uintptr_t stream,
         const TensorView& cache_leftpad, const TensorView& cache_batch_idx, const TensorView& block_table) {
        const char* fn = "attention_forward_cuda";
        no_seq_first(fn, options);
        attention::Params p = make_params(fn, q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, options,
                                          CacheIndex{cache_leftpad, cache_batch_idx, block_table});
        set_out_lse(fn, p, q, out, lse, F32, true, false);
        attention::CudaArgs a = cuda_args(fn, p, q, launch, stream);
        if (launch.num_splits > 1) {
          expect_dtype(fn, "out_partial", out_partial, F32);
          expect_shape(fn, "out_partial", out_partial, {launch.num_splits, p.B, p.H, p.Sq, p.D});
          expect_contiguous(fn, "out_partial", out_partial);
          expect_dtype(fn, "lse_partial", lse_partial, F32);
          expect_shape(fn, "lse_partial", lse_partial, {launch.num_splits, p.B, p.H, p.Sq});
          expect_contiguous(fn, "lse_partial", lse_partial);
          a.out_partial = out_partial.data;
          a.lse_partial = lse_partial.data;
        }
        py::gil_scoped_release release;
        attention::forward_cuda(a);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::kw_only(), py::arg("alibi_slopes"),
      py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("seqused_k"), py::arg("out_partial"),
      py::arg("lse_partial"), py::arg("options"), py::arg("launch"), py::arg("stream"),
      py::arg("cache_leftpad") = py::none(), py::arg("cache_batch_idx") = py::none(),
      py::arg("block_table") = py::none());
  m.def(
      "attention_backward_cuda",
      [](const TensorView& dout, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& lse,
         const TensorView& delta, const TensorView& dq, const TensorView& dk, const TensorView& dv,
         const TensorView& alibi_slopes, const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_k,
         const AttentionOptions& options, const AttentionCudaLaunch& launch, uintptr_t stream) {
        const char* fn = "attention_backward_cuda";
        no_seq_first(fn, options);
        attention::Params p = make_params(fn, q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, TensorView{}, options);
        set_out_lse(fn, p, q, TensorView{}, lse, F32, false, false);
        set_grads(fn, p, q, k, dout, dq, dk, dv);
        expect_dtype(fn, "delta", delta, F32);
        expect_shape(fn, "delta", delta, {p.B, p.H, p.Sq});
        expect_contiguous(fn, "delta", delta);
        attention::CudaArgs a = cuda_args(fn, p, q, launch, stream);
        a.delta = delta.data;
        py::gil_scoped_release release;
        attention::backward_cuda(a);
      },
      py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("lse"), py::arg("delta"), py::arg("dq"),
      py::arg("dk"), py::arg("dv"), py::kw_only(), py::arg("alibi_slopes"), py::arg("cu_seqlens_q"),
      py::arg("cu_seqlens_k"), py::arg("options"), py::arg("launch"), py::arg("stream"));
#endif
}
