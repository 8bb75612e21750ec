// Fused attention on tensor cores (see attention.h): forward, split-KV decode, backward.
//
// FlashAttention-2 structure: a forward block holds 64 query rows (4 warps x 16 rows) in shared
// memory and walks the key/value tiles, the next tile arriving by cp.async while the current
// one is used (two stages); each warp computes its 16 x kBN score tile with mma.sync.m16n8k16
// (fp16/bf16 operands from ldmatrix, fp32 accumulators), applies scale / softcap / ALiBi /
// masks, updates the online softmax (exp2, running max and sum per row) and multiplies the
// probabilities by V straight from registers: the score accumulator's layout is the A operand's
// layout, so P never goes back to shared memory. The backward kernels reuse the same pieces.
//
// Register fragments of mma.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// lane = 4 g + t:
//   A (16x16, row): reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
//   B (16x8, col):  reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
//   C (16x8, fp32): c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1]
// Shared-memory rows are padded by 8 elements (16 bytes) so that the 8 row addresses of each
// ldmatrix phase fall in 8 different groups of 4 banks.
//
// Decode caches: a per-row left pad (the first key; positions stay absolute), a per-row cache
// batch row (kv_batch_idx) or pages (block_table): a paged tile is loaded row by row, each row's
// address from its page, so a tile may span several pages and a page several tiles.
//
// tests/test_attention_cuda_emulated.py runs this file on the CPU (tests/cuda_emulation).
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention.h"
#include "common.h"
#include "cuda_common.cuh"

namespace genfast {
namespace attention {
namespace {

using cuda::Cvt;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBM = 16 * kWarps;  // query rows per block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr const char* kFamily = "attention";

// Keys per tile: 64, or 32 for head dims above 128 (registers: the output accumulator alone
// takes kDP / 2 floats per thread).
__host__ __device__ constexpr int block_n(int dp) { return dp <= 128 ? 64 : 32; }
__host__ __device__ constexpr int row_pitch(int dp) { return dp + 8; }  // in 16-bit elements
// Forward: Q, and two stages of K and V (the next tile is copied while this one is used).
constexpr size_t smem_bytes(int dp) { return size_t(kBM + 4 * block_n(dp)) * row_pitch(dp) * sizeof(uint16_t); }

template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  // d += a * b
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(GENFAST_CUDA_EMULATION)
    gf_emu::mma_m16n8k16<__half>(d, a, b0, b1);
#else
    __trap();  // the host refuses devices below sm_80 before launching
#endif
  }
};
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(GENFAST_CUDA_EMULATION)
    gf_emu::mma_m16n8k16<__nv_bfloat16>(d, a, b0, b1);
#else
    __trap();
#endif
  }
};

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---- ldmatrix (four 8x8 16-bit matrices per instruction: lanes 8i..8i+7 give the row
// addresses of matrix i, each lane receives one register per matrix in the mma fragment order)
// and cp.async (16-byte global -> shared copies that bypass the registers), both sm_80+.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row_address) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t a = uint32_t(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#elif defined(GENFAST_CUDA_EMULATION)
  gf_emu::ldmatrix<4, false>(r, row_address);
#else
  __trap();
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row_address) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t a = uint32_t(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#elif defined(GENFAST_CUDA_EMULATION)
  gf_emu::ldmatrix<4, true>(r, row_address);
#else
  __trap();
#endif
}
// Copies 16 bytes, or writes 16 zero bytes when !fill (src must still be a valid address).
__device__ __forceinline__ void cp_async_16(uint16_t* dst, const void* src, bool fill) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t d = uint32_t(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(fill ? 16 : 0));
#elif defined(GENFAST_CUDA_EMULATION)
  gf_emu::cp_async_16(dst, src, fill ? 16 : 0);
#else
  __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#elif defined(GENFAST_CUDA_EMULATION)
  gf_emu::cp_async_commit();
#endif
}
// Waits until at most kPending of this thread's committed copy groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#elif defined(GENFAST_CUDA_EMULATION)
  gf_emu::cp_async_wait(kPending);
#endif
}

// ---- fragments (see the layout table at the top) of 16-bit shared-memory matrices, row pitch kLD.
// A operand: rows m0..m0+15, columns k0..k0+15 of a row-major matrix.
template <int kLD>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const uint16_t* s, int m0, int k0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4(a, s + (m0 + (lane & 15)) * kLD + k0 + (lane >> 4) * 8);
}
// B operands of two n8 blocks (n0, n0 + 8) x k16 from k0, stored transposed: row n of `s` is
// column n of B (K in Q K^T).
template <int kLD>
__device__ __forceinline__ void frag_b_transposed_pair(uint32_t (&b)[2][2], const uint16_t* s, int n0, int k0) {
  const int lane = threadIdx.x & 31, i = lane >> 3;
  uint32_t r[4];
  ldmatrix_x4(r, s + (n0 + (lane & 7) + 8 * (i >> 1)) * kLD + k0 + 8 * (i & 1));
  b[0][0] = r[0];
  b[0][1] = r[1];
  b[1][0] = r[2];
  b[1][1] = r[3];
}
// B operands of two n8 blocks (n0, n0 + 8) x k16 from k0, stored as is: row k of `s` is row k
// of B (V in P V).
template <int kLD>
__device__ __forceinline__ void frag_b_pair(uint32_t (&b)[2][2], const uint16_t* s, int k0, int n0) {
  const int lane = threadIdx.x & 31, i = lane >> 3;
  uint32_t r[4];
  ldmatrix_x4_trans(r, s + (k0 + (lane & 7) + 8 * (i & 1)) * kLD + n0 + 8 * (i >> 1));
  b[0][0] = r[0];
  b[0][1] = r[1];
  b[1][0] = r[2];
  b[1][1] = r[3];
}
// The accumulators of two n8 blocks (2kk, 2kk + 1) as the A operand of the next product.
template <typename T, int kN>
__device__ __forceinline__ void accumulator_as_a(uint32_t (&a)[4], const float (&c)[kN][4], int kk) {
  a[0] = Mma<T>::pack(c[2 * kk][0], c[2 * kk][1]);
  a[1] = Mma<T>::pack(c[2 * kk][2], c[2 * kk][3]);
  a[2] = Mma<T>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = Mma<T>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Mma<T>::run(d, a, b[0], b[1]);
}

