// filtered_lrelu CUDA kernels: the generic fused chain of kernels/filtered_lrelu.h, one
// block per (plane, output tile). The block stages its input tile, the upsampled intermediate
// tile (and, for separable filters, the half-filtered tiles) in shared memory, applies the
// activation (or the saved mask) there, and downsamples into the output: the intermediate
// never reaches global memory. Template parameters fix the factors and tap counts of the
// common StyleGAN3 case (up 2, down 2, separable 12-tap filters) so its loops unroll; every
// other case runs the same code with runtime values (the general fallback).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.h"
#include "cuda_common.cuh"
#include "filtered_lrelu.h"

namespace genfast {
namespace filtered_lrelu {
namespace {

using cuda::Cvt;
constexpr const char* kFamily = "filtered_lrelu";

// Arithmetic type: double for float64 data, float otherwise.
template <typename T>
using Arith = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

constexpr int kThreads = 256;

struct Geometry {
  // Output tile and the intermediate / input tiles it needs.
  int toy, tox;  // output tile
  int trn, tcn;  // intermediate tile rows, columns
  int xr, xc;    // input tile rows, columns
  size_t smem_bytes;
};

template <typename T>
struct KernelArgs {
  T* out;
  const T* x;
  const T* b;
  uint8_t* signs;
  const float* g1;
  const float* g2;
  int64_t planes, C, in_h, in_w;
  int64_t in_s[4], out_s[4];
  int g1h, g1w, g2h, g2w;
  bool g1_sep, g2_sep;
  int64_t u1, p1x, p1y, th, tw, d2, p2x, p2y, oh, ow;
  int tiles_x, tiles_y;
  Geometry geo;
  double gain, slope, clamp;
  int mode;
};

__device__ __forceinline__ int64_t dev_ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// Upsampling phase of an intermediate position `pos` (relative to the tile's first one, whose
// phase is r0 = u * ceil(base / u) - base, in [0, u)): the first input index it reads (relative
// to the tile's first input) and its first tap. Everything is a small non-negative int, so the
// per-element divisions are 32-bit and inline: 64-bit ones are subroutine calls, whose register
// saves spilled in the runtime-factor instantiations.
struct UpPhase {
  int j, k;
};
__device__ __forceinline__ UpPhase up_phase(int pos, int r0, int u) {
  const int j = (pos - r0 + u - 1) / u;
  return {j, r0 + u * j - pos};
}

// U1, D2: the factors; G1, G2: separable tap counts (0: runtime values, any filter kind).
template <typename T, int U1, int D2, int G1, int G2>
__global__ void __launch_bounds__(kThreads) filtered_lrelu_kernel(KernelArgs<T> p) {
  using F = Arith<T>;
  GF_DYNAMIC_SHARED(unsigned char, smem_raw);
  F* smem = reinterpret_cast<F*>(smem_raw);
  const int64_t u1 = U1 ? U1 : p.u1;
  const int64_t d2 = D2 ? D2 : p.d2;
  const int g1w = G1 ? G1 : p.g1w, g1h = G1 ? G1 : p.g1h;
  const int g2w = G2 ? G2 : p.g2w, g2h = G2 ? G2 : p.g2h;
  const bool sep1 = G1 ? true : p.g1_sep, sep2 = G2 ? true : p.g2_sep;
  const Geometry& geo = p.geo;
  F* xs = smem;                                // [xr][xc]
  F* h1 = xs + geo.xr * geo.xc;                // [xr][tcn]  (separable upsampling)
  F* ts = h1 + (sep1 ? geo.xr * geo.tcn : 0);  // [trn][tcn]
  F* hd = ts + geo.trn * geo.tcn;              // [trn][tox] (separable downsampling)

  const int tile = blockIdx.x;
  const int64_t oy0 = int64_t(tile / p.tiles_x) * geo.toy, ox0 = int64_t(tile % p.tiles_x) * geo.tox;
  const int64_t tr0 = oy0 * d2 - p.p2y, tc0 = ox0 * d2 - p.p2x;
  const int64_t jy0 = dev_ceil_div(tr0 - p.p1y, u1), jx0 = dev_ceil_div(tc0 - p.p1x, u1);
  const int ry0 = int(u1 * jy0 - (tr0 - p.p1y)), rx0 = int(u1 * jx0 - (tc0 - p.p1x));  // phases, in [0, u1)
  const int u1i = int(u1);
  const F gain = F(p.gain), slope = F(p.slope), clamp = F(p.clamp);

  for (int64_t plane = blockIdx.y; plane < p.planes; plane += gridDim.y) {
    const int64_t n = plane / p.C, c = plane % p.C;
    // 1. Input tile (+ bias), zeros outside the image.
    const F bias = (p.mode == ACT && p.b) ? Cvt<T>::to(p.b[c]) : F(0);
    const T* xp = p.x + n * p.in_s[0] + c * p.in_s[1];
    for (int i = threadIdx.x; i < geo.xr * geo.xc; i += kThreads) {
      const int64_t jy = jy0 + i / geo.xc, jx = jx0 + i % geo.xc;
      F v = F(0);
      if (jy >= 0 && jy < p.in_h && jx >= 0 && jx < p.in_w) v = Cvt<T>::to(xp[jy * p.in_s[2] + jx * p.in_s[3]]) + bias;
      xs[i] = v;
    }
    __syncthreads();

    // 2. Upsampling FIR into the intermediate tile.
    if (sep1) {
      for (int i = threadIdx.x; i < geo.xr * geo.tcn; i += kThreads) {
        const int r = i / geo.tcn, cc = i % geo.tcn;
        const UpPhase ph = up_phase(cc, rx0, u1i);
        const int k0 = ph.k;
        const F* src = xs + r * geo.xc + ph.j;
        F acc = F(0);
        if (G1) {
#pragma unroll
          for (int m = 0; m < (G1 + (U1 ? U1 : 1) - 1) / (U1 ? U1 : 1); ++m) {
            const int k = k0 + u1i * m;
            if (k < g1w) acc += src[m] * F(__ldg(p.g1 + k));
          }
        } else {
          for (int m = 0, k = k0; k < g1w; ++m, k += u1i) acc += src[m] * F(__ldg(p.g1 + k));
        }
        h1[i] = acc;
      }
      __syncthreads();
      for (int i = threadIdx.x; i < geo.trn * geo.tcn; i += kThreads) {
        const int r = i / geo.tcn, cc = i % geo.tcn;
        const UpPhase ph = up_phase(r, ry0, u1i);
        const int k0 = ph.k;
        const F* src = h1 + ph.j * geo.tcn + cc;
        F acc = F(0);
        if (G1) {
#pragma unroll
          for (int m = 0; m < (G1 + (U1 ? U1 : 1) - 1) / (U1 ? U1 : 1); ++m) {
            const int k = k0 + u1i * m;
            if (k < g1h) acc += src[m * geo.tcn] * F(__ldg(p.g1 + k));
          }
        } else {
          for (int m = 0, k = k0; k < g1h; ++m, k += u1i) acc += src[m * geo.tcn] * F(__ldg(p.g1 + k));
        }
        ts[i] = acc;
      }
    } else {
      for (int i = threadIdx.x; i < geo.trn * geo.tcn; i += kThreads) {
        const int r = i / geo.tcn, cc = i % geo.tcn;
        const UpPhase py = up_phase(r, ry0, u1i), px = up_phase(cc, rx0, u1i);
        F acc = F(0);
        for (int my = 0, ky = py.k; ky < g1h; ++my, ky += u1i) {
          const F* src = xs + (py.j + my) * geo.xc + px.j;
          for (int mx = 0, kx = px.k; kx < g1w; ++mx, kx += u1i) acc += src[mx] * F(__ldg(p.g1 + ky * g1w + kx));
        }
        ts[i] = acc;
      }
    }
    __syncthreads();

    // 3. Activation and sign record (or the saved mask); zeros outside the intermediate.
    {
      const int64_t rows_out = min(int64_t(geo.toy), p.oh - oy0), cols_out = min(int64_t(geo.tox), p.ow - ox0);
      const int64_t need_rows = (rows_out - 1) * d2 + g2h, need_cols = (cols_out - 1) * d2 + g2w;
      // Each code is written by one block: its rows/columns up to the next tile's origin.
      const int64_t own_rows = oy0 + geo.toy >= p.oh ? need_rows : min(need_rows, int64_t(geo.toy) * d2);
      const int64_t own_cols = ox0 + geo.tox >= p.ow ? need_cols : min(need_cols, int64_t(geo.tox) * d2);
      for (int i = threadIdx.x; i < geo.trn * geo.tcn; i += kThreads) {
        const int r = i / geo.tcn, cc = i % geo.tcn;
        const int64_t ty = tr0 + r, tx = tc0 + cc;
        if (ty < 0 || ty >= p.th || tx < 0 || tx >= p.tw) {
          ts[i] = F(0);
          continue;
        }
        const int64_t s_off = (plane * p.th + ty) * p.tw + tx;
        const F z = ts[i];
        if (p.mode == ACT) {
          F v = (z > F(0) ? z : z * slope) * gain;
          uint8_t code = z > F(0) ? POSITIVE : NEGATIVE;
          if (p.clamp >= 0 && (v > clamp || v < -clamp)) {
            v = v > clamp ? clamp : -clamp;
            code = CLAMPED;
          }
          ts[i] = v;
          if (p.signs && r < own_rows && cc < own_cols) p.signs[s_off] = code;
        } else {
          const uint8_t code = p.signs[s_off];
          ts[i] = z * (code == POSITIVE ? gain : code == NEGATIVE ? gain * slope : F(0));
        }
      }
    }
    __syncthreads();

    // 4. Downsampling FIR into the output tile.
    T* op = p.out + n * p.out_s[0] + c * p.out_s[1];
    if (sep2) {
      for (int i = threadIdx.x; i < geo.trn * geo.tox; i += kThreads) {
        const int r = i / geo.tox, o = i % geo.tox;
        const F* src = ts + r * geo.tcn + o * d2;
        F acc = F(0);
        if (G2) {
#pragma unroll
          for (int k = 0; k < G2; ++k) acc += src[k] * F(__ldg(p.g2 + k));
        } else {
          for (int k = 0; k < g2w; ++k) acc += src[k] * F(__ldg(p.g2 + k));
        }
        hd[i] = acc;
      }
      __syncthreads();
      for (int i = threadIdx.x; i < geo.toy * geo.tox; i += kThreads) {
        const int oyl = i / geo.tox, oxl = i % geo.tox;
        const int64_t oy = oy0 + oyl, ox = ox0 + oxl;
        if (oy >= p.oh || ox >= p.ow) continue;
        const F* src = hd + (oyl * d2) * geo.tox + oxl;
        F acc = F(0);
        if (G2) {
#pragma unroll
          for (int k = 0; k < G2; ++k) acc += src[k * geo.tox] * F(__ldg(p.g2 + k));
        } else {
          for (int k = 0; k < g2h; ++k) acc += src[k * geo.tox] * F(__ldg(p.g2 + k));
        }
        op[oy * p.out_s[2] + ox * p.out_s[3]] = Cvt<T>::from(acc);
      }
    } else {
      for (int i = threadIdx.x; i < geo.toy * geo.tox; i += kThreads) {
        const int oyl = i / geo.tox, oxl = i % geo.tox;
        const int64_t oy = oy0 + oyl, ox = ox0 + oxl;
        if (oy >= p.oh || ox >= p.ow) continue;
        F acc = F(0);
        for (int ky = 0; ky < g2h; ++ky) {
          const F* src = ts + (oyl * d2 + ky) * geo.tcn + oxl * d2;
          for (int kx = 0; kx < g2w; ++kx) acc += src[kx] * F(__ldg(p.g2 + ky * g2w + kx));
        }
        op[oy * p.out_s[2] + ox * p.out_s[3]] = Cvt<T>::from(acc);
      }
    }
    __syncthreads();  // the shared tiles are reused by the next plane
  }
}

Geometry make_geometry(const Args& a, int toy, int tox, size_t elem) {
  Geometry g;
  g.toy = toy;
  g.tox = tox;
  g.trn = int((toy - 1) * a.d2 + a.g2h);
  g.tcn = int((tox - 1) * a.d2 + a.g2w);
  g.xr = int((g.trn - 1 + a.g1h - 1) / a.u1 + 2);
  g.xc = int((g.tcn - 1 + a.g1w - 1) / a.u1 + 2);
  size_t floats = size_t(g.xr) * g.xc + size_t(g.trn) * g.tcn;
  if (a.g1_sep) floats += size_t(g.xr) * g.tcn;
  if (a.g2_sep) floats += size_t(g.trn) * g.tox;
  g.smem_bytes = floats * elem;
  return g;
}

template <typename T, int U1, int D2, int G1, int G2>
void launch_with(const KernelArgs<T>& p, cudaStream_t stream) {
  auto kernel = filtered_lrelu_kernel<T, U1, D2, G1, G2>;
  if (p.geo.smem_bytes > 48 * 1024)
    cuda::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(p.geo.smem_bytes)),
                kFamily, "cudaFuncSetAttribute");
  const int64_t tiles = int64_t(p.tiles_x) * p.tiles_y;
  if (tiles > 0x7fffffffLL) throw std::invalid_argument("genfast filtered_lrelu (CUDA): output too large");
  dim3 grid(unsigned(tiles), unsigned(std::min<int64_t>(p.planes, cuda::grid_cap(65535))));
  cuda::launch_kernel(kernel, grid, kThreads, p.geo.smem_bytes, stream, kFamily, "kernel launch", p);
}

template <typename T>
void launch(const Args& a) {
  using F = Arith<T>;
  KernelArgs<T> p;
  p.out = static_cast<T*>(a.out);
  p.x = static_cast<const T*>(a.x);
  p.b = static_cast<const T*>(a.b);
  p.signs = a.signs;
  p.g1 = a.g1;
  p.g2 = a.g2;
  p.planes = a.N * a.C;
  p.C = a.C;
  p.in_h = a.in_h;
  p.in_w = a.in_w;
  for (int i = 0; i < 4; ++i) {
    p.in_s[i] = a.in_s[i];
    p.out_s[i] = a.out_s[i];
  }
  p.g1h = a.g1h;
  p.g1w = a.g1w;
  p.g2h = a.g2h;
  p.g2w = a.g2w;
  p.g1_sep = a.g1_sep;
  p.g2_sep = a.g2_sep;
  p.u1 = a.u1;
  p.p1x = a.p1x;
  p.p1y = a.p1y;
  p.th = a.th;
  p.tw = a.tw;
  p.d2 = a.d2;
  p.p2x = a.p2x;
  p.p2y = a.p2y;
  p.oh = a.oh;
  p.ow = a.ow;
  p.gain = a.gain;
  p.slope = a.slope;
  p.clamp = a.clamp;
  p.mode = a.mode;

  // Largest output tile (16 x 16 down to 4 x 4) whose shared tiles fit the device.
  int device_smem = 0;
  cuda::check(cudaDeviceGetAttribute(&device_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, a.device), kFamily,
              "cudaDeviceGetAttribute");
  Geometry geo{};
  bool found = false;
  for (int t = 16; t >= 1; t /= 2) {
    geo = make_geometry(a, t, t, sizeof(F));
    if (geo.smem_bytes <= size_t(device_smem)) {
      found = true;
      break;
    }
  }
  if (!found)
    throw std::invalid_argument(
        "genfast filtered_lrelu (CUDA): the filters are too large for shared memory "
        "(use the triton or reference backend)");
  p.geo = geo;
  p.tiles_x = int((a.ow + geo.tox - 1) / geo.tox);
  p.tiles_y = int((a.oh + geo.toy - 1) / geo.toy);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  const bool common = a.u1 == 2 && a.d2 == 2 && a.g1_sep && a.g2_sep && a.g1w == 12 && a.g2w == 12;
  if (common)
    launch_with<T, 2, 2, 12, 12>(p, stream);
  else
    launch_with<T, 0, 0, 0, 0>(p, stream);
}

}  // namespace

void filtered_lrelu_cuda(const Args& a) {
  if (a.N * a.C == 0 || a.oh <= 0 || a.ow <= 0) return;
  if (a.mode == MASK && a.signs == nullptr)
    throw std::invalid_argument("filtered_lrelu: MASK mode needs the sign record");
#ifndef GENFAST_CUDA_EMULATION
  cuda::DeviceGuard guard(a.device);
#endif
  switch (a.dtype) {
    case F32: return launch<float>(a);
    case F64: return launch<double>(a);
    case F16: return launch<__half>(a);
    case BF16: return launch<__nv_bfloat16>(a);
  }
  throw std::invalid_argument(std::string("genfast filtered_lrelu (CUDA): unsupported dtype ") + dtype_name(a.dtype));
}

}  // namespace filtered_lrelu
}  // namespace genfast
