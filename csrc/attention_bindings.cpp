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

// The common part of every entry: q, k, v and the optional inputs, checked, into Params.
attention::Params make_params(const char* fn, const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView& alibi, const TensorView& cu_seqlens_q, const TensorView& cu_seqlens_k,
                              const TensorView& seqused_k, const AttentionOptions& o) {
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
  if (k.size(0) != p.B || k.size(3) != p.D)
    fail_value(fn, "k must have shape (" + std::to_string(p.B) + ", Hk, Sk, " + std::to_string(p.D) + ") to match q " +
                       describe(q) + ", got " + describe(k));
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

// k / v (B, S_new, Hk, D) written into k_cache / v_cache (B, S_max, Hk, D) at rows
// cache_seqlens[b] .. + S_new of batch row b (flash-attn's in-place cache update). Every row
// index is checked against S_max before anything is written.
void kvcache_append_cpu(const char* fn, const TensorView& k_cache, const TensorView& v_cache, const TensorView& k,
                        const TensorView& v, const TensorView& cache_seqlens) {
  expect_cpu(fn, "k_cache", k_cache);
  expect_float_dtype(fn, "k_cache", k_cache);
  expect_ndim(fn, "k_cache", k_cache, 4);
  expect_same_shape(fn, "v_cache", v_cache, "k_cache", k_cache);
  expect_ndim(fn, "k", k, 4);
  expect_same_shape(fn, "v", v, "k", k);
  const int64_t B = k_cache.size(0), S_max = k_cache.size(1), Hk = k_cache.size(2), D = k_cache.size(3);
  const int64_t S_new = k.size(1);
  expect_shape(fn, "k", k, {B, -1, Hk, D});
  for (auto [name, t] : {std::pair<const char*, const TensorView*>{"v_cache", &v_cache}, {"k", &k}, {"v", &v}}) {
    expect_dtype(fn, name, *t, k_cache.dtype);
    expect_cpu(fn, name, *t);
  }
  for (auto [name, t] :
       {std::pair<const char*, const TensorView*>{"k_cache", &k_cache}, {"v_cache", &v_cache}, {"k", &k}, {"v", &v}})
    expect_unit_last_stride(fn, name, *t);
  expect_dtype(fn, "cache_seqlens", cache_seqlens, I32);
  expect_shape(fn, "cache_seqlens", cache_seqlens, {B});
  expect_contiguous(fn, "cache_seqlens", cache_seqlens);
  expect_cpu(fn, "cache_seqlens", cache_seqlens);
  const int32_t* rows = cache_seqlens.ptr<const int32_t>();
  for (int64_t b = 0; b < B; ++b)
    if (rows[b] < 0 || rows[b] + S_new > S_max)
      fail_value(fn, "cache_seqlens[" + std::to_string(b) + "] = " + std::to_string(rows[b]) + " leaves no room for " +
                         std::to_string(S_new) + " new rows in a cache of " + std::to_string(S_max));
  const size_t row_bytes = size_t(D) * float_bytes(k_cache.dtype);
  for (auto [cache, src] : {std::pair<const TensorView*, const TensorView*>{&k_cache, &k}, {&v_cache, &v}}) {
    const size_t item = float_bytes(cache->dtype);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < S_new; ++t)
        for (int64_t h = 0; h < Hk; ++h) {
          char* dst = static_cast<char*>(cache->data) +
                      (b * cache->stride(0) + (rows[b] + t) * cache->stride(1) + h * cache->stride(2)) * item;
          const char* from = static_cast<const char*>(src->data) +
                             (b * src->stride(0) + t * src->stride(1) + h * src->stride(2)) * item;
          std::memcpy(dst, from, row_bytes);
        }
  }
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
         const AttentionOptions& options, int num_threads) {
        const char* fn = "attention_forward_cpu";
        const TensorView q = heads_first(q_in, options), k = heads_first(k_in, options), v = heads_first(v_in, options),
                         out = heads_first(out_in, options);
        expect_cpu(fn, "q", q);
        attention::Params p = make_params(fn, q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, options);
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
        attention::forward_cpu(p);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::kw_only(), py::arg("bias"),
      py::arg("alibi_slopes"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("seqused_k"),
      py::arg("keep_mask"), py::arg("seed"), py::arg("options"), py::arg("num_threads"));
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
      py::arg("dk"), py::arg("dv"), py::kw_only(), py::arg("bias"), py::arg("alibi_slopes"), py::arg("cu_seqlens_q"),
      py::arg("cu_seqlens_k"), py::arg("seed"), py::arg("options"), py::arg("num_threads"));

  m.def(
      "attention_kvcache_append_cpu",
      [](const TensorView& k_cache, const TensorView& v_cache, const TensorView& k, const TensorView& v,
         const TensorView& cache_seqlens) {
        kvcache_append_cpu("attention_kvcache_append_cpu", k_cache, v_cache, k, v, cache_seqlens);
      },
      py::arg("k_cache"), py::arg("v_cache"), py::kw_only(), py::arg("k"), py::arg("v"), py::arg("cache_seqlens"));

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
         const AttentionOptions& options, const AttentionCudaLaunch& launch, uintptr_t stream) {
        const char* fn = "attention_forward_cuda";
        no_seq_first(fn, options);
        attention::Params p = make_params(fn, q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k, options);
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
      py::arg("lse_partial"), py::arg("options"), py::arg("launch"), py::arg("stream"));
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