// c = A B^T over the head dim (zero padding skipped): A's 16 rows from m0 and B's kN8 * 8 rows,
// both row-major in shared memory (the Q K^T shape: scores, dP = dO V^T and their transposes).
template <typename T, int kLD, int kKD, int kN8>
__device__ __forceinline__ void product_abt(float (&c)[kN8][4], const uint16_t* sA, int m0, const uint16_t* sB,
                                            int64_t D) {
#pragma unroll
  for (int n = 0; n < kN8; ++n) c[n][0] = c[n][1] = c[n][2] = c[n][3] = 0.0f;
#pragma unroll
  for (int kd = 0; kd < kKD; ++kd) {
    if (kd * 16 >= D) break;  // the padding is zero: skip it
    uint32_t af[4];
    frag_a<kLD>(af, sA, m0, kd * 16);
#pragma unroll
    for (int n = 0; n < kN8; n += 2) {
      uint32_t bf[2][2];
      frag_b_transposed_pair<kLD>(bf, sB, n * 8, kd * 16);
      mma<T>(c[n], af, bf[0]);
      mma<T>(c[n + 1], af, bf[1]);
    }
  }
}

// acc += C B: C the warp's 16 x (kNC * 8) accumulator tile (used as A operands straight from
// registers), B row-major in shared memory with kNC * 8 rows (the P V shape).
template <typename T, int kLD, int kND, int kNC>
__device__ __forceinline__ void accumulate_cb(float (&acc)[kND][4], const float (&c)[kNC][4], const uint16_t* sB,
                                              int64_t D) {
#pragma unroll
  for (int kk = 0; kk < kNC / 2; ++kk) {
    uint32_t cf[4];
    accumulator_as_a<T>(cf, c, kk);
#pragma unroll
    for (int nd = 0; nd < kND; nd += 2) {
      if (nd * 8 >= D) break;
      uint32_t bf[2][2];
      frag_b_pair<kLD>(bf, sB, kk * 16, nd * 8);
      mma<T>(acc[nd], cf, bf[0]);
      mma<T>(acc[nd + 1], cf, bf[1]);
    }
  }
}

// Rows [row0, row0 + kRows) of a row-major (n_rows, D) matrix -> shared memory, as 16-byte
// vectors; rows past n_rows and the head-dim padding become 0 (finite: 0-weight rows must not
// meet NaN garbage).
template <int kRows, int kDP, typename T>
__device__ __forceinline__ void load_rows(uint16_t* dst, const T* src, int64_t row_stride, int64_t row0, int64_t n_rows,
                                          int64_t D) {
  constexpr int kChunks = kDP / 8;
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, d = (c % kChunks) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (row0 + r < n_rows && d < D) v = *reinterpret_cast<const uint4*>(src + (row0 + r) * row_stride + d);
    *reinterpret_cast<uint4*>(dst + r * row_pitch(kDP) + d) = v;
  }
}

// load_rows with cp.async: issued here, landed by cp_async_wait (zero fill needs no source).
template <int kRows, int kDP, typename T>
__device__ __forceinline__ void load_rows_async(uint16_t* dst, const T* src, int64_t row_stride, int64_t row0,
                                                int64_t n_rows, int64_t D) {
  constexpr int kChunks = kDP / 8;
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, d = (c % kChunks) * 8;
    const bool fill = row0 + r < n_rows && d < D;
    cp_async_16(dst + r * row_pitch(kDP) + d, fill ? src + (row0 + r) * row_stride + d : src, fill);
  }
}

// K and V tiles of a paged cache: keys [row0, row0 + kRows), key j at row j % page_size of block
// table[j / page_size] (k / v: block 0 at this key head). Rows outside [lo, hi) become 0 without
// being read (their pages may not exist); so does the head-dim padding. Each page row starts
// 16-byte aligned (strides are multiples of 8 elements), so every copy stays a 16-byte cp.async.
template <int kRows, int kDP, typename T>
__device__ __forceinline__ void load_paged_rows_async(uint16_t* dst_k, uint16_t* dst_v, const T* k, const T* v,
                                                      const Params& p, const int32_t* table, int64_t row0, int64_t lo,
                                                      int64_t hi, int64_t D) {
  constexpr int kChunks = kDP / 8;
  for (int c = threadIdx.x; c < kRows * kChunks; c += kThreads) {
    const int r = c / kChunks, d = (c % kChunks) * 8;
    const int64_t j = row0 + r;
    const bool fill = j >= lo && j < hi && d < D;
    const T* ks = k;
    const T* vs = v;
    if (fill) {  // 0 <= j < seqused_k <= INT32_MAX: 32-bit division
      const uint32_t page = uint32_t(p.page_size);
      const int64_t block = table[uint32_t(j) / page], row = uint32_t(j) % page;
      ks = k + block * p.k_sb + row * p.k_ss + d;
      vs = v + block * p.v_sb + row * p.v_ss + d;
    }
    cp_async_16(dst_k + r * row_pitch(kDP) + d, ks, fill);
    cp_async_16(dst_v + r * row_pitch(kDP) + d, vs, fill);
  }
}

// One sequence of the problem: offsets into the packed tokens (varlen), its lengths (decode:
// the used cache length), and its index into the batch strides.
struct Extent {
  int64_t q_off = 0, k_off = 0, Sq = 0, Sk = 0, batch = 0;
};
__device__ __forceinline__ Extent extent_of(const Params& p, int64_t seq) {
  Extent e;
  e.Sq = p.Sq;
  e.Sk = p.Sk;
  e.batch = seq;
  if (p.cu_q != nullptr) {
    e.q_off = p.cu_q[seq];
    e.Sq = p.cu_q[seq + 1] - e.q_off;
    e.k_off = p.cu_k[seq];
    e.Sk = p.cu_k[seq + 1] - e.k_off;
    e.batch = 0;
  }
  if (p.seqused_k != nullptr) e.Sk = p.seqused_k[seq];
  return e;
}

