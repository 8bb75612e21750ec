// Which instruction-set clone of the CPU kernels runs (see cpu_isa.h).
#include "cpu_isa.h"

#include <atomic>
#include <stdexcept>

namespace genfast {

namespace {

CpuIsa detect_widest() {
#ifdef GF_CPU_HAVE_CLONES
  __builtin_cpu_init();
  // libgcc reports the AVX-512 features only when the OS saves the zmm registers (XCR0).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return CpuIsa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2"))
    return CpuIsa::Avx2;
#endif
  return CpuIsa::Baseline;
}

// -1: not chosen yet, so the widest supported runs.
std::atomic<int> chosen{-1};

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Avx2: return "avx2";
    default: return "baseline";
  }
}

CpuIsa cpu_isa_supported() {
  static const CpuIsa widest = detect_widest();
  return widest;
}

CpuIsa cpu_isa() {
  const int c = chosen.load(std::memory_order_relaxed);
  return c >= 0 ? CpuIsa(c) : cpu_isa_supported();
}

void set_cpu_isa(const std::string& name) {
  CpuIsa want;
  if (name == "auto" || name.empty())
    want = cpu_isa_supported();
  else if (name == "baseline")
    want = CpuIsa::Baseline;
  else if (name == "avx2")
    want = CpuIsa::Avx2;
  else if (name == "avx512")
    want = CpuIsa::Avx512;
  else
    throw std::invalid_argument("GENFAST_CPU_ISA: unknown instruction set '" + name +
                                "' (expected auto, baseline, avx2 or avx512)");
  if (int(want) > int(cpu_isa_supported()))
    throw std::invalid_argument(std::string("GENFAST_CPU_ISA=") + name + ": this CPU runs at most the " +
                                cpu_isa_name(cpu_isa_supported()) + " clone (its flags: " + cpu_isa_flags() + ")");
  chosen.store(int(want), std::memory_order_relaxed);
}

std::string cpu_isa_flags() {
  std::string out;
#ifdef GF_CPU_HAVE_CLONES
  __builtin_cpu_init();
  auto add = [&](bool has, const char* name) {
    if (!has) return;
    if (!out.empty()) out += ' ';
    out += name;
  };
  add(__builtin_cpu_supports("sse4.2"), "sse4.2");
  add(__builtin_cpu_supports("avx"), "avx");
  add(__builtin_cpu_supports("avx2"), "avx2");
  add(__builtin_cpu_supports("fma"), "fma");
  add(__builtin_cpu_supports("f16c"), "f16c");
  add(__builtin_cpu_supports("avx512f"), "avx512f");
  add(__builtin_cpu_supports("avx512bw"), "avx512bw");
  add(__builtin_cpu_supports("avx512dq"), "avx512dq");
  add(__builtin_cpu_supports("avx512vl"), "avx512vl");
  add(__builtin_cpu_supports("avx512vnni"), "avx512vnni");
  add(__builtin_cpu_supports("avx512bf16"), "avx512bf16");
  add(__builtin_cpu_supports("avx512fp16"), "avx512fp16");
  add(__builtin_cpu_supports("amx-tile"), "amx-tile");
  add(__builtin_cpu_supports("amx-bf16"), "amx-bf16");
#endif
  return out;
}

}  // namespace genfast
