// Shared helpers for the pybind11 bindings and the C++ CPU kernels (dtype codes, 16-bit
// float conversions). No libtorch here. The CPU kernels' instruction-set clones: cpu_isa.h.
#pragma once
#include <cstdint>
#include <cstring>
#ifdef GENFAST_WITH_OPENMP
#include <omp.h>
#endif
#include <stdexcept>
#include <string>

namespace genfast {

// Element types of the tensors the kernels take. genfast/_ext.py reads the codes from the
// extension (_C.DTYPE_CODES), so Python never keeps its own copy.
enum DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3, I64 = 4, I32 = 5, BOOL = 6, U8 = 7 };
constexpr int kNumDTypes = 8;

inline const char* dtype_name(int code) {
  switch (code) {
    case F32: return "float32";
    case F16: return "float16";
    case BF16: return "bfloat16";
    case F64: return "float64";
    case I64: return "int64";
    case I32: return "int32";
    case BOOL: return "bool";
    case U8: return "uint8";
    default: return "unknown";
  }
}

// Storage types for the 16-bit formats on the CPU; arithmetic is always done in float.
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// IEEE half <-> float, round to nearest even; branch-light so loops vectorise.
inline float to_float(half_t h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t em = h.bits & 0x7fffu;
  // Normal and inf/nan: rebias the exponent by shifting into place and scaling.
  float mag = bits_to_float(em << 13) * 5.192296858534828e+33f;      // 2^112
  if (em >= 0x7c00u) mag = bits_to_float((em << 13) | 0x7f800000u);  // inf / nan
  return bits_to_float(float_to_bits(mag) | sign);
}
inline half_t to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  uint16_t out;
  if (a >= 0x7f800000u) {  // inf or nan (keep nan quiet)
    out = uint16_t(a > 0x7f800000u ? 0x7e00u : 0x7c00u);
  } else if (a >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
    out = 0x7c00u;
  } else if (a < 0x38800000u) {  // subnormal half (or zero): let the FPU round
    out = uint16_t(float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u);
  } else {  // normal: round to nearest even on the 13 dropped bits
    const uint32_t odd = (a >> 13) & 1u;
    a += 0xc8000fffu + odd;  // rebias exponent (-112 << 23) and add the rounding bias
    out = uint16_t(a >> 13);
  }
  return half_t{uint16_t(out | sign)};
}
inline float to_float(bf16_t h) { return bits_to_float(uint32_t(h.bits) << 16); }
inline bf16_t to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);                                                  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}
inline float to_float(float f) { return f; }
inline double to_float(double f) { return f; }

template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

template <typename T>
inline T from_compute(typename Compute<T>::type v);
template <>
inline float from_compute<float>(float v) {
  return v;
}
template <>
inline double from_compute<double>(double v) {
  return v;
}
template <>
inline half_t from_compute<half_t>(float v) {
  return to_half(v);
}
template <>
inline bf16_t from_compute<bf16_t>(float v) {
  return to_bf16(v);
}

// body(i) for every i in [0, n), on `threads` OpenMP threads (static or dynamic(1) schedule);
// on one thread without entering an OpenMP region: a region costs about 0.5 us even when it
// runs serially, a large part of a small call, which is launch-bound.
template <typename Body>
inline void parallel_for_static(int64_t n, int threads, Body&& body) {
#ifdef GENFAST_WITH_OPENMP
  if (threads > 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) body(i);
}

template <typename Body>
inline void parallel_for_dynamic(int64_t n, int threads, Body&& body) {
#ifdef GENFAST_WITH_OPENMP
  if (threads > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) body(i);
}

}  // namespace genfast