// The contract's score of (query i, key j) from the raw q.k: scale, softcap, ALiBi, window and
// end masks; in log2 units (the kernels use exp2).
struct ScoreRules {
  float scale, scale_log2, cap_in, cap_out;
  bool softcapped;
  int64_t window_left, window_right, off, Sk;

  __device__ __forceinline__ bool allowed(int64_t i, int64_t j) const {
    const int64_t rel = j - (i + off);
    return j < Sk && (window_left < 0 || rel >= -window_left) && (window_right < 0 || rel <= window_right);
  }
  // Whether any pair of queries [i_lo, i_hi] x keys [j0, j1) is masked (else skip the checks).
  __device__ __forceinline__ bool any_masked(int64_t i_lo, int64_t i_hi, int64_t j0, int64_t j1) const {
    return j1 > Sk || (window_left >= 0 && j0 < i_hi + off - window_left) ||
           (window_right >= 0 && j1 - 1 > i_lo + off + window_right);
  }
  // Score in log2 units (-inf where masked); dscore_draw = d(score in natural units)/d(raw q.k).
  __device__ __forceinline__ float log2_score(float raw, int64_t i, int64_t j, float slope_log2, bool check_mask,
                                              float& dscore_draw) const {
    float x;
    if (softcapped) {
      const float th = tanhf(raw * cap_in);
      x = cap_out * th;
      dscore_draw = scale * (1.0f - th * th);
    } else {
      x = raw * scale_log2;
      dscore_draw = scale;
    }
    if (slope_log2 != 0.0f) x -= slope_log2 * fabsf(float(i + off - j));
    if (check_mask && !allowed(i, j)) x = -INFINITY;
    return x;
  }
};
__device__ __forceinline__ ScoreRules score_rules(const Params& p, const Extent& e) {
  ScoreRules r;
  r.softcapped = p.softcap > 0;
  r.scale = float(p.scale);
  r.scale_log2 = float(p.scale) * kLog2e;
  r.cap_in = r.softcapped ? float(p.scale / p.softcap) : 0.0f;
  r.cap_out = float(p.softcap) * kLog2e;
  r.window_left = p.window_left;
  r.window_right = p.window_right;
  r.off = p.align_bottom_right ? e.Sk - e.Sq : 0;
  r.Sk = e.Sk;
  return r;
}
// ALiBi slope of head h in log2 units (0 without ALiBi).
__device__ __forceinline__ float alibi_slope_log2(const Params& p, int64_t seq, int64_t h) {
  return p.alibi != nullptr ? p.alibi[seq * p.alibi_sb + h] * kLog2e : 0.0f;
}

// Grid: x = tiles of kBM rows, y = head groups (query heads, or key heads when pack_gqa),
// z = (batch row or varlen sequence) * num_splits + split. Decode (seqused_k) also takes the
// cache index of Params: a left pad per row (the first key), a cache batch row per row, or a
// paged cache (K/V rows looked up in the block table as each tile is loaded).
template <typename T, int kDP>
__global__ void __launch_bounds__(kThreads) forward_kernel(const CudaArgs a) {
  constexpr int kBN = block_n(kDP), kLD = row_pitch(kDP);
  constexpr int kNB = kBN / 8;   // n8 blocks of scores
  constexpr int kND = kDP / 8;   // n8 blocks of the output
  constexpr int kKD = kDP / 16;  // k16 steps over the head dim
  GF_DYNAMIC_SHARED(uint16_t, smem);
  uint16_t* sQ = smem;
  uint16_t* sK_stages = sQ + kBM * kLD;  // [2][kBN][kLD]
  uint16_t* sV_stages = sK_stages + 2 * kBN * kLD;

  const Params& p = a.p;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int64_t G = p.H / p.Hk;
  const int64_t Gp = a.pack_gqa ? G : 1;
  const int64_t split = blockIdx.z % unsigned(a.num_splits);
  const int64_t seq = blockIdx.z / unsigned(a.num_splits);
  const int64_t hg = blockIdx.y;
  const int64_t hk = a.pack_gqa ? hg : hg / G;
  const Extent ext = extent_of(p, seq);
  const int64_t Sq = ext.Sq, Sk = ext.Sk;
  const int64_t rows = Sq * Gp;  // packed rows: m = (head in group) * Sq + query position
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  if (m0 >= rows) return;
  auto head_of = [&](int64_t m) { return a.pack_gqa ? hg * G + m / Sq : hg; };
  auto pos_of = [&](int64_t m) { return a.pack_gqa ? m % Sq : m; };

  // Q tile -> shared memory (16-byte vectors; rows past the end and the head-dim padding are 0).
  const T* q = static_cast<const T*>(p.q);
  for (int c = tid; c < kBM * kND; c += kThreads) {
    const int r = c / kND, d = (c % kND) * 8;
    const int64_t m = m0 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (m < rows && d < p.D)
      v = *reinterpret_cast<const uint4*>(q + ext.batch * p.q_sb + head_of(m) * p.q_sh +
                                          (ext.q_off + pos_of(m)) * p.q_ss + d);
    *reinterpret_cast<uint4*>(sQ + r * kLD + d) = v;
  }

  // Keys any row of this block may see: the window's union over the block's query positions,
  // intersected with this split's chunk (a whole number of tiles, so no tile straddles two).
  const ScoreRules rules = score_rules(p, ext);
  const int64_t m_last = min(m0 + kBM, rows) - 1;
  int64_t i_lo = pos_of(m0), i_hi = pos_of(m_last);
  if (a.pack_gqa && m0 / Sq != m_last / Sq) {
    i_lo = 0;
    i_hi = Sq - 1;
  }
  // Decode: keys before the row's left pad are not its own (positions stay absolute).
  const int64_t k_lo = p.leftpad_k != nullptr ? int64_t(p.leftpad_k[seq]) : 0;
  int64_t j_begin = k_lo, j_end = Sk;
  if (p.window_left >= 0) j_begin = max(j_begin, i_lo + rules.off - p.window_left);
  if (p.window_right >= 0) j_end = min(j_end, i_hi + rules.off + p.window_right + 1);
  if (a.num_splits > 1) {
    const int64_t tiles = (p.Sk + kBN - 1) / kBN;  // p.Sk: the cache length, the same for every row
    const int64_t chunk = (tiles + a.num_splits - 1) / a.num_splits * kBN;
    j_begin = max(j_begin, split * chunk);
    j_end = min(j_end, (split + 1) * chunk);
  }

  // This thread's two rows: r_a and r_a + 8 of the warp's 16.
  const int r_a = warp * 16 + g;
  bool valid[2];
  int64_t pos[2];
  float slope[2];
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t m = m0 + r_a + 8 * rr;
    valid[rr] = m < rows;
    const int64_t safe_m = valid[rr] ? m : m0;
    pos[rr] = pos_of(safe_m);
    slope[rr] = alibi_slope_log2(p, seq, head_of(safe_m));
  }
  const bool warp_active = m0 + warp * 16 < rows;  // warp-uniform

  float acc[kND][4];
