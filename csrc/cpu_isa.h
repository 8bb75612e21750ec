// Instruction-set clones of the C++ CPU kernels and the one place that picks between them.
//
// Every CPU kernel's hot function is compiled three times from the same source: for the
// x86-64 baseline, for AVX2+FMA (x86-64-v3) and for AVX-512 F/BW/DQ/VL (x86-64-v4, 512-bit
// vectors preferred). At run time cpu_isa() names the clone to run: the widest this CPU
// supports, or a narrower one chosen with set_cpu_isa() (genfast/_ext.py passes the
// environment variable GENFAST_CPU_ISA=baseline|avx2|avx512 at import, so tests can run every
// clone on one machine). GCC's target_clones resolver cannot be steered like that, hence this.
//
// Usage: mark the hot function GF_CPU_KERNEL (it is inlined into each clone, and everything it
// inlines is compiled for that clone's ISA) and call it through GF_CPU_DISPATCH:
//   template <typename T> GF_CPU_KERNEL void run_task(const Args& a, int64_t task) { ... }
//   ... GF_CPU_DISPATCH(run_task<T>(a, task));
// The macro is variadic so template arguments' commas need no parentheses.
// The dispatch costs one switch per call, so call it per task (a block of work), not per element.
#pragma once
#include <string>

namespace genfast {

enum class CpuIsa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

const char* cpu_isa_name(CpuIsa isa);
// The widest clone this CPU (and its OS, for the AVX-512 register state) can run.
CpuIsa cpu_isa_supported();
// The clone the kernels run now.
CpuIsa cpu_isa();
// Selects a clone by name ("baseline", "avx2", "avx512"; "auto" = the widest supported).
// Throws std::invalid_argument for an unknown name or a clone this CPU cannot run.
void set_cpu_isa(const std::string& name);
// The CPU's vector features that matter to genfast and torch, space-separated (e.g. "avx2 fma f16c").
std::string cpu_isa_flags();

}  // namespace genfast

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define GF_CPU_HAVE_CLONES 1
// Feature lists rather than arch=...: GCC inlines a default-target function (the kernel body,
// common.h's conversions) only into callers of the same arch, so the clones keep the default
// arch and add features. FMA contraction follows from -ffp-contract=fast (GCC's default).
#define GF_CPU_TARGET_AVX2 "avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe"
#define GF_CPU_TARGET_AVX512 \
  "avx512f,avx512bw,avx512dq,avx512vl,avx512cd,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe,prefer-vector-width=512"
// `#pragma GCC target` does not expand macros; GF_CPU_TARGET_PRAGMA(GF_CPU_TARGET_AVX2) does. (GCC
// ignores a malformed target pragma without a warning: the AVX2 clone then runs SSE2 code.)
#define GF_CPU_PRAGMA(x)               _Pragma(#x)
#define GF_CPU_TARGET_PRAGMA(features) GF_CPU_PRAGMA(GCC target(features))

namespace genfast {
namespace isa_clone {
// One non-inlined function per ISA; the kernel body (a lambda calling a GF_CPU_KERNEL function)
// is inlined into it and so compiled for that ISA.
template <typename Body>
__attribute__((noinline, target(GF_CPU_TARGET_AVX512))) void run_avx512(const Body& body) {
  body();
}
template <typename Body>
__attribute__((noinline, target(GF_CPU_TARGET_AVX2))) void run_avx2(const Body& body) {
  body();
}
template <typename Body>
__attribute__((noinline)) void run_baseline(const Body& body) {
  body();
}
}  // namespace isa_clone
}  // namespace genfast

#define GF_CPU_KERNEL inline __attribute__((always_inline))
#define GF_CPU_DISPATCH(...)                                                                              \
  do {                                                                                                    \
    switch (::genfast::cpu_isa()) {                                                                       \
      case ::genfast::CpuIsa::Avx512:                                                                     \
        ::genfast::isa_clone::run_avx512([&]() __attribute__((always_inline)) { __VA_ARGS__; });          \
        break;                                                                                            \
      case ::genfast::CpuIsa::Avx2:                                                                       \
        ::genfast::isa_clone::run_avx2([&]() __attribute__((always_inline)) { __VA_ARGS__; });            \
        break;                                                                                            \
      default: ::genfast::isa_clone::run_baseline([&]() __attribute__((always_inline)) { __VA_ARGS__; }); \
    }                                                                                                     \
  } while (0)
#else
#define GF_CPU_KERNEL inline
#define GF_CPU_DISPATCH(...) \
  do { __VA_ARGS__; } while (0)
#endif
