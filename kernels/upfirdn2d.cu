// upfirdn2d CUDA kernels (contract in upfirdn2d.h: y[o] = sum_k u[o * down + k] * g[k] per axis,
// g the prepared correlation filter).
//
// Two kernels:
//  * tiled_kernel: the common StyleGAN cases (up or down 2, 4- or 12-tap filters, full or
//    separable), with up/down/taps as template constants. A block computes a tile of
//    TOH x TOW output pixels for CB channels: the input tile is loaded once into shared memory
//    (coalesced along x for NCHW, along channels for NHWC), the filter sits in shared memory,
//    and each output pixel visits only the taps that land on real input samples (polyphase).
//    Separable filters are fused: the x pass writes a float tile in shared memory, the y pass
//    reads it, so there is no global intermediate.
//  * general_kernel: any factors, taps, dtype (float64 included) and dense layout; one thread
//    per output pixel, polyphase loops over global memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.h"
#include "cuda_common.cuh"
#include "upfirdn2d.h"

namespace genfast {
namespace upfirdn2d {
namespace {

using cuda::Cvt;
constexpr const char* kFamily = "upfirdn2d";

// Accumulator type: double for float64 data, float otherwise.
template <typename T>
using Acc = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

// Element strides of x and out ([n, c, y, x]); NCHW or NHWC, both dense.
struct Strides {
  int64_t n, c, y, x;
};

struct KernelParams {
  const void* x;
  void* out;
  const float* g;
  int64_t n, c, h, w, oh, ow;
  int64_t fh, fw;
  int64_t upx, upy, downx, downy, padx0, pady0;
  Strides sx, so;
  bool separable;
};

__device__ __forceinline__ int64_t dev_ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// ----------------------------------------------------------------------------- general

constexpr int kGeneralThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kGeneralThreads) general_kernel(KernelParams p, bool nhwc) {
  using A = Acc<T>;
  const T* __restrict x = static_cast<const T*>(p.x);
  T* __restrict out = static_cast<T*>(p.out);
  const int64_t total = p.n * p.c * p.oh * p.ow;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    // Decompose in memory order, so consecutive threads store consecutive elements.
    int64_t n, c, oy, ox;
    if (nhwc) {
      c = i % p.c;
      int64_t r = i / p.c;
      ox = r % p.ow;
      r /= p.ow;
      oy = r % p.oh;
      n = r / p.oh;
    } else {
      ox = i % p.ow;
      int64_t r = i / p.ow;
      oy = r % p.oh;
      r /= p.oh;
      c = r % p.c;
      n = r / p.c;
    }
    const int64_t sx0 = ox * p.downx - p.padx0, sy0 = oy * p.downy - p.pady0;
    const int64_t ix0 = dev_ceil_div(sx0, p.upx), iy0 = dev_ceil_div(sy0, p.upy);
    const int64_t kx0 = ix0 * p.upx - sx0, ky0 = iy0 * p.upy - sy0;
    const T* __restrict plane = x + n * p.sx.n + c * p.sx.c;
    A acc = A(0);
    for (int64_t ky = ky0, iy = iy0; ky < p.fh; ky += p.upy, ++iy) {
      if (iy < 0 || iy >= p.h) continue;
      const T* __restrict row = plane + iy * p.sx.y;
      A row_acc = A(0);
      const float* __restrict grow = p.separable ? p.g : p.g + ky * p.fw;
      for (int64_t kx = kx0, ix = ix0; kx < p.fw; kx += p.upx, ++ix) {
        if (ix < 0 || ix >= p.w) continue;
        row_acc += A(grow[kx]) * Cvt<T>::to(row[ix * p.sx.x]);
      }
      acc += p.separable ? A(p.g[ky]) * row_acc : row_acc;
    }
    out[n * p.so.n + c * p.so.c + oy * p.so.y + ox * p.so.x] = Cvt<T>::from(acc);
  }
}

// ----------------------------------------------------------------------------- tiled

constexpr int kTiledThreads = 256;

template <int UP, int DOWN, int TAPS, int TO>
struct TileAxis {
  // Input pixels one tile of TO outputs can read (see the derivation in upfirdn2d_cpu.cpp's
  // AxisPlan: first input ceil((o0 * DOWN - pad) / UP), last within this bound).
  static constexpr int kIn = ((TO - 1) * DOWN + TAPS - 1) / UP + 2;
  static constexpr int kSteps = (TAPS + UP - 1) / UP;  // polyphase taps per output, at most
};

template <typename T, int UP, int DOWN, int TAPS, bool SEP, bool NHWC, int TOW, int TOH, int CB>
__global__ void __launch_bounds__(kTiledThreads) tiled_kernel(KernelParams p, int64_t tiles_x, int64_t planes) {
  using AX = TileAxis<UP, DOWN, TAPS, TOW>;
  using AY = TileAxis<UP, DOWN, TAPS, TOH>;
  constexpr int TIW = AX::kIn, TIH = AY::kIn;
  __shared__ float s_in[CB][TIH][TIW];
  __shared__ float s_mid[SEP ? CB : 1][SEP ? TIH : 1][SEP ? TOW : 1];
  __shared__ float s_g[SEP ? TAPS : TAPS * TAPS];

  const T* __restrict x = static_cast<const T*>(p.x);
  T* __restrict out = static_cast<T*>(p.out);
  const int tid = threadIdx.x;
  for (int i = tid; i < (SEP ? TAPS : TAPS * TAPS); i += kTiledThreads) s_g[i] = p.g[i];

  const int64_t ox0 = (int64_t(blockIdx.x) % tiles_x) * TOW;
  const int64_t oy0 = (int64_t(blockIdx.x) / tiles_x) * TOH;
  const int64_t ix_base = dev_ceil_div(ox0 * DOWN - p.padx0, UP);
  const int64_t iy_base = dev_ceil_div(oy0 * DOWN - p.pady0, UP);
  const int64_t cblocks = (p.c + CB - 1) / CB;

  // Planes (n, channel block) in a grid-stride loop: gridDim.y is limited to 65535.
  for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
    const int64_t n = plane / cblocks, c0 = (plane % cblocks) * CB;
    const T* __restrict xp = x + n * p.sx.n;
    __syncthreads();  // the previous plane's tile is consumed (and s_g written)

    // Load the input tile, zero outside the image.
    for (int i = tid; i < CB * TIH * TIW; i += kTiledThreads) {
      int c, r, q;
      if (NHWC) {
        c = i % CB;
        q = (i / CB) % TIW;
        r = i / (CB * TIW);
      } else {
        q = i % TIW;
        r = (i / TIW) % TIH;
        c = i / (TIW * TIH);
      }
      const int64_t iy = iy_base + r, ix = ix_base + q, cc = c0 + c;
      float v = 0.0f;
      if (iy >= 0 && iy < p.h && ix >= 0 && ix < p.w && cc < p.c)
        v = float(Cvt<T>::to(xp[cc * p.sx.c + iy * p.sx.y + ix * p.sx.x]));
      s_in[c][r][q] = v;
    }
    __syncthreads();

    if (SEP) {
      // x pass over every loaded row into s_mid.
      for (int i = tid; i < CB * TIH * TOW; i += kTiledThreads) {
        int c, r, ol;
        if (NHWC) {
          c = i % CB;
          ol = (i / CB) % TOW;
          r = i / (CB * TOW);
        } else {
          ol = i % TOW;
          r = (i / TOW) % TIH;
          c = i / (TOW * TIH);
        }
        const int64_t s0 = (ox0 + ol) * DOWN - p.padx0;
        const int64_t ix0 = dev_ceil_div(s0, UP);
        const int k0 = int(ix0 * UP - s0);
        const int q0 = int(ix0 - ix_base);
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < AX::kSteps; ++j) {
          const int k = k0 + j * UP;
          if (k < TAPS) acc += s_g[k] * s_in[c][r][min(q0 + j, TIW - 1)];
        }
        s_mid[SEP ? c : 0][SEP ? r : 0][SEP ? ol : 0] = acc;
      }
      __syncthreads();
    }