#pragma unroll
  for (int nd = 0; nd < kND; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units
  float row_sum[2] = {0.0f, 0.0f};            // this thread's columns only; reduced at the end

  // K/V rows: of cache batch row kv_batch_idx[seq] (decode) or ext.batch; paged, k_base / v_base
  // are block 0 at this key head and each row is found through this row's block table (a
  // runtime branch per tile, uniform over the block; the linear path is unchanged).
  const bool paged = p.block_table != nullptr;
  const int32_t* table = p.block_table + (paged ? seq * p.block_table_sb : 0);
  const int64_t kv_b = paged ? 0 : p.kv_batch_idx != nullptr ? int64_t(p.kv_batch_idx[seq]) : ext.batch;
  const T* k_base = static_cast<const T*>(p.k) + kv_b * p.k_sb + hk * p.k_sh + ext.k_off * p.k_ss;
  const T* v_base = static_cast<const T*>(p.v) + kv_b * p.v_sb + hk * p.v_sh + ext.k_off * p.v_ss;
  auto load_tile = [&](int s, int64_t n0) {
    uint16_t* sK = sK_stages + s * kBN * kLD;
    uint16_t* sV = sV_stages + s * kBN * kLD;
    if (paged) {
      load_paged_rows_async<kBN, kDP>(sK, sV, k_base, v_base, p, table, n0, k_lo, Sk, p.D);
    } else {
      load_rows_async<kBN, kDP>(sK, k_base, p.k_ss, n0, Sk, p.D);
      load_rows_async<kBN, kDP>(sV, v_base, p.v_ss, n0, Sk, p.D);
    }
  };

  // Two-stage pipeline: while the warps work on tile n (stage n % 2), cp.async brings tile
  // n + 1 into the other stage.
  const int64_t n_first = j_begin / kBN * kBN;
  if (n_first < j_end) load_tile(0, n_first);
  cp_async_commit();
  int stage = 0;
  for (int64_t n0 = n_first; n0 < j_end; n0 += kBN, stage ^= 1) {
    const uint16_t* sK = sK_stages + stage * kBN * kLD;
    const uint16_t* sV = sV_stages + stage * kBN * kLD;
    // (the other stage was released by the barrier ending the last iteration)
    if (n0 + kBN < j_end) load_tile(stage ^ 1, n0 + kBN);
    cp_async_commit();   // (possibly empty: keeps one group per iteration)
    cp_async_wait<1>();  // this tile's group has landed; the next one may still be in flight
    __syncthreads();     // ... for every thread's copies (and, first time, Q is stored)
    if (warp_active) {
      // S = Q K^T for the warp's 16 rows x kBN keys.
      float s[kNB][4];
      product_abt<T, kLD, kKD>(s, sQ, warp * 16, sK, p.D);

      // Scores in log2 units; masks only on tiles that cross the end or a window edge, and
      // the decode's left pad (only the first tile can cross it: j_begin >= k_lo).
      const bool need_mask = rules.any_masked(i_lo, i_hi, n0, n0 + kBN);
      const bool below_pad = n0 < k_lo;
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int rr = e >> 1;
          const int64_t j = n0 + nb * 8 + 2 * t + (e & 1);
          float unused_grad;
          s[nb][e] = rules.log2_score(s[nb][e], pos[rr], j, slope[rr], need_mask, unused_grad);
          if (below_pad && j < k_lo) s[nb][e] = -INFINITY;
          tile_max[rr] = fmaxf(tile_max[rr], s[nb][e]);
        }
      }

      // Online softmax: new running max, rescale the accumulators, P = exp2(S - max).
      float base[2], alpha[2], tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const float m_new = fmaxf(row_max[rr], quad_max(tile_max[rr]));
        base[rr] = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing allowed yet: p = 0, no NaN
        alpha[rr] = exp2f(row_max[rr] - base[rr]);
        row_max[rr] = m_new;
      }
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nb][e] = exp2f(s[nb][e] - base[e >> 1]);
          tile_sum[e >> 1] += s[nb][e];
        }
      }
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) row_sum[rr] = row_sum[rr] * alpha[rr] + tile_sum[rr];
#pragma unroll
      for (int nd = 0; nd < kND; ++nd) {
        acc[nd][0] *= alpha[0];
        acc[nd][1] *= alpha[0];
        acc[nd][2] *= alpha[1];
        acc[nd][3] *= alpha[1];
      }

      // O += P V: P stays in registers (two n8 score blocks form one k16 A fragment).
      accumulate_cb<T, kLD>(acc, s, sV, p.D);
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  if (!warp_active) return;
  const int64_t rows_total = p.B * p.H * p.Sq;  // rows of out / lse (varlen: B == 1, Sq = total)
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float sum = quad_sum(row_sum[rr]);  // all lanes take part: the shuffles need the full warp
    if (!valid[rr]) continue;
    const int64_t m = m0 + r_a + 8 * rr;
    const int64_t row = (ext.batch * p.H + head_of(m)) * p.Sq + ext.q_off + pos_of(m);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // no allowed key: out = 0, lse = -inf
    const float lse = sum > 0.0f ? row_max[rr] * kLn2 + logf(sum) : -INFINITY;
    if (a.num_splits > 1) {
      float* o = static_cast<float*>(a.out_partial) + (split * rows_total + row) * p.D;
#pragma unroll
      for (int nd = 0; nd < kND; ++nd) {
        if (nd * 8 >= p.D) break;
        *reinterpret_cast<float2*>(o + nd * 8 + 2 * t) = make_float2(acc[nd][2 * rr] * inv, acc[nd][2 * rr + 1] * inv);
      }
      if (t == 0) static_cast<float*>(a.lse_partial)[split * rows_total + row] = lse;
    } else {
      T* o = static_cast<T*>(p.out) + row * p.D;
#pragma unroll
      for (int nd = 0; nd < kND; ++nd) {
        if (nd * 8 >= p.D) break;
        *reinterpret_cast<uint32_t*>(o + nd * 8 + 2 * t) =
            Mma<T>::pack(acc[nd][2 * rr] * inv, acc[nd][2 * rr + 1] * inv);
      }
      if (t == 0) static_cast<float*>(p.lse)[row] = lse;
    }
  }
}

