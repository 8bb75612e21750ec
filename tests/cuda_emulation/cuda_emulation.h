// A small SIMT emulator that runs genfast's CUDA kernels on the CPU, so their exact source is
// tested numerically in CI (which has nvcc but no GPU). Included by a kernel file compiled as
// host C++ (nvcc -x c++) with GENFAST_CUDA_EMULATION defined.
//
// Every thread of a block is a fiber (ucontext); one block runs at a time. __syncthreads is a
// block barrier; warp collectives (__shfl_xor_sync, mma.sync m16n8k16) are warp barriers where
// each lane deposits its registers and reads the others', exactly as the hardware exchanges
// them. Shared memory (dynamic, and static __shared__ variables) is refilled with 0xFF bytes
// (NaN in fp16/bf16/fp32/fp64) before every block, so a read of something never written shows
// up as NaN in the result. Between barriers the threads run one after another in a shuffled
// order (fixed per block), so a missing barrier (e.g. thread 0 writes, the others read) shows
// up instead of hiding behind thread 0 always running first. Slow, and meant for small problems.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace gf_emu {

constexpr size_t kFiberStack = 256 * 1024;
// The emulated device: an H100's limits (what the launchers ask cudaDeviceGetAttribute).
constexpr int kSharedPerBlockDefault = 48 * 1024;  // dynamic shared memory without an opt-in
constexpr int kSharedPerBlockOptin = 227 * 1024;
constexpr int kMultiProcessors = 132;
constexpr size_t kSharedGuard = 256;  // bytes after the dynamic shared memory that must stay untouched

// cp.async: a 4/8/16-byte global -> shared copy that lands only when its group is waited for (the
// latest moment the hardware allows), so a missing wait reads stale shared memory.
struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;      // 4, 8 or 16
  int src_bytes;  // bytes read from src; the rest is zero-filled
  int group;
};

struct Fiber {
  ucontext_t ctx;
  uint3 thread_idx;
  int linear = 0;
  bool done = false;
  std::vector<AsyncCopy> async_copies;  // issued, not yet landed
  int async_groups = 0;                 // committed groups so far
  // Waiting at a barrier until *wait_on != wait_for (its generation moves on): the scheduler
  // does not resume it before, which saves two context switches per round.
  const unsigned* wait_on = nullptr;
  unsigned wait_for = 0;
};