    // Output pixels (y pass for separable filters, the full 2-D sum otherwise).
    for (int i = tid; i < CB * TOH * TOW; i += kTiledThreads) {
      int c, rl, ol;
      if (NHWC) {
        c = i % CB;
        ol = (i / CB) % TOW;
        rl = i / (CB * TOW);
      } else {
        ol = i % TOW;
        rl = (i / TOW) % TOH;
        c = i / (TOW * TOH);
      }
      const int64_t oy = oy0 + rl, ox = ox0 + ol, cc = c0 + c;
      if (oy >= p.oh || ox >= p.ow || cc >= p.c) continue;
      const int64_t sy = oy * DOWN - p.pady0;
      const int64_t iy0 = dev_ceil_div(sy, UP);
      const int ky0 = int(iy0 * UP - sy);
      const int r0 = int(iy0 - iy_base);
      float acc = 0.0f;
      if (SEP) {
#pragma unroll
        for (int j = 0; j < AY::kSteps; ++j) {
          const int k = ky0 + j * UP;
          if (k < TAPS) acc += s_g[k] * s_mid[SEP ? c : 0][SEP ? min(r0 + j, TIH - 1) : 0][SEP ? ol : 0];
        }
      } else {
        const int64_t sx = ox * DOWN - p.padx0;
        const int64_t ix0 = dev_ceil_div(sx, UP);
        const int kx0 = int(ix0 * UP - sx);
        const int q0 = int(ix0 - ix_base);
#pragma unroll
        for (int jy = 0; jy < AY::kSteps; ++jy) {
          const int ky = ky0 + jy * UP;
          if (ky >= TAPS) continue;
          const int r = min(r0 + jy, TIH - 1);
#pragma unroll
          for (int jx = 0; jx < AX::kSteps; ++jx) {
            const int kx = kx0 + jx * UP;
            if (kx < TAPS) acc += s_g[ky * TAPS + kx] * s_in[c][r][min(q0 + jx, TIW - 1)];
          }
        }
      }
      out[n * p.so.n + cc * p.so.c + oy * p.so.y + ox * p.so.x] = Cvt<T>::from(acc);
    }
  }
}

