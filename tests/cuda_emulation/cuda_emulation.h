// A small SIMT emulator that runs genfast's CUDA kernels on the CPU, so their exact source is
// tested numerically in CI (which has nvcc but no GPU). Included by a kernel file compiled as
// host C++ (nvcc -x c++) with GENFAST_CUDA_EMULATION defined.
//
// Every thread of a block is a fiber (ucontext); one block runs at a time. __syncthreads is a
// block barrier; warp collectives (__shfl_xor_sync, mma.sync m16n8k16) are warp barriers where
// each lane deposits its registers and reads the others', exactly as the hardware exchanges
// them. Shared memory starts filled with 0xFF bytes (NaN in fp16/bf16/fp32), so a read of
// something never written shows up as NaN in the result. Slow, and meant for small problems.
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
#include <stdexcept>
#include <string>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace gf_emu {

constexpr size_t kFiberStack = 256 * 1024;

// cp.async: a 16-byte global -> shared copy that lands only when its group is waited for (the
// latest moment the hardware allows), so a missing wait reads stale shared memory.
struct AsyncCopy {
  void* dst;
  const void* src;
  int src_bytes;  // 16, or 0 = zero fill
  int group;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  uint3 thread_idx;
  int linear = 0;
  bool done = false;
  std::vector<AsyncCopy> async_copies;  // issued, not yet landed
  int async_groups = 0;                 // committed groups so far
};

struct Warp {
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
inline Fiber& self() { return block()->fibers[block()->current]; }
inline void yield() { swapcontext(&self().ctx, &block()->scheduler); }

inline void syncthreads() {
  Block& b = *block();
  const unsigned generation = b.generation;
  if (++b.arrived == int(b.fibers.size())) {
    b.arrived = 0;
    ++b.generation;
    ++b.barriers_opened;
  } else {
    while (b.generation == generation) yield();
  }
}

inline void warp_barrier(Warp& w) {
  const unsigned generation = w.generation;
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.generation;
    ++block()->barriers_opened;
  } else {
    while (w.generation == generation) yield();
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

inline float shfl_xor(float v, int lane_mask) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  float out = 0.0f;
  warp_exchange(&bits, 1, [&](uint32_t (*slots)[8], int lane) { std::memcpy(&out, &slots[lane ^ lane_mask][0], 4); });
  return out;
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

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  Fiber& f = self();
  f.async_copies.push_back(AsyncCopy{dst, src, src_bytes, f.async_groups});
}
inline void cp_async_commit() { ++self().async_groups; }
// Lands every copy of the committed groups except the newest `pending`.
inline void cp_async_wait(int pending) {
  Fiber& f = self();
  const int landed = f.async_groups - pending;
  std::vector<AsyncCopy> keep;
  for (const AsyncCopy& c : f.async_copies) {
    if (c.group < landed) {
      if (c.src_bytes == 16)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
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

// Runs kernel(args) over the grid, block after block; throws on a deadlock (a barrier that
// some threads never reach).
template <typename Kernel, typename Args>
void launch(Kernel kernel, dim3 grid, dim3 threads, size_t shared_bytes, const Args& args) {
  const int n = int(threads.x * threads.y * threads.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.fibers.resize(n);
        b.warps.resize((n + 31) / 32);
        b.shared.assign(shared_bytes + 16, 0xFF);
        b.body = [&] { kernel(args); };
        block() = &b;
        block_idx() = make_uint3(bx, by, bz);
        block_dim() = threads;
        for (int i = 0; i < n; ++i) {
          Fiber& f = b.fibers[i];
          f.linear = i;
          f.thread_idx = make_uint3(i % threads.x, (i / threads.x) % threads.y, i / (threads.x * threads.y));
          f.stack.resize(kFiberStack);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &b.scheduler;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        for (int live = n, stalled_rounds = 0; live > 0;) {
          const uint64_t before = b.barriers_opened;
          int finished = 0;
          for (int i = 0; i < n; ++i) {
            if (b.fibers[i].done) continue;
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
      }
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(block()->shared.data()) + 15) & ~uintptr_t(15));
}

}  // namespace gf_emu

// The CUDA built-ins the kernels use, mapped onto the emulator.
#define threadIdx (gf_emu::self().thread_idx)
#define blockIdx (gf_emu::block_idx())
#define blockDim (gf_emu::block_dim())
#define __syncthreads() gf_emu::syncthreads()
#define __shfl_xor_sync(mask, value, lane_mask) gf_emu::shfl_xor((value), (lane_mask))
#define GF_DYNAMIC_SHARED(type, name) type* name = gf_emu::dynamic_shared<type>()
using std::max;
using std::min;
