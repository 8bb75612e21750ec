// The problem of one attention call, shared by the CPU kernels (csrc/attention_cpu.cpp) and the
// CUDA kernels (kernels/attention.cu): tensors as addresses plus element strides, filled and
// checked by csrc/attention_bindings.cpp from the TensorViews it receives. Semantics: the
// ATTENTION contract in genfast/reference/attention.py.
#pragma once
#include <cstdint>

namespace genfast {
namespace attention {

struct Params {
  int dtype = 0;                                        // genfast::DType of q, k, v, bias, out, dout, dq, dk, dv
  int64_t B = 0, H = 0, Hk = 0, Sq = 0, Sk = 0, D = 0;  // varlen: B == 1, Sq/Sk = totals
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_sb = 0, q_sh = 0, q_ss = 0;  // element strides (batch, head, sequence); dim stride 1
  int64_t k_sb = 0, k_sh = 0, k_ss = 0;
  int64_t v_sb = 0, v_sh = 0, v_ss = 0;
  // Varlen: nseq sequences, cu_q / cu_k int32 (nseq + 1). Decode: seqused_k int32 (B,).
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  int64_t nseq = 0;
  const int32_t* seqused_k = nullptr;
  // Decode only (seqused_k set): where batch row b's keys live. Positions stay absolute: row b
  // sees keys [leftpad_k[b], seqused_k[b]) (leftpad_k null: from 0), its Sq queries being the
  // last Sq positions before seqused_k[b].
  //   kv_batch_idx (B,) int32: row b reads cache batch row kv_batch_idx[b] (null: row b).
  //   block_table (B, max_blocks) int32, rows block_table_sb apart: a paged cache; k / v are
  //     (num_blocks, Hk, page_size, D) and key j of row b is row j % page_size of block
  //     block_table[b * block_table_sb + j / page_size]. Sk is then max_blocks * page_size.
  // The values are in range (checked before any kernel runs: in C++ on the CPU, by the caller
  // on CUDA).
  const int32_t* leftpad_k = nullptr;
  const int32_t* kv_batch_idx = nullptr;
  const int32_t* block_table = nullptr;
  int64_t block_table_sb = 0;
  int64_t page_size = 0;  // 0: not paged
  int64_t num_blocks = 0;
  double scale = 1.0, softcap = 0.0;
  int64_t window_left = -1, window_right = -1;
  bool align_bottom_right = false;
  const float* alibi = nullptr;  // (H,) or (B, H) fp32
  int64_t alibi_sb = 0;          // 0 for (H,), H for (B, H)
  const void* bias = nullptr;    // additive, in the dtype of q
  int64_t bias_sb = 0, bias_sh = 0, bias_si = 0, bias_sj = 0;
  double dropout_p = 0.0;
  uint64_t seed = 0;
  uint8_t* keep_mask = nullptr;  // optional (B, H, Sq, Sk) bool output (tests)
  // Forward outputs / backward inputs: out (B, H, Sq, D) with unit last stride (the CUDA
  // kernels take it contiguous), lse (B, H, Sq) contiguous in the compute type (fp32; fp64 for
  // fp64 inputs, so fp64 gradients keep fp64 accuracy).
  void* out = nullptr;
  int64_t o_sb = 0, o_sh = 0, o_ss = 0;
  void* lse = nullptr;
  // Backward.
  const void* dout = nullptr;
  int64_t do_sb = 0, do_sh = 0, do_ss = 0;
  void* dq = nullptr;  // (B, H, Sq, D) contiguous
  void* dk = nullptr;  // (B, Hk, Sk, D) contiguous
  void* dv = nullptr;
  int num_threads = 1;
};

}  // namespace attention
}  // namespace genfast