template <typename T, int UP, int DOWN, int TAPS, bool SEP, bool NHWC, int TOW, int TOH, int CB>
void launch_tiled(const KernelParams& p, cudaStream_t stream) {
  const int64_t tiles_x = (p.ow + TOW - 1) / TOW, tiles_y = (p.oh + TOH - 1) / TOH;
  const int64_t planes = p.n * ((p.c + CB - 1) / CB);
  if (tiles_x * tiles_y > 0x7fffffffLL) throw std::invalid_argument("upfirdn2d: image too large for the tiled kernel");
  const dim3 grid(unsigned(tiles_x * tiles_y), unsigned(std::min<int64_t>(planes, cuda::grid_cap(65535))));
  cuda::launch_kernel(tiled_kernel<T, UP, DOWN, TAPS, SEP, NHWC, TOW, TOH, CB>, grid, kTiledThreads, 0, stream, kFamily,
                      "kernel launch", p, tiles_x, planes);
}

// Tile shapes: NCHW tiles are wide along x (coalesced rows, one channel); NHWC tiles hold a
// block of channels (coalesced along c) over a small patch of pixels.
template <typename T, int UP, int DOWN, int TAPS, bool SEP>
void launch_tiled_layout(const KernelParams& p, bool nhwc, cudaStream_t stream) {
  // Static shared memory stays under 48 KiB for every instantiation (ptxas checks it).
  if (nhwc) {
    if constexpr (DOWN > 1)
      launch_tiled<T, UP, DOWN, TAPS, SEP, true, 8, 8, 8>(p, stream);
    else
      launch_tiled<T, UP, DOWN, TAPS, SEP, true, 8, 8, 16>(p, stream);
  } else {
    if constexpr (DOWN > 1)
      launch_tiled<T, UP, DOWN, TAPS, SEP, false, 32, 16, 1>(p, stream);
    else
      launch_tiled<T, UP, DOWN, TAPS, SEP, false, 64, 16, 1>(p, stream);
  }
}