// Flash-decoding combine: out = sum_s exp(lse_s - lse) out_s, lse = logsumexp_s lse_s.
// One warp per output row (rows of the contiguous (B, H, Sq) output).
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const CudaArgs a) {
  const Params& p = a.p;
  const int64_t rows_total = p.B * p.H * p.Sq;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows_total) return;
  const float* lse_part = static_cast<const float*>(a.lse_partial);
  const float* out_part = static_cast<const float*>(a.out_partial);
  float mx = -INFINITY;
  for (int s = 0; s < a.num_splits; ++s) mx = fmaxf(mx, lse_part[s * rows_total + row]);
  float lse = -INFINITY;
  if (mx != -INFINITY) {
    float total = 0.0f;
    for (int s = 0; s < a.num_splits; ++s) total += expf(lse_part[s * rows_total + row] - mx);
    lse = mx + logf(total);
  }
  T* out = static_cast<T*>(p.out) + row * p.D;
  for (int64_t d = lane; d < p.D; d += 32) {
    float v = 0.0f;
    if (lse != -INFINITY) {
      for (int s = 0; s < a.num_splits; ++s) {
        const float w = expf(lse_part[s * rows_total + row] - lse);
        if (w > 0.0f) v += w * out_part[(s * rows_total + row) * p.D + d];
      }
    }
    out[d] = Cvt<T>::from(v);
  }
  if (lane == 0) static_cast<float*>(p.lse)[row] = lse;
}

// ---- backward (FlashAttention-2 recomputation; deterministic: no atomics).
// With P = exp(s - lse), dP = dO V^T, delta = rowsum(dO o O) (from the caller) and
// dS = P o (dP - delta) o dscore/draw (the softcap's chain rule, the scale):
//   dQ = dS K        (backward_dq_kernel: one block per query tile, over the key tiles)
//   dK = dS^T Q, dV = P^T dO   (backward_dkdv_kernel: one block per key tile, over the query
//                               tiles and the G query heads of its key head)
// S and dP are recomputed in each kernel. Rows whose lse is -inf (no allowed key) have P = 0.

// lse in log2 units, +inf for rows with no allowed key or past the end, so exp2(x - it) = 0.
__device__ __forceinline__ float lse_log2(const float* lse, int64_t row, bool valid) {
  if (!valid) return INFINITY;
  const float l = lse[row];
  return l == -INFINITY ? INFINITY : l * kLog2e;
}

