// Fused attention on the CPU: tiled online-softmax forward (FlashAttention-2 order, fp32 or
// fp64 accumulation, 16-bit storage converted on load) and a backward that recomputes P from
// the LSE. Parallel over (sequence, head, query tile) in the forward and (sequence, head) in
// the backward, so every sum has one owner: deterministic by construction, no atomics.
// The kernel bodies are in attention_cpu_kernels.inc, compiled once per instruction set
// (baseline, AVX2, AVX-512: cpu_isa.h), each with its own vector width and register tiles.
#include "attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu_isa.h"
#ifdef GENFAST_WITH_OPENMP
#include <omp.h>
#endif

#define GF_ATTN_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GF_ATTN_CLONES 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace genfast {
namespace attention {

// Shared by both instruction-set variants of the kernels.
constexpr int BM = 64;  // queries per tile
constexpr int BN = 64;  // keys per tile
// Problems with at most this many queries per head (decode) run forward_group: one pass over
// each K/V head for up to this many query rows (all its query heads, or a part of them when
// G * Sq is larger) instead of one pass per query head.
constexpr int GROUP_ROWS = 16;

// One sequence of the problem: which batch row its pointers use, where its queries and keys
// start, their counts, and its index for the dropout hash and ALiBi (b, or the sequence).
// Decode: kb is the batch row of the K/V cache (cache_batch_idx; b otherwise) and klo the
// first key the row may see (cache_leftpad; positions stay absolute, so nothing else moves).
struct Seq {
  int64_t b, q0, sq, k0, sk, index, kb, klo;
};

inline Seq sequence(const Params& p, int64_t s) {
  if (p.cu_q != nullptr) {
    const int64_t q0 = p.cu_q[s], k0 = p.cu_k[s];
    return Seq{0, q0, p.cu_q[s + 1] - q0, k0, p.cu_k[s + 1] - k0, s, 0, 0};
  }
  const int64_t sk = p.seqused_k != nullptr ? int64_t(p.seqused_k[s]) : p.Sk;
  const int64_t kb = p.kv_batch_idx != nullptr ? int64_t(p.kv_batch_idx[s]) : s;
  const int64_t klo = p.leftpad_k != nullptr ? int64_t(p.leftpad_k[s]) : 0;
  return Seq{s, 0, p.Sq, 0, sk, s, kb, klo};
}

// 64-byte aligned buffers: the micro-kernels' 32-byte loads then never straddle cache lines.
template <typename F>
struct AlignedAllocator {
  using value_type = F;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  F* allocate(size_t n) { return static_cast<F*>(::operator new(n * sizeof(F), std::align_val_t(64))); }
  void deallocate(F* ptr, size_t) { ::operator delete(ptr, std::align_val_t(64)); }
  // Sized construction leaves the numbers uninitialised: every buffer is written before it
  // is read, and zeroing the pre-transposed K^T blocks (MBs) would be a serial pass.
  template <typename U>
  void construct(U* ptr) noexcept {
    ::new (static_cast<void*>(ptr)) U;
  }
  template <typename U, typename... Args>
  void construct(U* ptr, Args&&... args) {
    ::new (static_cast<void*>(ptr)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const AlignedAllocator<U>&) const {
    return false;
  }
};
template <typename F>
using Buffer = std::vector<F, AlignedAllocator<F>>;

template <typename F>
struct ForwardWork {
  int64_t D;
  Buffer<F> q, kt, v, s, z, o, m, l;
  explicit ForwardWork(int64_t D)
      : D(D), q(BM * D), kt(D * BN), v(BN * D), s(BM * BN), z(BN), o(BM * D), m(BM), l(BM) {}
};

// This thread's forward buffers, kept from call to call (grown for a larger head dim):
// allocating and zeroing ~80 KB cost more than a small call's arithmetic. The kernels write
// every element they read (padding included), so what a previous call left is never used.
template <typename F>
ForwardWork<F>& forward_work(int64_t D) {
  thread_local std::unique_ptr<ForwardWork<F>> work;
  if (work == nullptr || work->D < D) work.reset(new ForwardWork<F>(D));
  return *work;
}

template <typename F>
struct BackwardWork {
  int64_t D;
  Buffer<F> q, dout, k, kt, vt, s, dp, t, tanh_s, z, dk, dv, dq, delta, lse;
  explicit BackwardWork(int64_t D)
      : D(D),
        q(BM * D),
        dout(BM * D),
        k(BN * D),
        kt(D * BN),
        vt(D * BN),
        s(BM * BN),
        dp(BM * BN),
        t(BN * BM),
        tanh_s(BN),
        z(BN),
        dk(BN * D),
        dv(BN * D) {}
};

// This thread's backward buffers, kept from call to call as the forward's (see forward_work).
// The per-head rows (dq, delta, lse) grow with the sequence; backward_typed drops them after a
// long one.
template <typename F>
BackwardWork<F>& backward_work(int64_t D) {
  thread_local std::unique_ptr<BackwardWork<F>> work;
  if (work == nullptr || work->D < D) work.reset(new BackwardWork<F>(D));
  return *work;
}
constexpr size_t KEPT_ROW_ELEMENTS = size_t(1) << 18;  // 1 MB of fp32 dq rows

// Each clone: GF_ATTN_VEC_BYTES is its vector width (32: 8 floats, 64: 16 floats) and
// GF_ATTN_WIDE_VECS the vectors per row of the main gemm tile (6 rows x that many vectors
// of accumulators: 12 of AVX2's 16 registers, 24 of AVX-512's 32).
#ifdef GF_ATTN_CLONES
namespace avx512 {
#pragma GCC push_options
GF_CPU_TARGET_PRAGMA(GF_CPU_TARGET_AVX512)
#define GF_ATTN_FMA       1  // GCC does not define __FMA__ inside a target pragma in C++
#define GF_ATTN_VEC_BYTES 64
#define GF_ATTN_WIDE_VECS 4
#include "attention_cpu_kernels.inc"
#undef GF_ATTN_WIDE_VECS
#undef GF_ATTN_VEC_BYTES
#undef GF_ATTN_FMA
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
#pragma GCC push_options
GF_CPU_TARGET_PRAGMA(GF_CPU_TARGET_AVX2)
#define GF_ATTN_FMA       1
#define GF_ATTN_VEC_BYTES 32
#define GF_ATTN_WIDE_VECS 2
#include "attention_cpu_kernels.inc"
#undef GF_ATTN_WIDE_VECS
#undef GF_ATTN_VEC_BYTES
#undef GF_ATTN_FMA
#pragma GCC pop_options
}  // namespace avx2
#endif

namespace base {
#ifdef __FMA__
#define GF_ATTN_FMA 1
#else
#define GF_ATTN_FMA 0
#endif
#define GF_ATTN_VEC_BYTES 32
#define GF_ATTN_WIDE_VECS 2
#include "attention_cpu_kernels.inc"
#undef GF_ATTN_WIDE_VECS
#undef GF_ATTN_VEC_BYTES
#undef GF_ATTN_FMA
}  // namespace base

// Calls `avx512::call`, `avx2::call` or `base::call` for the clone I (a template argument).
#ifdef GF_ATTN_CLONES
#define GF_ATTN_CALL(I, ...)              \
  do {                                    \
    if constexpr (I == CpuIsa::Avx512)    \
      avx512::__VA_ARGS__;                \
    else if constexpr (I == CpuIsa::Avx2) \
      avx2::__VA_ARGS__;                  \
    else                                  \
      base::__VA_ARGS__;                  \
  } while (0)
#else
#define GF_ATTN_CALL(I, ...) \
  do { base::__VA_ARGS__; } while (0)
#endif

namespace {

int64_t num_sequences(const Params& p) { return p.cu_q != nullptr ? p.nseq : p.B; }

int64_t max_query_len(const Params& p) {
  if (p.cu_q == nullptr) return p.Sq;
  int64_t most = 0;
  for (int64_t s = 0; s < p.nseq; ++s) most = std::max<int64_t>(most, p.cu_q[s + 1] - p.cu_q[s]);
  return most;
}

template <typename T, CpuIsa I>
void forward_groups(const Params& p, int64_t max_queries) {
  using F = typename Compute<T>::type;
  // A group's query heads are split into parts of at most GROUP_ROWS rows, and into more
  // parts when there are too few (sequence, K/V head) pairs to keep every thread busy.
  const int64_t G = p.H / p.Hk, pairs = num_sequences(p) * p.Hk;
  const int64_t max_heads = std::max<int64_t>(1, GROUP_ROWS / std::max<int64_t>(1, max_queries));
  const int64_t parts = std::max((G + max_heads - 1) / max_heads,
                                 std::min<int64_t>(G, (2 * std::max(1, p.num_threads) + pairs - 1) / pairs));
  const int64_t heads_per_part = (G + parts - 1) / parts;
  const int64_t items = pairs * parts;
  const auto run = [&](int64_t item, ForwardWork<F>& w) {
    const Seq sq = sequence(p, item / (p.Hk * parts));
    const int64_t hk = item / parts % p.Hk, part = item % parts;
    const int64_t h0 = hk * G + std::min(G, part * heads_per_part);
    const int64_t h1 = hk * G + std::min(G, (part + 1) * heads_per_part);
    GF_ATTN_CALL(I, forward_group<T, F>(p, sq, h0, h1, w));
  };
  // One thread runs the loop outside any OpenMP region: even a serial region costs about 0.5 us,
  // more than a decode step's small problem (such calls are launch-bound).
  if (p.num_threads <= 1) {
    ForwardWork<F>& w = forward_work<F>(p.D);
    for (int64_t item = 0; item < items; ++item) run(item, w);
    return;
  }
#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel num_threads(p.num_threads)
#endif
  {
    ForwardWork<F>& w = forward_work<F>(p.D);
#ifdef GENFAST_WITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t item = 0; item < items; ++item) run(item, w);
  }
}

template <typename T, CpuIsa I>
void forward_typed(const Params& p) {
  using F = typename Compute<T>::type;
  const int64_t nseq = num_sequences(p);
  const int64_t max_queries = max_query_len(p);
  if (max_queries <= GROUP_ROWS) return forward_groups<T, I>(p, max_queries);
  const int64_t tiles = (max_query_len(p) + BM - 1) / BM;
  const int64_t items = nseq * p.H * tiles;
  // Dense problems whose heads span several query tiles: transpose every K tile once.
  const bool pretranspose = p.cu_q == nullptr && p.seqused_k == nullptr && tiles > 1;
  const int64_t key_items = pretranspose ? p.B * p.Hk * ((p.Sk + BN - 1) / BN) : 0;
  Buffer<F> kt_blocks(size_t(key_items * p.D * BN));
  F* kt = pretranspose ? kt_blocks.data() : nullptr;
#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel num_threads(std::max(1, p.num_threads)) if (p.num_threads > 1)
#endif
  {
#ifdef GENFAST_WITH_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t item = 0; item < key_items; ++item) {
      GF_ATTN_CALL(I, transpose_key_tile<T, F>(p, kt, item));
    }  // implicit barrier: every tile is ready before the queries start
    ForwardWork<F>& w = forward_work<F>(p.D);
#ifdef GENFAST_WITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t item = 0; item < items; ++item) {
      // Last query tile first: under a causal mask it sees the most keys, and starting the
      // longest work first leaves only short tiles for the end (less idle time at the barrier).
      const int64_t s = item / (p.H * tiles), h = item / tiles % p.H, tile = tiles - 1 - item % tiles;
      const Seq sq = sequence(p, s);
      const int64_t i0 = tile * BM;
      if (i0 >= sq.sq) continue;
      GF_ATTN_CALL(I, forward_tile<T, F>(p, sq, h, i0, w, kt));
    }
  }
}

template <typename T, CpuIsa I>
void backward_typed(const Params& p) {
  using F = typename Compute<T>::type;
  const int64_t nseq = num_sequences(p);
  const int64_t G = p.H / p.Hk;
  const int64_t D = p.D;
  // GQA: each query head writes its own dK/dV rows (in F), summed over the group afterwards
  // in a fixed order.
  Buffer<F> dk_heads, dv_heads;
  if (G > 1) {
    dk_heads.resize(size_t(p.B * p.H * p.Sk * D));
    dv_heads.resize(size_t(p.B * p.H * p.Sk * D));
  }
  const int64_t items = nseq * p.H;
#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel num_threads(std::max(1, p.num_threads)) if (p.num_threads > 1)
#endif
  {
    BackwardWork<F>& w = backward_work<F>(D);
#ifdef GENFAST_WITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t item = 0; item < items; ++item) {
      const int64_t s = item / p.H, h = item % p.H;
      const Seq sq = sequence(p, s);
      if (sq.sq == 0 && sq.sk == 0) continue;
      const int64_t rows = (sq.b * (G > 1 ? p.H : p.Hk) + (G > 1 ? h : h / G)) * p.Sk + sq.k0;
      auto run = [&](auto* dk, auto* dv) { GF_ATTN_CALL(I, backward_head<T, F>(p, sq, h, w, dk, dv)); };
      if (G > 1)
        run(dk_heads.data() + rows * D, dv_heads.data() + rows * D);
      else
        run(static_cast<T*>(p.dk) + rows * D, static_cast<T*>(p.dv) + rows * D);
    }
    if (w.dq.capacity() > KEPT_ROW_ELEMENTS) {
      Buffer<F>().swap(w.dq);
      Buffer<F>().swap(w.delta);
      Buffer<F>().swap(w.lse);
    }
  }
  if (G > 1) {
    const int64_t rows = p.B * p.Hk * p.Sk;
#ifdef GENFAST_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(std::max(1, p.num_threads))
#endif
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / (p.Hk * p.Sk), hk = r / p.Sk % p.Hk, j = r % p.Sk;
      T* dk = static_cast<T*>(p.dk) + r * D;
      T* dv = static_cast<T*>(p.dv) + r * D;
      for (int64_t d = 0; d < D; ++d) {
        F a = 0, c = 0;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t src = ((b * p.H + hk * G + g) * p.Sk + j) * D + d;
          a += dk_heads[size_t(src)];
          c += dv_heads[size_t(src)];
        }
        dk[d] = from_compute<T>(a);
        dv[d] = from_compute<T>(c);
      }
    }
  }
}

