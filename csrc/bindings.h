// Each op family binds its functions in its own csrc/<family>_bindings.cpp and registers the
// binder with GENFAST_REGISTER_BINDINGS(family), so adding a family never touches module.cpp.
//
// Arguments are named (py::arg). The CPU entry points that prepared eager calls reach
// (attention forward/backward, bias_act, sampler_step, group_norm forward) also take them by
// position: pybind11 matches every keyword by name at every call (about 0.12 us each, over
// 1 us for an attention call), so genfast._ext.bind_positional matches the names once, against
// the entry point's own signature, and the prepared call passes them by position.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace genfast {

using Binder = void (*)(pybind11::module_&);

inline std::vector<Binder>& binders() {
  static std::vector<Binder> list;  // function-local: safe from static-initialisation order
  return list;
}

struct RegisterBindings {
  explicit RegisterBindings(Binder binder) { binders().push_back(binder); }
};

inline const void* cptr(uintptr_t p) { return reinterpret_cast<const void*>(p); }
inline void* mptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

}  // namespace genfast

#define GENFAST_REGISTER_BINDINGS(family)                                        \
  static void bind_##family(pybind11::module_& m);                               \
  static genfast::RegisterBindings register_##family##_bindings(&bind_##family); \
  static void bind_##family(pybind11::module_& m)
