// Fused attention forward and split-KV decode on tensor cores (see attention.h).
//
// FlashAttention-2 structure: a block holds 64 query rows (4 warps x 16 rows) in shared memory
// and walks the key/value tiles; each warp computes its 16 x kBN score tile with
// mma.sync.m16n8k16 (fp16/bf16 operands, fp32 accumulators), applies scale / softcap / ALiBi /
// masks, updates the online softmax (exp2, running max and sum per row) and multiplies the
// probabilities by V straight from registers: the score accumulator's layout is the A operand's
// layout, so P never goes back to shared memory.
//
// Register fragments of mma.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// lane = 4 g + t:
//   A (16x16, row): reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
//   B (16x8, col):  reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
//   C (16x8, fp32): c0, c1 = C[g][2t], C[g][2t+1]; c2, c3 = C[g+8][2t], C[g+8][2t+1]
// Shared-memory rows are padded by 8 elements so that these 32-bit fragment loads (8 rows x 4
// words per warp) hit 32 different banks.
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
constexpr size_t smem_bytes(int dp) { return size_t(kBM + 2 * block_n(dp)) * row_pitch(dp) * sizeof(uint16_t); }

template <typename T> struct Mma;
template <> struct Mma<__half> {
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
template <> struct Mma<__nv_bfloat16> {
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

__device__ __forceinline__ uint32_t load_pair(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }
__device__ __forceinline__ uint32_t make_pair(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Grid: x = tiles of kBM rows, y = head groups (query heads, or key heads when pack_gqa),
// z = (batch row or varlen sequence) * num_splits + split.
template <typename T, int kDP>
__global__ void __launch_bounds__(kThreads) forward_kernel(const CudaArgs a) {
  constexpr int kBN = block_n(kDP), kLD = row_pitch(kDP);
  constexpr int kNB = kBN / 8;   // n8 blocks of scores
  constexpr int kND = kDP / 8;   // n8 blocks of the output / 16-byte chunks per row
  constexpr int kKD = kDP / 16;  // k16 steps over the head dim
  GF_DYNAMIC_SHARED(uint16_t, smem);
  uint16_t* sQ = smem;
  uint16_t* sK = sQ + kBM * kLD;
  uint16_t* sV = sK + kBN * kLD;

  const Params& p = a.p;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int64_t G = p.H / p.Hk;
  const int64_t Gp = a.pack_gqa ? G : 1;
  const int64_t split = blockIdx.z % unsigned(a.num_splits);
  const int64_t seq = blockIdx.z / unsigned(a.num_splits);
  const int64_t hg = blockIdx.y;
  const int64_t hk = a.pack_gqa ? hg : hg / G;

  // This sequence's extent (varlen: offsets into the packed tokens; decode: used cache length).
  int64_t q_off = 0, k_off = 0, Sq = p.Sq, Sk = p.Sk, batch = seq;
  if (p.cu_q != nullptr) {
    q_off = p.cu_q[seq];
    Sq = p.cu_q[seq + 1] - q_off;
    k_off = p.cu_k[seq];
    Sk = p.cu_k[seq + 1] - k_off;
    batch = 0;
  }
  if (p.seqused_k != nullptr) Sk = p.seqused_k[seq];
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
      v = *reinterpret_cast<const uint4*>(q + batch * p.q_sb + head_of(m) * p.q_sh + (q_off + pos_of(m)) * p.q_ss + d);
    *reinterpret_cast<uint4*>(sQ + r * kLD + d) = v;
  }

  // Keys any row of this block may see: the window's union over the block's query positions,
  // intersected with this split's chunk (a whole number of tiles, so no tile straddles two).
  const int64_t m_last = min(m0 + kBM, rows) - 1;
  int64_t i_lo = pos_of(m0), i_hi = pos_of(m_last);
  if (a.pack_gqa && m0 / Sq != m_last / Sq) {
    i_lo = 0;
    i_hi = Sq - 1;
  }
  const int64_t off = p.align_bottom_right ? Sk - Sq : 0;
  int64_t j_begin = 0, j_end = Sk;
  if (p.window_left >= 0) j_begin = max(j_begin, i_lo + off - p.window_left);
  if (p.window_right >= 0) j_end = min(j_end, i_hi + off + p.window_right + 1);
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
  float slope[2] = {0.0f, 0.0f};  // ALiBi slope, in log2 units
  for (int rr = 0; rr < 2; ++rr) {
    const int64_t m = m0 + r_a + 8 * rr;
    valid[rr] = m < rows;
    const int64_t safe_m = valid[rr] ? m : m0;
    pos[rr] = pos_of(safe_m);
    if (p.alibi != nullptr) slope[rr] = p.alibi[seq * p.alibi_sb + head_of(safe_m)] * kLog2e;
  }
  const bool warp_active = m0 + warp * 16 < rows;  // warp-uniform

  float acc[kND][4];
#pragma unroll
  for (int nd = 0; nd < kND; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 units
  float row_sum[2] = {0.0f, 0.0f};            // this thread's columns only; reduced at the end
  const bool softcapped = p.softcap > 0;
  const float scale_log2 = float(p.scale) * kLog2e;
  const float cap_in = softcapped ? float(p.scale / p.softcap) : 0.0f;
  const float cap_out = float(p.softcap) * kLog2e;

  const T* k_base = static_cast<const T*>(p.k) + batch * p.k_sb + hk * p.k_sh + k_off * p.k_ss;
  const T* v_base = static_cast<const T*>(p.v) + batch * p.v_sb + hk * p.v_sh + k_off * p.v_ss;

  for (int64_t n0 = j_begin / kBN * kBN; n0 < j_end; n0 += kBN) {
    __syncthreads();  // every warp is done with the previous K/V tile (and, first time, Q is stored)
    for (int c = tid; c < kBN * kND; c += kThreads) {
      const int r = c / kND, d = (c % kND) * 8;
      const int64_t j = n0 + r;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (j < Sk && d < p.D) {  // zeros past the end: 0-probability keys must not meet NaN garbage in V
        kv = *reinterpret_cast<const uint4*>(k_base + j * p.k_ss + d);
        vv = *reinterpret_cast<const uint4*>(v_base + j * p.v_ss + d);
      }
      *reinterpret_cast<uint4*>(sK + r * kLD + d) = kv;
      *reinterpret_cast<uint4*>(sV + r * kLD + d) = vv;
    }
    __syncthreads();
    if (!warp_active) continue;

    // S = Q K^T for the warp's 16 rows x kBN keys.
    float s[kNB][4];
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
#pragma unroll
    for (int kd = 0; kd < kKD; ++kd) {
      if (kd * 16 >= p.D) break;  // the padding is zero: skip it
      const uint16_t* qa = sQ + r_a * kLD + kd * 16 + 2 * t;
      const uint32_t af[4] = {load_pair(qa), load_pair(qa + 8 * kLD), load_pair(qa + 8), load_pair(qa + 8 * kLD + 8)};
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        const uint16_t* kb = sK + (nb * 8 + g) * kLD + kd * 16 + 2 * t;
        Mma<T>::run(s[nb], af, load_pair(kb), load_pair(kb + 8));
      }
    }

    // Scores in log2 units; masks only on tiles that cross the end or a window edge.
    const bool need_mask = n0 + kBN > Sk || (p.window_left >= 0 && n0 < i_hi + off - p.window_left) ||
                           (p.window_right >= 0 && n0 + kBN - 1 > i_lo + off + p.window_right);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rr = e >> 1;
        const int64_t j = n0 + nb * 8 + 2 * t + (e & 1);
        float x = softcapped ? cap_out * tanhf(s[nb][e] * cap_in) : s[nb][e] * scale_log2;
        if (p.alibi != nullptr) x -= slope[rr] * fabsf(float(pos[rr] + off - j));
        if (need_mask) {
          const int64_t rel = j - (pos[rr] + off);
          const bool allowed = j < Sk && (p.window_left < 0 || rel >= -p.window_left) &&
                               (p.window_right < 0 || rel <= p.window_right);
          if (!allowed) x = -INFINITY;
        }
        s[nb][e] = x;
        tile_max[rr] = fmaxf(tile_max[rr], x);
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

    // O += P V: two n8 score blocks form one k16 A fragment.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pf[4] = {Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]), Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                              Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const uint16_t* vb = sV + (kk * 16 + 2 * t) * kLD + g;
#pragma unroll
      for (int nd = 0; nd < kND; ++nd) {
        if (nd * 8 >= p.D) break;
        const uint16_t* col = vb + nd * 8;
        Mma<T>::run(acc[nd], pf, make_pair(col[0], col[kLD]), make_pair(col[8 * kLD], col[9 * kLD]));
      }
    }
  }

  if (!warp_active) return;
  const int64_t rows_total = p.B * p.H * p.Sq;  // rows of out / lse (varlen: B == 1, Sq = total)
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float sum = quad_sum(row_sum[rr]);  // all lanes take part: the shuffles need the full warp
    if (!valid[rr]) continue;
    const int64_t m = m0 + r_a + 8 * rr;
    const int64_t row = (batch * p.H + head_of(m)) * p.Sq + q_off + pos_of(m);
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
        *reinterpret_cast<uint32_t*>(o + nd * 8 + 2 * t) = Mma<T>::pack(acc[nd][2 * rr] * inv, acc[nd][2 * rr + 1] * inv);
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

template <typename Kernel>
void run_kernel(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, const CudaArgs& a, const char* what) {
#ifdef GENFAST_CUDA_EMULATION
  gf_emu::launch(kernel, grid, dim3(kThreads), smem, a);
#else
  // Above 48 KiB of dynamic shared memory a kernel must opt in (once per device would do; the
  // call is cheap and legal during CUDA-graph capture).
  if (smem > 48 * 1024)
    cuda::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), kFamily,
                "cudaFuncSetAttribute");
  kernel<<<grid, kThreads, smem, stream>>>(a);
  cuda::check(cudaGetLastError(), kFamily, what);
#endif
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

template <typename T>
void launch_for_head_dim(const CudaArgs& a, cudaStream_t stream) {
  // Head dims are padded (with zeros in shared memory) to the next instantiated size.
  const int64_t D = a.p.D;
  if (D <= 32) launch<T, 32>(a, stream);
  else if (D <= 64) launch<T, 64>(a, stream);
  else if (D <= 96) launch<T, 96>(a, stream);
  else if (D <= 128) launch<T, 128>(a, stream);
  else if (D <= 192) launch<T, 192>(a, stream);
  else launch<T, 256>(a, stream);
}

}  // namespace