struct Warp {
  int size = 32;  // lanes that exist: the last warp of a block of 48 threads has 16
  int arrived = 0;
  unsigned generation = 0;
  uint32_t slots[32][8];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t scheduler;
  int current = -1;
  int arrived = 0;
  unsigned generation = 0;
  uint64_t barriers_opened = 0;  // block and warp barriers: the scheduler's progress measure
  std::vector<unsigned char> shared;
  std::function<void()> body;
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
inline uint3& block_idx() {
  static uint3 idx;
  return idx;
}
inline dim3& block_dim() {
  static dim3 dim;
  return dim;
}
inline dim3& grid_dim() {
  static dim3 dim;
  return dim;
}
inline Fiber& self() { return block()->fibers[block()->current]; }

// The first fault of the running launch (empty: none); launch() throws it after the block.
inline std::string& fault_message() {
  static std::string message;
  return message;
}
inline void fault(const std::string& what) {
  if (fault_message().empty()) {
    const Block* b = block();
    fault_message() = what + (b != nullptr && b->current >= 0 ? " (thread " + std::to_string(b->current) + ")" : "");
  }
}
inline bool misaligned(const void* p, size_t alignment) { return reinterpret_cast<uintptr_t>(p) % alignment != 0; }

// Tests: the launchers' 32-bit index paths (tensors below 2^31 elements) take their 64-bit path.
inline bool& force_int64_index() {
  static bool force = false;
  return force;
}
inline long long& int64_index_launches() {  // launches that took a 64-bit index path
  static long long count = 0;
  return count;
}
inline void yield() { swapcontext(&self().ctx, &block()->scheduler); }

// Blocks the calling fiber until the barrier's generation counter leaves `generation`.
inline void wait_for_generation(const unsigned& counter, unsigned generation) {
  while (counter == generation) {
    self().wait_on = &counter;
    self().wait_for = generation;
    yield();
  }
  self().wait_on = nullptr;
}

inline void syncthreads() {
  Block& b = *block();
  const unsigned generation = b.generation;
  if (++b.arrived == int(b.fibers.size())) {
    b.arrived = 0;
    ++b.generation;
    ++b.barriers_opened;
  } else {
    wait_for_generation(b.generation, generation);
  }
}

inline void warp_barrier(Warp& w) {
  const unsigned generation = w.generation;
  if (++w.arrived == w.size) {
    w.arrived = 0;
    ++w.generation;
    ++block()->barriers_opened;
  } else {
    wait_for_generation(w.generation, generation);
  }
}

// Every lane of the warp deposits n words; `read` sees all 32 lanes' words.
template <typename Read>
void warp_exchange(const uint32_t* words, int n, Read&& read) {
  Warp& w = block()->warps[self().linear / 32];
  const int lane = self().linear % 32;
  std::memcpy(w.slots[lane], words, n * sizeof(uint32_t));
  warp_barrier(w);
  read(w.slots, lane);
  warp_barrier(w);  // nobody overwrites the slots before everyone has read them
}

// A shuffle: every lane deposits v and reads the v of lane source(lane), or keeps its own v when
// source(lane) < 0 (the source is outside its width-segment). Reading a lane that does not
// exist (a partial last warp) gives all-ones bits: NaN for floats.
template <typename T, typename Source>
T shuffle(T v, Source source) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "the emulated shuffles move 4- or 8-byte values");
  constexpr int n = sizeof(T) / 4;
  uint32_t words[n];
  std::memcpy(words, &v, sizeof(T));
  T out = v;
  const int size = block()->warps[self().linear / 32].size;
  warp_exchange(words, n, [&](uint32_t (*slots)[8], int lane) {
    const int src = source(lane);
    if (src < 0) return;
    if (src < size) {
      std::memcpy(&out, slots[src], sizeof(T));
    } else {
      std::memset(&out, 0xFF, sizeof(T));
    }
  });
  return out;
}