// Grid: x = query tiles of kBM rows, y = query heads, z = batch rows / varlen sequences.
template <typename T, int kDP>
__global__ void __launch_bounds__(kThreads) backward_dq_kernel(const CudaArgs a) {
  constexpr int kBN = block_n(kDP), kLD = row_pitch(kDP);
  constexpr int kNB = kBN / 8, kND = kDP / 8, kKD = kDP / 16;
  GF_DYNAMIC_SHARED(uint16_t, smem);
  uint16_t* sQ = smem;
  uint16_t* sdO = sQ + kBM * kLD;
  uint16_t* sK = sdO + kBM * kLD;
  uint16_t* sV = sK + kBN * kLD;

  const Params& p = a.p;
  const int tid = threadIdx.x, warp = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
  const int64_t h = blockIdx.y, seq = blockIdx.z, hk = h / (p.H / p.Hk);
  const Extent ext = extent_of(p, seq);
  const int64_t i0 = int64_t(blockIdx.x) * kBM;
  if (i0 >= ext.Sq) return;
  const ScoreRules rules = score_rules(p, ext);
  load_rows<kBM, kDP>(sQ, static_cast<const T*>(p.q) + ext.batch * p.q_sb + h * p.q_sh + ext.q_off * p.q_ss, p.q_ss, i0,
                      ext.Sq, p.D);
  load_rows<kBM, kDP>(sdO, static_cast<const T*>(p.dout) + ext.batch * p.do_sb + h * p.do_sh + ext.q_off * p.do_ss,
                      p.do_ss, i0, ext.Sq, p.D);

  const int64_t i_hi = min(i0 + kBM, ext.Sq) - 1;
  int64_t j_begin = 0, j_end = ext.Sk;
  if (p.window_left >= 0) j_begin = max(j_begin, i0 + rules.off - p.window_left);
  if (p.window_right >= 0) j_end = min(j_end, i_hi + rules.off + p.window_right + 1);

  const int64_t stats = (ext.batch * p.H + h) * p.Sq + ext.q_off;  // row 0 of this sequence in lse / delta
  const float slope = alibi_slope_log2(p, seq, h);
  int64_t pos[2];
  float lse2[2], delta[2];
  for (int rr = 0; rr < 2; ++rr) {
    pos[rr] = i0 + warp * 16 + g + 8 * rr;
    const bool valid = pos[rr] < ext.Sq;
    lse2[rr] = lse_log2(static_cast<const float*>(p.lse), stats + pos[rr], valid);
    delta[rr] = valid ? static_cast<const float*>(a.delta)[stats + pos[rr]] : 0.0f;
  }
  const bool warp_active = i0 + warp * 16 < ext.Sq;

  float dq[kND][4];
#pragma unroll
  for (int nd = 0; nd < kND; ++nd) dq[nd][0] = dq[nd][1] = dq[nd][2] = dq[nd][3] = 0.0f;
  const T* k_base = static_cast<const T*>(p.k) + ext.batch * p.k_sb + hk * p.k_sh + ext.k_off * p.k_ss;
  const T* v_base = static_cast<const T*>(p.v) + ext.batch * p.v_sb + hk * p.v_sh + ext.k_off * p.v_ss;

  for (int64_t n0 = j_begin / kBN * kBN; n0 < j_end; n0 += kBN) {
    __syncthreads();
    load_rows<kBN, kDP>(sK, k_base, p.k_ss, n0, ext.Sk, p.D);
    load_rows<kBN, kDP>(sV, v_base, p.v_ss, n0, ext.Sk, p.D);
    __syncthreads();
    if (!warp_active) continue;

    // S = Q K^T and dP = dO V^T (the warp's 16 queries x kBN keys).
    float s[kNB][4], dp[kNB][4];
    product_abt<T, kLD, kKD>(s, sQ, warp * 16, sK, p.D);
    product_abt<T, kLD, kKD>(dp, sdO, warp * 16, sV, p.D);
    // dS with respect to the raw q.k, in place of S.
    const bool need_mask = rules.any_masked(i0, i_hi, n0, n0 + kBN);
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rr = e >> 1;
        float dscore_draw;
        const float x =
            rules.log2_score(s[nb][e], pos[rr], n0 + nb * 8 + 2 * t + (e & 1), slope, need_mask, dscore_draw);
        const float prob = exp2f(x - lse2[rr]);
        s[nb][e] = prob * (dp[nb][e] - delta[rr]) * dscore_draw;
      }
    }
    // dQ += dS K.
    accumulate_cb<T, kLD>(dq, s, sK, p.D);
  }

  if (!warp_active) return;
  for (int rr = 0; rr < 2; ++rr) {
    if (pos[rr] >= ext.Sq) continue;
    T* o = static_cast<T*>(p.dq) + ((ext.batch * p.H + h) * p.Sq + ext.q_off + pos[rr]) * p.D;
#pragma unroll
    for (int nd = 0; nd < kND; ++nd) {
      if (nd * 8 >= p.D) break;
      *reinterpret_cast<uint32_t*>(o + nd * 8 + 2 * t) = Mma<T>::pack(dq[nd][2 * rr], dq[nd][2 * rr + 1]);
    }
  }
}

constexpr int kBK = 16 * kWarps;  // keys per dK/dV block (16 per warp: the mma rows)
constexpr int kBQ = 32;           // query rows per step of the dK/dV block
constexpr size_t dkdv_smem_bytes(int dp) {
  return size_t(2 * kBK + 2 * kBQ) * row_pitch(dp) * sizeof(uint16_t) + 2 * kBQ * sizeof(float);
}