template <typename Fn>
void by_dtype(int dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case F32: return fn(float{});
    case F64: return fn(double{});
    case F16: return fn(half_t{});
    case BF16: return fn(bf16_t{});
  }
  throw std::invalid_argument(std::string(what) + ": unsupported dtype " + dtype_name(dtype));
}

}  // namespace

void forward_cpu(const Params& p) {
  if (p.D <= 0 || p.H <= 0 || p.Hk <= 0 || p.H % p.Hk != 0)
    throw std::invalid_argument("attention_forward_cpu: bad sizes");
  by_dtype(p.dtype, "attention_forward_cpu", [&](auto tag) {
    using T = decltype(tag);
    switch (cpu_isa()) {
      case CpuIsa::Avx512: return forward_typed<T, CpuIsa::Avx512>(p);
      case CpuIsa::Avx2: return forward_typed<T, CpuIsa::Avx2>(p);
      default: return forward_typed<T, CpuIsa::Baseline>(p);
    }
  });
}

void backward_cpu(const Params& p) {
  if (p.D <= 0 || p.H <= 0 || p.Hk <= 0 || p.H % p.Hk != 0)
    throw std::invalid_argument("attention_backward_cpu: bad sizes");
  by_dtype(p.dtype, "attention_backward_cpu", [&](auto tag) {
    using T = decltype(tag);
    switch (cpu_isa()) {
      case CpuIsa::Avx512: return backward_typed<T, CpuIsa::Avx512>(p);
      case CpuIsa::Avx2: return backward_typed<T, CpuIsa::Avx2>(p);
      default: return backward_typed<T, CpuIsa::Baseline>(p);
    }
  });
}

}  // namespace attention
}  // namespace genfast

#ifdef GF_ATTN_CLONES
#pragma GCC diagnostic pop
#endif
