// pybind11 bindings of the fused attention family (see csrc/bindings.h). The Python side
// (genfast/ops/attention.py _cpu_params) passes one dict of addresses, sizes and strides.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "attention.h"
#include "attention_cpu.h"
#include "bindings.h"
#include "common.h"

namespace py = pybind11;
using namespace genfast;

namespace {

template <typename V>
V get(const py::dict& d, const char* key, V fallback) {
  return d.contains(key) ? d[key].cast<V>() : fallback;
}

template <typename P>
P* ptr(const py::dict& d, const char* key) {
  return reinterpret_cast<P*>(get<uintptr_t>(d, key, 0));
}

attention::Params make_params(const py::dict& d) {
  attention::Params p;
  p.dtype = get<int>(d, "dtype", -1);
  p.B = get<int64_t>(d, "B", 0);
  p.H = get<int64_t>(d, "H", 0);
  p.Hk = get<int64_t>(d, "Hk", 0);
  p.Sq = get<int64_t>(d, "Sq", 0);
  p.Sk = get<int64_t>(d, "Sk", 0);
  p.D = get<int64_t>(d, "D", 0);
  p.q = ptr<const void>(d, "q");
  p.k = ptr<const void>(d, "k");
  p.v = ptr<const void>(d, "v");
  p.q_sb = get<int64_t>(d, "q_sb", 0); p.q_sh = get<int64_t>(d, "q_sh", 0); p.q_ss = get<int64_t>(d, "q_ss", 0);
  p.k_sb = get<int64_t>(d, "k_sb", 0); p.k_sh = get<int64_t>(d, "k_sh", 0); p.k_ss = get<int64_t>(d, "k_ss", 0);
  p.v_sb = get<int64_t>(d, "v_sb", 0); p.v_sh = get<int64_t>(d, "v_sh", 0); p.v_ss = get<int64_t>(d, "v_ss", 0);
  p.cu_q = ptr<const int32_t>(d, "cu_q");
  p.cu_k = ptr<const int32_t>(d, "cu_k");
  p.nseq = get<int64_t>(d, "nseq", 0);
  p.seqused_k = ptr<const int32_t>(d, "seqused_k");
  p.scale = get<double>(d, "scale", 1.0);
  p.softcap = get<double>(d, "softcap", 0.0);
  p.window_left = get<int64_t>(d, "window_left", -1);
  p.window_right = get<int64_t>(d, "window_right", -1);
  p.align_bottom_right = get<bool>(d, "align_bottom_right", false);
  p.alibi = ptr<const float>(d, "alibi");
  p.alibi_sb = get<int64_t>(d, "alibi_sb", 0);
  p.bias = ptr<const void>(d, "bias");
  p.bias_sb = get<int64_t>(d, "bias_sb", 0); p.bias_sh = get<int64_t>(d, "bias_sh", 0);
  p.bias_si = get<int64_t>(d, "bias_si", 0); p.bias_sj = get<int64_t>(d, "bias_sj", 0);
  p.dropout_p = get<double>(d, "dropout_p", 0.0);
  p.seed = get<uint64_t>(d, "seed", 0);
  p.keep_mask = ptr<uint8_t>(d, "keep_mask");
  p.out = ptr<void>(d, "out");
  p.lse = ptr<void>(d, "lse");
  p.dout = ptr<const void>(d, "dout");
  p.do_sb = get<int64_t>(d, "do_sb", 0); p.do_sh = get<int64_t>(d, "do_sh", 0); p.do_ss = get<int64_t>(d, "do_ss", 0);
  p.dq = ptr<void>(d, "dq");
  p.dk = ptr<void>(d, "dk");
  p.dv = ptr<void>(d, "dv");
  p.num_threads = get<int>(d, "num_threads", 1);
  if (p.B < 0 || p.H < 1 || p.Hk < 1 || p.H % p.Hk != 0 || p.D < 1 || p.Sq < 0 || p.Sk < 0)
    throw std::invalid_argument("attention: bad sizes");
  if (p.dropout_p < 0 || p.dropout_p >= 1) throw std::invalid_argument("attention: dropout_p must be in [0, 1)");
  if ((p.cu_q == nullptr) != (p.cu_k == nullptr)) throw std::invalid_argument("attention: cu_q and cu_k go together");
  return p;
}

#ifdef GENFAST_WITH_CUDA
// The CUDA kernels' arguments: the common dict plus max_seqlen_q/k, pack_gqa, num_splits (with
// the fp32 workspaces out_partial / lse_partial), delta (backward), stream and device.
attention::CudaArgs make_cuda_args(const py::dict& d) {
  attention::CudaArgs a;
  a.p = make_params(d);
  a.max_seqlen_q = get<int64_t>(d, "max_seqlen_q", 0);
  a.max_seqlen_k = get<int64_t>(d, "max_seqlen_k", 0);
  a.pack_gqa = get<bool>(d, "pack_gqa", false);
  a.num_splits = get<int>(d, "num_splits", 1);
  a.out_partial = ptr<void>(d, "out_partial");
  a.lse_partial = ptr<void>(d, "lse_partial");
  a.delta = ptr<const void>(d, "delta");
  a.stream = get<uintptr_t>(d, "stream", 0);
  a.device = get<int>(d, "device", 0);
  return a;
}
#endif

}  // namespace

GENFAST_REGISTER_BINDINGS(attention) {
  m.def(
      "attention_forward_cpu",
      [](const py::dict& d) {
        attention::Params p = make_params(d);
        if (p.out == nullptr || p.lse == nullptr) throw std::invalid_argument("attention_forward_cpu: out and lse are required");
        py::gil_scoped_release release;
        attention::forward_cpu(p);
      },
      py::arg("params"));
  m.def(
      "attention_backward_cpu",
      [](const py::dict& d) {
        attention::Params p = make_params(d);
        if (p.dout == nullptr || p.dq == nullptr || p.dk == nullptr || p.dv == nullptr)
          throw std::invalid_argument("attention_backward_cpu: dout, dq, dk and dv are required");
        py::gil_scoped_release release;
        attention::backward_cpu(p);
      },
      py::arg("params"));

#ifdef GENFAST_WITH_CUDA
  // Tensor-core forward / split-KV decode and backward (kernels/attention.cu).
  m.def(
      "attention_forward_cuda",
      [](const py::dict& d) {
        attention::CudaArgs a = make_cuda_args(d);
        py::gil_scoped_release release;
        attention::forward_cuda(a);
      },
      py::arg("params"));
  m.def(
      "attention_backward_cuda",
      [](const py::dict& d) {
        attention::CudaArgs a = make_cuda_args(d);
        py::gil_scoped_release release;
        attention::backward_cuda(a);
      },
      py::arg("params"));
#endif
}