// Per warp the products are transposed so that its 16 keys are the mma rows:
// S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q.
// Grid: x = key tiles of kBK keys, y = key heads, z = batch rows / varlen sequences.
template <typename T, int kDP>
__global__ void __launch_bounds__(kThreads) backward_dkdv_kernel(const CudaArgs a) {
  constexpr int kLD = row_pitch(kDP);
  constexpr int kNQ = kBQ / 8, kND = kDP / 8, kKD = kDP / 16;
  GF_DYNAMIC_SHARED(uint16_t, smem);
  uint16_t* sK = smem;
  uint16_t* sV = sK + kBK * kLD;
  uint16_t* sQ = sV + kBK * kLD;
  uint16_t* sdO = sQ + kBQ * kLD;
  float* s_lse2 = reinterpret_cast<float*>(sdO + kBQ * kLD);
  float* s_delta = s_lse2 + kBQ;

  const Params& p = a.p;
  const int tid = threadIdx.x, warp = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
  const int64_t hk = blockIdx.y, seq = blockIdx.z, G = p.H / p.Hk;
  const Extent ext = extent_of(p, seq);
  const int64_t j0 = int64_t(blockIdx.x) * kBK;
  if (j0 >= ext.Sk) return;
  const ScoreRules rules = score_rules(p, ext);
  load_rows<kBK, kDP>(sK, static_cast<const T*>(p.k) + ext.batch * p.k_sb + hk * p.k_sh + ext.k_off * p.k_ss, p.k_ss,
                      j0, ext.Sk, p.D);
  load_rows<kBK, kDP>(sV, static_cast<const T*>(p.v) + ext.batch * p.v_sb + hk * p.v_sh + ext.k_off * p.v_ss, p.v_ss,
                      j0, ext.Sk, p.D);

  // Queries that may see a key of this tile: i + off - window_left <= j <= i + off + window_right.
  const int64_t j_hi = min(j0 + kBK, ext.Sk) - 1;
  int64_t q_begin = 0, q_end = ext.Sq;
  if (p.window_right >= 0) q_begin = max(q_begin, j0 - rules.off - p.window_right);
  if (p.window_left >= 0) q_end = min(q_end, j_hi - rules.off + p.window_left + 1);

  int64_t key[2];
  for (int rr = 0; rr < 2; ++rr) key[rr] = j0 + warp * 16 + g + 8 * rr;
  const bool warp_active = j0 + warp * 16 < ext.Sk;
  float dk[kND][4], dv[kND][4];
#pragma unroll
  for (int nd = 0; nd < kND; ++nd)
    for (int e = 0; e < 4; ++e) dk[nd][e] = dv[nd][e] = 0.0f;

  for (int64_t gh = 0; gh < G; ++gh) {
    const int64_t h = hk * G + gh;
    const float slope = alibi_slope_log2(p, seq, h);
    const T* q_base = static_cast<const T*>(p.q) + ext.batch * p.q_sb + h * p.q_sh + ext.q_off * p.q_ss;
    const T* do_base = static_cast<const T*>(p.dout) + ext.batch * p.do_sb + h * p.do_sh + ext.q_off * p.do_ss;
    const int64_t stats = (ext.batch * p.H + h) * p.Sq + ext.q_off;
    for (int64_t i0 = q_begin / kBQ * kBQ; i0 < q_end; i0 += kBQ) {
      __syncthreads();  // every warp is done with the previous Q / dO tile (first time: K, V are stored)
      load_rows<kBQ, kDP>(sQ, q_base, p.q_ss, i0, ext.Sq, p.D);
      load_rows<kBQ, kDP>(sdO, do_base, p.do_ss, i0, ext.Sq, p.D);
      for (int r = tid; r < kBQ; r += kThreads) {
        const bool valid = i0 + r < ext.Sq;
        s_lse2[r] = lse_log2(static_cast<const float*>(p.lse), stats + i0 + r, valid);
        s_delta[r] = valid ? static_cast<const float*>(a.delta)[stats + i0 + r] : 0.0f;
      }
      __syncthreads();
      if (!warp_active) continue;

      // S^T = K Q^T and dP^T = V dO^T (the warp's 16 keys x kBQ queries).
      float st[kNQ][4], dpt[kNQ][4];
      product_abt<T, kLD, kKD>(st, sK, warp * 16, sQ, p.D);
      product_abt<T, kLD, kKD>(dpt, sV, warp * 16, sdO, p.D);
      // P^T in place of S^T, dS^T (with respect to the raw q.k) in place of dP^T.
      const bool need_mask = rules.any_masked(i0, min(i0 + kBQ, ext.Sq) - 1, j0, j0 + kBK);
#pragma unroll
      for (int nq = 0; nq < kNQ; ++nq) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nq * 8 + 2 * t + (e & 1);
          float dscore_draw;
          const float x = rules.log2_score(st[nq][e], i0 + col, key[e >> 1], slope, need_mask, dscore_draw);
          const float prob = exp2f(x - s_lse2[col]);
          st[nq][e] = prob;
          dpt[nq][e] = prob * (dpt[nq][e] - s_delta[col]) * dscore_draw;
        }
      }
      // dV += P^T dO, dK += dS^T Q (the queries are the k dimension).
      accumulate_cb<T, kLD>(dv, st, sdO, p.D);
      accumulate_cb<T, kLD>(dk, dpt, sQ, p.D);
    }
  }

  if (!warp_active) return;
  for (int rr = 0; rr < 2; ++rr) {
    if (key[rr] >= ext.Sk) continue;
    const int64_t row = ((ext.batch * p.Hk + hk) * p.Sk + ext.k_off + key[rr]) * p.D;
    T* dk_row = static_cast<T*>(p.dk) + row;
    T* dv_row = static_cast<T*>(p.dv) + row;
#pragma unroll
    for (int nd = 0; nd < kND; ++nd) {
      if (nd * 8 >= p.D) break;
      *reinterpret_cast<uint32_t*>(dk_row + nd * 8 + 2 * t) = Mma<T>::pack(dk[nd][2 * rr], dk[nd][2 * rr + 1]);
      *reinterpret_cast<uint32_t*>(dv_row + nd * 8 + 2 * t) = Mma<T>::pack(dv[nd][2 * rr], dv[nd][2 * rr + 1]);
    }
  }
}

template <typename Kernel>
void run_kernel(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, const CudaArgs& a, const char* what) {
  // Above 48 KiB of dynamic shared memory a kernel must opt in (once per device would do; the
  // call is cheap and legal during CUDA-graph capture; the emulation checks the opt-in).
  if (smem > 48 * 1024)
    cuda::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), kFamily,
                "cudaFuncSetAttribute");
  cuda::launch_kernel(kernel, grid, dim3(kThreads), smem, stream, kFamily, what, a);
}

template <typename T, int kDP>
void launch(const CudaArgs& a, cudaStream_t stream) {
  const Params& p = a.p;
  const int64_t G = p.H / p.Hk, Gp = a.pack_gqa ? G : 1;
  const int64_t seqs = p.cu_q != nullptr ? p.nseq : p.B;
  const int64_t max_q = p.cu_q != nullptr ? a.max_seqlen_q : p.Sq;
  const int64_t gx = (max_q * Gp + kBM - 1) / kBM, gy = p.H / Gp, gz = seqs * a.num_splits;
  if (gx == 0 || gy == 0 || gz == 0) return;
  if (gx > 0x7fffffffLL || gy > 65535 || gz > 65535)
    throw std::invalid_argument("genfast attention (CUDA): grid too large (query tiles " + std::to_string(gx) +
                                ", head groups " + std::to_string(gy) + ", batch x splits " + std::to_string(gz) + ")");
  constexpr size_t smem = smem_bytes(kDP);
  run_kernel(forward_kernel<T, kDP>, dim3(unsigned(gx), unsigned(gy), unsigned(gz)), smem, stream, a, "forward launch");
  if (a.num_splits > 1) {
    const int64_t rows_total = p.B * p.H * p.Sq;
    const int64_t blocks = (rows_total + kWarps - 1) / kWarps;
    if (blocks > 0x7fffffffLL) throw std::invalid_argument("genfast attention (CUDA): too many rows to combine");
    run_kernel(combine_kernel<T>, dim3(unsigned(blocks)), 0, stream, a, "combine launch");
  }
}

