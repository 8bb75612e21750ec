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

GF_HD float gf_exp(float v) { return expf(v); }
GF_HD double gf_exp(double v) { return exp(v); }
GF_HD float gf_tanh(float v) { return tanhf(v); }
GF_HD double gf_tanh(double v) { return tanh(v); }
GF_HD float gf_log1p(float v) { return log1pf(v); }
GF_HD double gf_log1p(double v) { return log1p(v); }

// f(z), f'(z), f''(z). Only what the mode needs is used; the compiler drops the rest.
template <int A, typename F>
GF_HD void activation(F z, F alpha, F& f, F& d1, F& d2) {
  const F one = F(1), zero = F(0);
  if (A == LINEAR) { f = z; d1 = one; d2 = zero; }
  if (A == RELU) { f = z > zero ? z : zero; d1 = z > zero ? one : zero; d2 = zero; }
  if (A == LRELU) { f = z > zero ? z : z * alpha; d1 = z > zero ? one : alpha; d2 = zero; }
  if (A == TANH) { F t = gf_tanh(z); f = t; d1 = one - t * t; d2 = F(-2) * t * d1; }
  if (A == SIGMOID) { F s = one / (one + gf_exp(-z)); f = s; d1 = s * (one - s); d2 = d1 * (one - F(2) * s); }
  if (A == ELU) { F e = gf_exp(z) ; f = z > zero ? z : e - one; d1 = z > zero ? one : e; d2 = z > zero ? zero : e; }
  if (A == SELU) {
    const F scale = F(1.0507009873554804934193349852946), a = F(1.6732632423543772848170429916717);
    F e = gf_exp(z);
    f = z > zero ? scale * z : scale * a * (e - one);
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