// The source lanes of __shfl_*_sync(mask, v, arg, width), per the CUDA programming guide.
template <typename T>
T shfl_xor(T v, int lane_mask, int width = 32) {
  return shuffle(v, [=](int lane) { const int src = lane ^ lane_mask; return (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : -1; });
}
template <typename T>
T shfl_down(T v, unsigned delta, int width = 32) {
  return shuffle(v, [=](int lane) { return (lane & (width - 1)) + int(delta) < width ? lane + int(delta) : -1; });
}
template <typename T>
T shfl_up(T v, unsigned delta, int width = 32) {
  return shuffle(v, [=](int lane) { return (lane & (width - 1)) >= int(delta) ? lane - int(delta) : -1; });
}
template <typename T>
T shfl_idx(T v, int src_lane, int width = 32) {
  return shuffle(v, [=](int lane) { return (lane & ~(width - 1)) + (src_lane & (width - 1)); });
}

// Warp votes over the lanes named in mask (every lane of the warp must take part).
inline unsigned ballot(unsigned mask, bool predicate) {
  const uint32_t mine = predicate ? 1u : 0u;
  unsigned bits = 0;
  const int size = block()->warps[self().linear / 32].size;
  warp_exchange(&mine, 1, [&](uint32_t (*slots)[8], int) {
    for (int l = 0; l < size; ++l) bits |= (slots[l][0] & 1u) << l;
  });
  return bits & mask;
}

inline void syncwarp() { warp_barrier(block()->warps[self().linear / 32]); }

// Fibers run one at a time and never in the middle of a read-modify-write: plain arithmetic is
// atomic here.
template <typename T>
T atomic_add(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
float element(uint32_t reg, int half) {
  const uint16_t bits = uint16_t(reg >> (16 * half));
  T v;
  std::memcpy(&v, &bits, 2);
  return float(v);
}

// d += a * b for mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: the PTX ISA fragment layout,
// lane = 4 g + t. A: reg0 A[g][2t..], reg1 A[g+8][2t..], reg2 A[g][2t+8..], reg3 A[g+8][2t+8..];
// B: reg0 B[2t..][g], reg1 B[2t+8..][g]; C: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1].
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  warp_exchange(mine, 6, [&](uint32_t (*slots)[8], int lane) {
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, t = l & 3;
      const uint32_t* r = slots[l];
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = element<T>(r[0], h);
        A[g + 8][2 * t + h] = element<T>(r[1], h);
        A[g][2 * t + 8 + h] = element<T>(r[2], h);
        A[g + 8][2 * t + 8 + h] = element<T>(r[3], h);
        B[2 * t + h][g] = element<T>(r[4], h);
        B[2 * t + 8 + h][g] = element<T>(r[5], h);
      }
    }
    const int g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
      float sum = 0.0f;
      for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
      d[e] += sum;
    }
  });
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8i..8i+7 give the row addresses
// of matrix i; lane l receives, per matrix, the pair M[l/4][2(l%4)], M[l/4][2(l%4)+1] (without
// .trans) or M[2(l%4)][l/4], M[2(l%4)+1][l/4] (with .trans).
template <int kMatrices, bool kTrans>
void ldmatrix(uint32_t* regs, const uint16_t* row_address) {
  if (misaligned(row_address, 16)) fault("cuda emulation: ldmatrix row address not 16-byte aligned");
  uint32_t mine[2];
  std::memcpy(mine, &row_address, sizeof(row_address));
  warp_exchange(mine, 2, [&](uint32_t (*slots)[8], int lane) {
    auto row = [&](int l) {
      const uint16_t* p;
      std::memcpy(&p, slots[l], sizeof(p));
      return p;
    };
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < kMatrices; ++i) {
      uint16_t lo, hi;
      if (kTrans) {
        lo = row(8 * i + 2 * t)[g];
        hi = row(8 * i + 2 * t + 1)[g];
      } else {
        lo = row(8 * i + g)[2 * t];
        hi = row(8 * i + g)[2 * t + 1];
      }
      regs[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  });
}

// cp.async.{ca,cg}.shared.global [dst], [src], bytes, src_bytes: 4, 8 or 16 bytes, both addresses
// aligned to the size; src_bytes < bytes zero-fills the rest.
inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16)
    fault("cuda emulation: cp.async of " + std::to_string(bytes) + " bytes (4, 8 or 16)");
  else if (misaligned(dst, bytes) || misaligned(src, bytes))
    fault("cuda emulation: cp.async of " + std::to_string(bytes) + " bytes from/to an address not aligned to it");
  else if (src_bytes < 0 || src_bytes > bytes)
    fault("cuda emulation: cp.async src-size " + std::to_string(src_bytes) + " outside [0, " + std::to_string(bytes) + "]");
  else {
    Fiber& f = self();
    f.async_copies.push_back(AsyncCopy{dst, src, bytes, src_bytes, f.async_groups});
  }
}
inline void cp_async_16(void* dst, const void* src, int src_bytes) { cp_async(dst, src, 16, src_bytes); }
inline void cp_async_commit() { ++self().async_groups; }
// Lands every copy of the committed groups except the newest `pending`.
inline void cp_async_wait(int pending) {
  Fiber& f = self();
  const int landed = f.async_groups - pending;
  std::vector<AsyncCopy> keep;
  for (const AsyncCopy& c : f.async_copies) {
    if (c.group < landed) {
      std::memcpy(c.dst, c.src, size_t(c.src_bytes));
      std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, size_t(c.bytes - c.src_bytes));
    } else {
      keep.push_back(c);
    }
  }
  f.async_copies.swap(keep);
}

inline void fiber_entry() {
  Block& b = *block();
  b.body();
  b.fibers[b.current].done = true;
}

// Dynamic shared memory: 16-byte aligned, like the hardware's.
template <typename T>
T* dynamic_shared(Block& b) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(b.shared.data()) + 15) & ~uintptr_t(15));
}
template <typename T>
T* dynamic_shared() {
  return dynamic_shared<T>(*block());
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): the opt-ins
// a launch with more than 48 KiB of dynamic shared memory needs, as on the hardware.
inline std::vector<std::pair<const void*, int>>& shared_optins() {
  static std::vector<std::pair<const void*, int>> optins;
  return optins;
}