void forward_cuda(const CudaArgs& a) {
  const Params& p = a.p;
  if (p.dtype != F16 && p.dtype != BF16)
    throw std::invalid_argument(std::string("genfast attention (CUDA): q, k, v must be float16 or bfloat16, got ") +
                                dtype_name(p.dtype));
  if (p.D < 16 || p.D > 256 || p.D % 8 != 0)
    throw std::invalid_argument("genfast attention (CUDA): head dim must be a multiple of 8 in [16, 256], got " +
                                std::to_string(p.D));
  if (p.bias != nullptr || p.dropout_p > 0 || p.keep_mask != nullptr)
    throw std::invalid_argument("genfast attention (CUDA): additive bias and dropout are not supported here");
  if (p.out == nullptr || p.lse == nullptr) throw std::invalid_argument("genfast attention (CUDA): out and lse are required");
  if (a.num_splits < 1) throw std::invalid_argument("genfast attention (CUDA): num_splits must be >= 1");
  if (a.num_splits > 1 && (a.out_partial == nullptr || a.lse_partial == nullptr || p.cu_q != nullptr))
    throw std::invalid_argument("genfast attention (CUDA): split-KV needs both workspaces and no varlen");
  if (a.pack_gqa && p.cu_q != nullptr) throw std::invalid_argument("genfast attention (CUDA): pack_gqa is for decode only");
  // 16-byte vector loads: every row start must be 16-byte aligned (checked by the caller too).
  for (int64_t stride : {p.q_sb, p.q_sh, p.q_ss, p.k_sb, p.k_sh, p.k_ss, p.v_sb, p.v_sh, p.v_ss})
    if (stride % 8 != 0) throw std::invalid_argument("genfast attention (CUDA): q/k/v strides must be multiples of 8");
  for (const void* ptr : {p.q, p.k, p.v})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
      throw std::invalid_argument("genfast attention (CUDA): q/k/v must be 16-byte aligned");
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  if (p.dtype == F16)
    launch_for_head_dim<__half>(a, stream);
  else
    launch_for_head_dim<__nv_bfloat16>(a, stream);
}

}  // namespace attention
}  // namespace genfast
