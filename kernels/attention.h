// Fused attention on NVIDIA tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate),
// for sm_80 and newer. Semantics: the contract in genfast/reference/attention.py, through the
// same Params as the CPU kernels (attention_params.h), minus what this backend leaves to
// Triton (checked in genfast/ops/attention.py before the call): an additive bias, dropout,
// fp32/fp64 storage. Head dims: multiples of 8 in [16, 256].
//
// One kernel serves the forward and the KV-cache decode:
//   * forward: one block per (64 query rows, query head, batch row or varlen sequence);
//   * decode (pack_gqa): the query rows of all G query heads that share a key head are packed
//     into one block's rows, so each K/V tile is read once per group (GQA/MQA decode is then
//     one pass over the cache); with num_splits > 1 (flash-decoding) every block also takes one
//     contiguous chunk of the keys, writes an fp32 partial output and LSE, and a combine kernel
//     merges the chunks by their LSEs.
// The backward (head dims up to kBackwardMaxHeadDim) is two kernels without atomics, so it is
// deterministic: dQ per query tile, dK/dV per key tile (looping over the G query heads of the
// key head), both recomputing P from the forward's LSE.
#pragma once
#include <cstdint>

#include "attention_params.h"

namespace genfast {
namespace attention {

constexpr int kBackwardMaxHeadDim = 128;  // read by Python as _C.ATTENTION_CUDA_BACKWARD_MAX_HEAD_DIM

struct CudaArgs {
  Params p;                  // q/k/v/out/lse/strides/masking; dtype F16 or BF16
  int64_t max_seqlen_q = 0;  // varlen: the longest query / key sequences (size the grids)
  int64_t max_seqlen_k = 0;
  bool pack_gqa = false;        // rows of the H / Hk query heads of a key head share one block
  int num_splits = 1;           // > 1: split the keys into chunks (needs the two workspaces)
  void* out_partial = nullptr;  // fp32 (num_splits, B, H, Sq, D)
  void* lse_partial = nullptr;  // fp32 (num_splits, B, H, Sq)
  const void* delta = nullptr;  // backward: fp32 (B, H, Sq) rowsum(dout * out)
  uintptr_t stream = 0;
  int device = 0;
};

#ifdef GENFAST_WITH_CUDA
void forward_cuda(const CudaArgs& a);   // p.out, p.lse (and the split workspaces)
void backward_cuda(const CudaArgs& a);  // p.dout, p.lse, delta -> p.dq, p.dk, p.dv (contiguous)
#endif

}  // namespace attention
}  // namespace genfast