template <typename Kernel>
int shared_limit(Kernel kernel) {
  int limit = kSharedPerBlockDefault;
  for (const auto& optin : shared_optins())
    if (optin.first == reinterpret_cast<const void*>(kernel)) limit = std::max(limit, optin.second);
  return limit;
}

template <typename Kernel>
cudaError_t func_set_attribute(Kernel kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > kSharedPerBlockOptin) return cudaErrorInvalidValue;
  shared_optins().emplace_back(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}

// What the hardware checks at launch: above 48 KiB of dynamic shared memory a kernel must have
// opted in (up to 227 KiB). (Not checked by launch() itself: attention.cu's emulated launch
// path skips its opt-in.)
template <typename Kernel>
void check_dynamic_shared(Kernel kernel, size_t shared_bytes) {
  if (shared_bytes > size_t(shared_limit(kernel)))
    throw std::runtime_error("cuda emulation: " + std::to_string(shared_bytes) +
                             " bytes of dynamic shared memory, above the kernel's limit (48 KiB without a "
                             "cudaFuncSetAttribute opt-in, 227 KiB with one)");
}

inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr attribute, int /*device*/) {
  switch (attribute) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kSharedPerBlockOptin; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kSharedPerBlockDefault; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = kMultiProcessors; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: throw std::runtime_error("cuda emulation: device attribute " + std::to_string(int(attribute)) + " not emulated");
  }
}

// Fiber stacks, allocated once (not zeroed) and reused by every block of every launch.
inline char* fiber_stack(int i) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (int(stacks.size()) <= i) stacks.emplace_back(new char[kFiberStack]);
  return stacks[i].get();
}

}  // namespace gf_emu

// Static __shared__ variables are function-local statics placed in their own ELF section, so
// that the whole section can be refilled with 0xFF before each block (blocks run one at a
// time, so one copy serves every block). The linker defines the section's bounds.
#define GF_EMU_SHARED_SECTION "gf_emu_shared"
extern "C" char __start_gf_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_gf_emu_shared[] __attribute__((weak, visibility("hidden")));

namespace gf_emu {

inline void poison_static_shared() {
  if (__start_gf_emu_shared != nullptr && __stop_gf_emu_shared != __start_gf_emu_shared)
    std::memset(__start_gf_emu_shared, 0xFF, size_t(__stop_gf_emu_shared - __start_gf_emu_shared));
}

// Runs kernel(args...) over the grid, block after block; throws on a deadlock (a barrier that
// some threads never reach).
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 threads, size_t shared_bytes, const Args&... args) {
  const int n = int(threads.x * threads.y * threads.z);
  if (n < 1 || n > 1024) throw std::runtime_error("cuda emulation: a block needs 1 to 1024 threads");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("cuda emulation: invalid grid (x >= 1, 1 <= y, z <= 65535)");

  grid_dim() = grid;
  block_dim() = threads;
  fault_message().clear();
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.fibers.resize(n);
        b.warps.resize((n + 31) / 32);
        b.warps.back().size = n - 32 * (int(b.warps.size()) - 1);
        b.shared.assign(16 + shared_bytes + kSharedGuard, 0xFF);
        poison_static_shared();
        b.body = [&] { kernel(args...); };
        block() = &b;
        block_idx() = make_uint3(bx, by, bz);
        for (int i = 0; i < n; ++i) {
          Fiber& f = b.fibers[i];
          f.linear = i;
          f.thread_idx = make_uint3(i % threads.x, (i / threads.x) % threads.y, i / (threads.x * threads.y));
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = fiber_stack(i);
          f.ctx.uc_stack.ss_size = kFiberStack;
          f.ctx.uc_link = &b.scheduler;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        std::vector<int> order(n);
        std::iota(order.begin(), order.end(), 0);
        std::minstd_rand shuffler(1 + bx + 65536u * (by + 65536u * bz));  // the same order for every run
        for (int live = n, stalled_rounds = 0; live > 0;) {
          const uint64_t before = b.barriers_opened;
          int finished = 0;
          std::shuffle(order.begin(), order.end(), shuffler);
          for (int i : order) {
            const Fiber& f = b.fibers[i];
            if (f.done || (f.wait_on != nullptr && *f.wait_on == f.wait_for)) continue;
            b.current = i;
            swapcontext(&b.scheduler, &b.fibers[i].ctx);
            finished += b.fibers[i].done;
          }
          live -= finished;
          // No barrier opened and no thread finished in a whole round: some threads wait at a
          // barrier the others never reach (e.g. __syncthreads under a divergent branch).
          stalled_rounds = (finished == 0 && b.barriers_opened == before) ? stalled_rounds + 1 : 0;
          if (stalled_rounds > 10) throw std::runtime_error("cuda emulation: deadlock (a barrier some threads never reach)");
        }
        block() = nullptr;
        if (!fault_message().empty()) throw std::runtime_error(fault_message());
        const unsigned char* guard = dynamic_shared<unsigned char>(b) + shared_bytes;
        for (size_t i = 0; i < kSharedGuard; ++i)
          if (guard[i] != 0xFF) throw std::runtime_error("cuda emulation: a write past the end of dynamic shared memory");
      }
}