template <typename T, int kDP>
void launch_backward(const CudaArgs& a, cudaStream_t stream) {
  const Params& p = a.p;
  const int64_t seqs = p.cu_q != nullptr ? p.nseq : p.B;
  const int64_t max_q = p.cu_q != nullptr ? a.max_seqlen_q : p.Sq;
  const int64_t max_k = p.cu_q != nullptr ? a.max_seqlen_k : p.Sk;
  const int64_t q_tiles = (max_q + kBM - 1) / kBM, k_tiles = (max_k + kBK - 1) / kBK;
  if (seqs == 0) return;
  if (q_tiles > 0x7fffffffLL || k_tiles > 0x7fffffffLL || p.H > 65535 || seqs > 65535)
    throw std::invalid_argument("genfast attention (CUDA): backward grid too large");
  if (q_tiles > 0)
    run_kernel(backward_dq_kernel<T, kDP>, dim3(unsigned(q_tiles), unsigned(p.H), unsigned(seqs)),
               size_t(2 * kBM + 2 * block_n(kDP)) * row_pitch(kDP) * sizeof(uint16_t), stream, a, "backward dq launch");
  if (k_tiles > 0)
    run_kernel(backward_dkdv_kernel<T, kDP>, dim3(unsigned(k_tiles), unsigned(p.Hk), unsigned(seqs)),
               dkdv_smem_bytes(kDP), stream, a, "backward dk/dv launch");
}

template <typename T>
void launch_backward_for_head_dim(const CudaArgs& a, cudaStream_t stream) {
  const int64_t D = a.p.D;
  if (D <= 32)
    launch_backward<T, 32>(a, stream);
  else if (D <= 64)
    launch_backward<T, 64>(a, stream);
  else if (D <= 96)
    launch_backward<T, 96>(a, stream);
  else
    launch_backward<T, 128>(a, stream);
}

template <typename T>
void launch_for_head_dim(const CudaArgs& a, cudaStream_t stream) {
  // Head dims are padded (with zeros in shared memory) to the next instantiated size.
  const int64_t D = a.p.D;
  if (D <= 32)
    launch<T, 32>(a, stream);
  else if (D <= 64)
    launch<T, 64>(a, stream);
  else if (D <= 96)
    launch<T, 96>(a, stream);
  else if (D <= 128)
    launch<T, 128>(a, stream);
  else if (D <= 192)
    launch<T, 192>(a, stream);
  else
    launch<T, 256>(a, stream);
}

// Checks shared by both entry points (the Python side checks first; these guard the kernels).
void check_common(const CudaArgs& a) {
  const Params& p = a.p;
  if (p.dtype != F16 && p.dtype != BF16)
    throw std::invalid_argument(std::string("genfast attention (CUDA): q, k, v must be float16 or bfloat16, got ") +
                                dtype_name(p.dtype));
  if (p.D < 16 || p.D > 256 || p.D % 8 != 0)
    throw std::invalid_argument("genfast attention (CUDA): head dim must be a multiple of 8 in [16, 256], got " +
                                std::to_string(p.D));
  if (p.bias != nullptr || p.dropout_p > 0 || p.keep_mask != nullptr)
    throw std::invalid_argument("genfast attention (CUDA): additive bias and dropout are not supported here");
  if (p.lse == nullptr) throw std::invalid_argument("genfast attention (CUDA): lse is required");
  // 16-byte vector loads: every row start must be 16-byte aligned (checked by the caller too).
  for (int64_t stride : {p.q_sb, p.q_sh, p.q_ss, p.k_sb, p.k_sh, p.k_ss, p.v_sb, p.v_sh, p.v_ss})
    if (stride % 8 != 0) throw std::invalid_argument("genfast attention (CUDA): q/k/v strides must be multiples of 8");
  for (const void* ptr : {p.q, p.k, p.v})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
      throw std::invalid_argument("genfast attention (CUDA): q/k/v must be 16-byte aligned");
}

}  // namespace

void forward_cuda(const CudaArgs& a) {
  const Params& p = a.p;
  check_common(a);
  if (p.out == nullptr) throw std::invalid_argument("genfast attention (CUDA): out is required");
  if (a.num_splits < 1) throw std::invalid_argument("genfast attention (CUDA): num_splits must be >= 1");
  if (a.num_splits > 1 && (a.out_partial == nullptr || a.lse_partial == nullptr || p.cu_q != nullptr))
    throw std::invalid_argument("genfast attention (CUDA): split-KV needs both workspaces and no varlen");
  if (a.pack_gqa && p.cu_q != nullptr)
    throw std::invalid_argument("genfast attention (CUDA): pack_gqa is for decode only");
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (p.dtype == F16)
    launch_for_head_dim<__half>(a, stream);
  else
    launch_for_head_dim<__nv_bfloat16>(a, stream);
}

void backward_cuda(const CudaArgs& a) {
  const Params& p = a.p;
  check_common(a);
  if (p.D > kBackwardMaxHeadDim)
    throw std::invalid_argument("genfast attention (CUDA): the backward supports head dims up to " +
                                std::to_string(kBackwardMaxHeadDim) + ", got " + std::to_string(p.D));
  if (p.dout == nullptr || p.dq == nullptr || p.dk == nullptr || p.dv == nullptr || a.delta == nullptr)
    throw std::invalid_argument("genfast attention (CUDA): dout, delta, dq, dk and dv are required");
  if (p.seqused_k != nullptr || a.num_splits != 1 || a.pack_gqa)
    throw std::invalid_argument("genfast attention (CUDA): the backward has no decode options");
  for (int64_t stride : {p.do_sb, p.do_sh, p.do_ss})
    if (stride % 8 != 0) throw std::invalid_argument("genfast attention (CUDA): dout strides must be multiples of 8");
  if (reinterpret_cast<uintptr_t>(p.dout) % 16 != 0)
    throw std::invalid_argument("genfast attention (CUDA): dout must be 16-byte aligned");
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (p.dtype == F16)
    launch_backward_for_head_dim<__half>(a, stream);
  else
    launch_backward_for_head_dim<__nv_bfloat16>(a, stream);
}

}  // namespace attention
}  // namespace genfast
