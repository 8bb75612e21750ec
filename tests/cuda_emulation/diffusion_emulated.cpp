// The CUDA diffusion kernels (kernels/diffusion.cu) and their real bindings
// (csrc/diffusion_bindings.cpp) compiled as host C++ over the SIMT emulator (cuda_emulation.h)
// into the Python module diffusion_emulated. Built by tests/cuda_emulation/build.py.
#define GENFAST_WITH_CUDA 1
#define GENFAST_CUDA_EMULATION 1

#include "diffusion.cu"
#include "diffusion_bindings.cpp"

// The bindings also bind the C++ CPU kernels, which this module does not compile.
namespace genfast {
namespace diffusion {
[[noreturn]] static void no_cpu_kernels() { throw std::logic_error("diffusion_emulated: no CPU kernels here"); }
void sampler_step_cpu(const StepArgs&) { no_cpu_kernels(); }
void add_noise_cpu(const NoiseArgs&) { no_cpu_kernels(); }
void per_sample_sums_cpu(const SumsArgs&) { no_cpu_kernels(); }
void combine_cpu(const CombineArgs&) { no_cpu_kernels(); }
void timestep_embedding_cpu(const EmbedArgs&) { no_cpu_kernels(); }
}  // namespace diffusion
}  // namespace genfast

PYBIND11_MODULE(diffusion_emulated, m) {
  for (genfast::Binder bind : genfast::binders()) bind(m);
}