// The stream-ordered runtime calls the launchers make, on host memory.
inline cudaError_t memset_async(void* ptr, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}


}  // namespace gf_emu

// The CUDA built-ins the kernels use, mapped onto the emulator.
#define threadIdx (gf_emu::self().thread_idx)
#define blockIdx (gf_emu::block_idx())
#define blockDim (gf_emu::block_dim())
#define __syncthreads() gf_emu::syncthreads()
#define gridDim (gf_emu::grid_dim())
#define warpSize 32
#define __shfl_xor_sync(mask, ...) gf_emu::shfl_xor(__VA_ARGS__)
#define __shfl_down_sync(mask, ...) gf_emu::shfl_down(__VA_ARGS__)
#define __shfl_up_sync(mask, ...) gf_emu::shfl_up(__VA_ARGS__)
#define __shfl_sync(mask, ...) gf_emu::shfl_idx(__VA_ARGS__)
#define __ballot_sync(mask, predicate) gf_emu::ballot((mask), (predicate))
#define __any_sync(mask, predicate) (gf_emu::ballot((mask), (predicate)) != 0u)
#define __all_sync(mask, predicate) (gf_emu::ballot((mask), (predicate)) == gf_emu::ballot((mask), true))
#define __syncwarp(...) gf_emu::syncwarp()
#define cudaMemsetAsync gf_emu::memset_async
#define cudaFuncSetAttribute gf_emu::func_set_attribute
#define cudaDeviceGetAttribute gf_emu::device_get_attribute
#define GF_DYNAMIC_SHARED(type, name) type* name = gf_emu::dynamic_shared<type>()
#undef __shared__
#define __shared__ static __attribute__((section(GF_EMU_SHARED_SECTION)))

// Device-only intrinsics, with their host equivalents (the fast-math ones as the accurate ones).
template <typename T>
T __ldg(const T* p) {
  // A vector load (float4, uint2, double2, ...) needs an address aligned to its size.
  if (gf_emu::misaligned(p, alignof(T))) {
    gf_emu::fault("cuda emulation: __ldg of a " + std::to_string(sizeof(T)) + "-byte type from an address not aligned to " +
                  std::to_string(alignof(T)) + " bytes");
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
  }
  return *p;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float sinpif(float x) { return float(std::sin(3.14159265358979323846 * double(x))); }
inline float cospif(float x) { return float(std::cos(3.14159265358979323846 * double(x))); }
inline float atomicAdd(float* address, float value) { return gf_emu::atomic_add(address, value); }
inline double atomicAdd(double* address, double value) { return gf_emu::atomic_add(address, value); }
inline int atomicAdd(int* address, int value) { return gf_emu::atomic_add(address, value); }
inline unsigned atomicAdd(unsigned* address, unsigned value) { return gf_emu::atomic_add(address, value); }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return gf_emu::atomic_add(address, value);
}
using std::max;
using std::min;
