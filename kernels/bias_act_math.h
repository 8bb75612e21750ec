// Activation math for bias_act, shared by the C++ CPU kernels (csrc/) and the CUDA kernels
// (kernels/), so both backends evaluate exactly the same formulas.
//
// Semantics (NVlabs StyleGAN2-ADA / StyleGAN3 bias_act), with z = x + b:
//   FORWARD: y   = clamp(f(z) * gain, -clamp, clamp)
//   GRAD:    dx  = dy * gain * f'(z) * mask              (dL/dx given dL/dy)
//   GRAD2:   dz  = ddx * dy * gain * f''(z) * mask       (d(<ddx, dx>)/dx, for double backward)
// where mask = |f(z) * gain| <= clamp (inclusive, as torch.clamp's gradient), or 1 if clamp < 0.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GF_HD __host__ __device__ __forceinline__
#else
#define GF_HD inline
#endif

namespace genfast {
namespace bias_act {

// Must match genfast/ops/bias_act.py ACTIVATIONS order.
enum Act : int { LINEAR = 0, RELU = 1, LRELU = 2, TANH = 3, SIGMOID = 4, ELU = 5, SELU = 6, SOFTPLUS = 7, SWISH = 8 };
enum Mode : int { FORWARD = 0, GRAD = 1, GRAD2 = 2 };

struct Params {
  double alpha;  // lrelu negative slope (ignored by the other activations, as in NVlabs)
  double gain;
  double clamp;  // < 0: no clamp
};

#if !defined(__CUDA_ARCH__)
// Host float exp/log without libm calls (Cephes expf/logf, about 1 ulp), so that the CPU
// loops vectorise; libm's scalar calls cost 5-10x more than the memory traffic.
inline float host_expf(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447505531f;
  float c = x > hi ? hi : x;
  c = c < lo ? lo : c;
  const float t = c * 1.44269504088896341f;
  // Round to nearest with the 1.5 * 2^23 trick (|t| <= 128): unlike a sign-dependent
  // +-0.5 and an int conversion, this vectorises for every x86 ISA level.
  const float fn = (t + 12582912.0f) - 12582912.0f;
  const int n = int(fn);
  float r = c - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits = uint32_t(n + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  float result = p * scale;
  result = x > hi ? __builtin_inff() : result;
  result = x < lo ? 0.0f : result;
  return x != x ? x : result;  // NaN in, NaN out
}

// log(x) for finite x > 0.
inline float host_logf(float x) {
  uint32_t bits;
  __builtin_memcpy(&bits, &x, 4);
  int e = int((bits >> 23) & 0xffu) - 126;
  bits = (bits & 0x807fffffu) | 0x3f000000u;  // mantissa in [0.5, 1)
  float m;
  __builtin_memcpy(&m, &bits, 4);
  const bool below = m < 0.707106781186547524f;
  e -= below ? 1 : 0;
  m = below ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = float(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}
#endif

GF_HD float gf_exp(float v) {
#if defined(__CUDA_ARCH__)
  return expf(v);
#else
  return host_expf(v);
#endif
}
GF_HD double gf_exp(double v) { return exp(v); }

GF_HD float gf_tanh(float v) {
#if defined(__CUDA_ARCH__)
  return tanhf(v);
#else
  // Cephes tanhf: odd polynomial near 0 (no cancellation), exp form elsewhere.
  const float a = v < 0.0f ? -v : v;
  const float z = v * v;
  const float small =
      ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
       3.33332819422e-1f) *
          z * v +
      v;
  float large = 1.0f - 2.0f / (host_expf(2.0f * a) + 1.0f);
  large = v < 0.0f ? -large : large;
  return a < 0.625f ? small : large;  // NaN: the comparison fails, large is NaN
#endif
}
GF_HD double gf_tanh(double v) { return tanh(v); }

// exp(v) - 1 without cancellation near 0 (elu and selu, as torch's expm1).
GF_HD float gf_expm1(float v) {
#if defined(__CUDA_ARCH__)
  return expm1f(v);
#else
  // e^v - 1 = 2 t / (1 - t) with t = tanh(v / 2), whose polynomial is accurate near 0.
  const float t = gf_tanh(0.5f * v);
  const float near0 = 2.0f * t / (1.0f - t);
  const float a = v < 0.0f ? -v : v;
  return a < 0.5f ? near0 : host_expf(v) - 1.0f;
#endif
}
GF_HD double gf_expm1(double v) { return expm1(v); }

// log(1 + u) for u >= 0 (softplus only needs that range).
GF_HD float gf_log1p(float u) {
#if defined(__CUDA_ARCH__)
  return log1pf(u);
#else
  const float w = 1.0f + u;
  // The correction term recovers what rounding 1 + u lost (exact for tiny u).
  const float lw = w == 1.0f ? 0.0f : host_logf(w);
  return lw - ((w - 1.0f) - u) / w;
#endif
}
GF_HD double gf_log1p(double v) { return log1p(v); }

// f(z), f'(z), f''(z). Only what the mode needs is used; the compiler drops the rest.
template <int A, typename F>
GF_HD void activation(F z, F alpha, F& f, F& d1, F& d2) {
  const F one = F(1), zero = F(0);
  if (A == LINEAR) {
    f = z;
    d1 = one;
    d2 = zero;
  }
  if (A == RELU) {
    f = z > zero ? z : zero;
    d1 = z > zero ? one : zero;
    d2 = zero;
  }
  if (A == LRELU) {
    f = z > zero ? z : z * alpha;
    d1 = z > zero ? one : alpha;
    d2 = zero;
  }
  if (A == TANH) {
    F t = gf_tanh(z);
    f = t;
    d1 = one - t * t;
    d2 = F(-2) * t * d1;
  }
  if (A == SIGMOID) {
    F s = one / (one + gf_exp(-z));
    f = s;
    d1 = s * (one - s);
    d2 = d1 * (one - F(2) * s);
  }
  if (A == ELU) {
    F em1 = gf_expm1(z > zero ? zero : z), e = em1 + one;
    f = z > zero ? z : em1;
    d1 = z > zero ? one : e;
    d2 = z > zero ? zero : e;
  }
  if (A == SELU) {
    const F scale = F(1.0507009873554804934193349852946), a = F(1.6732632423543772848170429916717);
    F em1 = gf_expm1(z > zero ? zero : z), e = em1 + one;
    f = z > zero ? scale * z : scale * a * em1;
    d1 = z > zero ? scale : scale * a * e;
    d2 = z > zero ? zero : scale * a * e;
  }
  if (A == SOFTPLUS) {  // torch's defaults: beta = 1, threshold = 20
    F s = one / (one + gf_exp(-z));
    f = z > F(20) ? z : gf_log1p(gf_exp(z));
    d1 = z > F(20) ? one : s;
    d2 = z > F(20) ? zero : s * (one - s);
  }
  if (A == SWISH) {
    F s = one / (one + gf_exp(-z));
    f = z * s;
    d1 = s * (one + z * (one - s));
    d2 = s * (one - s) * (F(2) + z * (one - F(2) * s));
  }
}

// One element. `b`, `dy`, `ddx` are ignored by modes that do not read them.
template <int A, int M, typename F>
GF_HD F apply(F x, F b, F dy, F ddx, F alpha, F gain, F clamp) {
  F f, d1, d2;
  activation<A, F>(x + b, alpha, f, d1, d2);
  F v = f * gain;
  if (M == FORWARD) {
    // Written with comparisons (not fmin/fmax) so that NaN propagates like torch.clamp.
    if (clamp >= F(0)) v = v < -clamp ? -clamp : (v > clamp ? clamp : v);
    return v;
  }
  const bool pass = !(clamp >= F(0)) || (v >= -clamp && v <= clamp);
  if (M == GRAD) return pass ? dy * gain * d1 : F(0);
  return pass ? ddx * dy * gain * d2 : F(0);
}

}  // namespace bias_act
}  // namespace genfast