// Returns false when no tiled specialisation covers the arguments.
template <typename T>
bool try_tiled(const Args& a, const KernelParams& p, cudaStream_t stream) {
  if (a.upx != a.upy || a.downx != a.downy || a.fw != a.fh) return false;
  const int64_t up = a.upx, down = a.downx, taps = a.fw;
  const bool nhwc = a.channels_last, sep = a.separable;
#define GF_TILED(U, D, K, S)                             \
  if (up == U && down == D && taps == K && sep == S) {   \
    launch_tiled_layout<T, U, D, K, S>(p, nhwc, stream); \
    return true;                                         \
  }
  GF_TILED(2, 1, 4, false)  // StyleGAN2 upsample2d, [1, 3, 3, 1] outer product
  GF_TILED(1, 2, 4, false)  // StyleGAN2 downsample2d
  GF_TILED(1, 1, 4, false)  // StyleGAN2 filter2d
  GF_TILED(2, 1, 4, true)
  GF_TILED(1, 2, 4, true)
  GF_TILED(2, 1, 12, true)  // StyleGAN3 2x up / down filters
  GF_TILED(1, 2, 12, true)
  GF_TILED(2, 1, 6, true)
  GF_TILED(1, 2, 6, true)
#undef GF_TILED
  return false;
}

template <typename T>
void run(const Args& a) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  KernelParams p{};
  p.x = a.x;
  p.out = a.out;
  p.g = a.g;
  p.n = a.n;
  p.c = a.c;
  p.h = a.h;
  p.w = a.w;
  p.oh = a.oh;
  p.ow = a.ow;
  p.fh = a.fh;
  p.fw = a.fw;
  p.upx = a.upx;
  p.upy = a.upy;
  p.downx = a.downx;
  p.downy = a.downy;
  p.padx0 = a.padx0;
  p.pady0 = a.pady0;
  p.separable = a.separable;
  if (a.channels_last) {
    p.sx = Strides{a.h * a.w * a.c, 1, a.w * a.c, a.c};
    p.so = Strides{a.oh * a.ow * a.c, 1, a.ow * a.c, a.c};
  } else {
    p.sx = Strides{a.c * a.h * a.w, a.h * a.w, a.w, 1};
    p.so = Strides{a.c * a.oh * a.ow, a.oh * a.ow, a.ow, 1};
  }
  bool launched = false;
  if constexpr (!std::is_same<T, double>::value) launched = try_tiled<T>(a, p, stream);
  if (!launched) {
    const int64_t total = a.n * a.c * a.oh * a.ow;
    const int64_t blocks = std::min<int64_t>((total + kGeneralThreads - 1) / kGeneralThreads, cuda::grid_cap(1 << 20));
    cuda::launch_kernel(general_kernel<T>, unsigned(blocks), kGeneralThreads, 0, stream, kFamily, "kernel launch", p,
                        a.channels_last);
  }
}

}  // namespace

void upfirdn2d_cuda(const Args& a) {
  if (a.n * a.c * a.oh * a.ow == 0) return;
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  switch (a.dtype) {
    case F32: return run<float>(a);
    case F64: return run<double>(a);
    case F16: return run<__half>(a);
    case BF16: return run<__nv_bfloat16>(a);
  }
  throw std::invalid_argument(std::string("upfirdn2d: unsupported dtype ") + dtype_name(a.dtype));
}

}  // namespace upfirdn2d
}  // namespace genfast
