// TensorView: how a tensor reaches an extension entry point. The pybind11 caster below reads
// it through DLPack (torch.utils.dlpack.to_dlpack: one call) or, where that is unavailable,
// from the torch.Tensor protocol (data_ptr(), shape, stride(), dtype, get_device(), is_cpu),
// without linking libtorch, so one build serves every torch version.
// An argument given as None becomes an absent view. Entry points check each view against
// the others (shapes, dtypes, devices) with the expect_* helpers and throw a clear error
// naming the argument before any kernel runs: a swapped or mis-shaped tensor raises instead
// of corrupting memory.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "common.h"

namespace genfast {

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  bool present = false;  // false: the argument was None
  int dtype = -1;        // DType (common.h); -1: a dtype no kernel takes
  int device = -1;       // -1: CPU, >= 0: CUDA device ordinal
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, as torch reports them

  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
  bool contiguous() const {  // row-major dense (size-1 dimensions may have any stride)
    int64_t expected = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      if (shape[d] != 1 && strides[d] != expected) return false;
      expected *= shape[d];
    }
    return true;
  }
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(data); }
};

// The checks throw std::invalid_argument (ValueError in Python) or pybind11::type_error
// (TypeError), naming the entry point and the argument.
inline std::string describe(const TensorView& t) {
  if (!t.present) return "None";
  std::ostringstream s;
  s << dtype_name(t.dtype) << " (";
  for (int d = 0; d < t.ndim; ++d) s << (d ? ", " : "") << t.shape[d];
  s << (t.ndim == 1 ? ",)" : ")") << " on " << (t.device < 0 ? std::string("cpu") : "cuda:" + std::to_string(t.device));
  return s.str();
}

[[noreturn]] inline void fail_value(const char* fn, const std::string& message) {
  throw std::invalid_argument(std::string(fn) + ": " + message);
}
[[noreturn]] inline void fail_type(const char* fn, const std::string& message) {
  throw pybind11::type_error(std::string(fn) + ": " + message);
}

inline void expect_present(const char* fn, const char* name, const TensorView& t) {
  if (!t.present) fail_value(fn, std::string(name) + " is required, got None");
}

inline void expect_ndim(const char* fn, const char* name, const TensorView& t, int ndim) {
  expect_present(fn, name, t);
  if (t.ndim != ndim)
    fail_value(fn, std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got " + describe(t));
}

inline void expect_shape(const char* fn, const char* name, const TensorView& t, std::initializer_list<int64_t> shape) {
  expect_ndim(fn, name, t, static_cast<int>(shape.size()));
  int d = 0;
  for (int64_t want : shape) {
    if (want >= 0 && t.shape[d] != want) {
      std::ostringstream s;
      s << name << " must have shape (";
      int e = 0;
      for (int64_t w : shape) s << (e++ ? ", " : "") << (w < 0 ? std::string("*") : std::to_string(w));
      s << "), got " << describe(t);
      fail_value(fn, s.str());
    }
    ++d;
  }
}

inline void expect_same_shape(const char* fn, const char* name, const TensorView& t, const char* other_name,
                              const TensorView& other) {
  expect_present(fn, name, t);
  bool same = t.ndim == other.ndim;
  for (int d = 0; same && d < t.ndim; ++d) same = t.shape[d] == other.shape[d];
  if (!same)
    fail_value(fn, std::string(name) + " must have the shape of " + other_name + " (" + describe(other) + "), got " +
                       describe(t));
}

inline void expect_dtype(const char* fn, const char* name, const TensorView& t, int dtype) {
  expect_present(fn, name, t);
  if (t.dtype != dtype) fail_type(fn, std::string(name) + " must be " + dtype_name(dtype) + ", got " + describe(t));
}

inline void expect_float_dtype(const char* fn, const char* name, const TensorView& t) {
  expect_present(fn, name, t);
  if (t.dtype < F32 || t.dtype > F64)
    fail_type(fn, std::string(name) + " must be float32, float16, bfloat16 or float64, got " + describe(t));
}

inline void expect_same_device(const char* fn, const char* name, const TensorView& t, const TensorView& ref) {
  expect_present(fn, name, t);
  if (t.device != ref.device)
    fail_value(fn, std::string(name) + " is on another device than the other tensors: " + describe(t) + " vs " +
                       describe(ref));
}

inline void expect_cpu(const char* fn, const char* name, const TensorView& t) {
  expect_present(fn, name, t);
  if (t.device >= 0) fail_value(fn, std::string(name) + " must be a CPU tensor, got " + describe(t));
}

inline void expect_cuda(const char* fn, const char* name, const TensorView& t) {
  expect_present(fn, name, t);
#ifndef GENFAST_CUDA_EMULATION
  if (t.device < 0) fail_value(fn, std::string(name) + " must be a CUDA tensor, got " + describe(t));
#endif
}

inline void expect_contiguous(const char* fn, const char* name, const TensorView& t) {
  expect_present(fn, name, t);
  if (!t.contiguous()) fail_value(fn, std::string(name) + " must be contiguous, got " + describe(t));
}

inline void expect_unit_last_stride(const char* fn, const char* name, const TensorView& t) {
  expect_present(fn, name, t);
  if (t.ndim > 0 && t.shape[t.ndim - 1] > 1 && t.strides[t.ndim - 1] != 1)
    fail_value(fn, std::string(name) + " must have unit stride in its last dimension, got " + describe(t) +
                       " with stride " + std::to_string(t.strides[t.ndim - 1]));
}

inline pybind11::dict dtype_codes() {
  pybind11::dict d;
  for (int code = 0; code < kNumDTypes; ++code) d[dtype_name(code)] = code;
  return d;
}

inline int dtype_code(const std::string& name) {
  for (int code = 0; code < kNumDTypes; ++code)
    if (name == dtype_name(code)) return code;
  return -1;
}

inline void bind_tensor_view(pybind11::module_& m) { m.attr("DTYPE_CODES") = dtype_codes(); }

}  // namespace genfast

namespace pybind11 {
namespace detail {

template <>
struct type_caster<genfast::TensorView> {
  PYBIND11_TYPE_CASTER(genfast::TensorView, const_name("Tensor | None"));

  // Called for every tensor argument of every entry point, so it stays on the CPython API:
  // interned attribute names, no hasattr, no pybind11 casts (this is host time of small calls).
  bool load(handle src, bool) {
    value = genfast::TensorView{};
    if (src.is_none()) return true;
    PyObject* t = src.ptr();
    if (load_dlpack(t)) return true;
    const Names& n = names();
    object shape = reinterpret_steal<object>(PyObject_GetAttr(t, n.shape));
    object strides = shape ? reinterpret_steal<object>(PyObject_CallMethodNoArgs(t, n.stride)) : object();
    if (!shape || !strides || !PyTuple_Check(shape.ptr()) || !PyTuple_Check(strides.ptr())) {
      PyErr_Clear();
      return false;  // not a tensor: pybind11 raises TypeError naming the entry point's arguments
    }
    const auto ndim = static_cast<int>(PyTuple_GET_SIZE(shape.ptr()));
    if (ndim > genfast::kMaxDims || PyTuple_GET_SIZE(strides.ptr()) != ndim)
      throw value_error("a tensor with " + std::to_string(ndim) + " dimensions reached a genfast kernel (at most " +
                        std::to_string(genfast::kMaxDims) + ")");
    value.ndim = ndim;
    for (int d = 0; d < ndim; ++d) {
      value.shape[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape.ptr(), d));
      value.strides[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides.ptr(), d));
    }
    object dtype = reinterpret_steal<object>(PyObject_GetAttr(t, n.dtype));
    object device = reinterpret_steal<object>(PyObject_CallMethodNoArgs(t, n.get_device));
    object data = reinterpret_steal<object>(PyObject_CallMethodNoArgs(t, n.data_ptr));
    if (!dtype || !device || !data) throw error_already_set();
    value.dtype = dtype_of(dtype);
    value.device = static_cast<int>(PyLong_AsLong(device.ptr()));
    if (value.device < 0) {  // -1: the CPU, or a device no kernel takes (meta, mps, ...)
      object is_cpu = reinterpret_steal<object>(PyObject_GetAttr(t, n.is_cpu));
      if (!is_cpu) throw error_already_set();
      if (is_cpu.ptr() != Py_True)
        throw value_error("a tensor on a device other than the CPU or a CUDA GPU reached a genfast kernel (" +
                          str(src.attr("device")).cast<std::string>() + ")");
    }
    value.data = PyLong_AsVoidPtr(data.ptr());
    if (PyErr_Occurred()) throw error_already_set();
    value.present = true;
    return true;
  }

 private:
  struct Names {
    PyObject *shape, *stride, *dtype, *get_device, *is_cpu, *data_ptr;
  };
  static const Names& names() {  // interned once, never freed (like the module)
    static const Names n{PyUnicode_InternFromString("shape"),  PyUnicode_InternFromString("stride"),
                         PyUnicode_InternFromString("dtype"),  PyUnicode_InternFromString("get_device"),
                         PyUnicode_InternFromString("is_cpu"), PyUnicode_InternFromString("data_ptr")};
    return n;
  }

  // DLPack's ABI (dlpack.h, stable since v0.2): torch.utils.dlpack.to_dlpack returns a
  // "dltensor" capsule holding a DLManagedTensor, whose first member is this struct.
  struct DLDevice {
    int32_t device_type;  // 1: CPU, 2: CUDA, 3: CUDA host (pinned) memory
    int32_t device_id;
  };
  struct DLDataType {
    uint8_t code;  // 0: int, 1: uint, 2: float, 4: bfloat, 6: bool
    uint8_t bits;
    uint16_t lanes;
  };
  struct DLTensor {
    void* data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t* shape;
    int64_t* strides;  // in elements; null: row-major
    uint64_t byte_offset;
  };

  // One call of torch.utils.dlpack.to_dlpack gives a tensor's address, device, dtype, shape and
  // strides (about 0.45 us) instead of six attribute reads (about 0.85 us). False, with nothing
  // set, where the exporter is missing or refuses the object (a non-tensor, a meta tensor) or
  // the device is neither the CPU nor a CUDA GPU: the attribute path then decides, and raises.
  bool load_dlpack(PyObject* t) {
    PyObject* exporter = dlpack_exporter();
    if (exporter == nullptr) return false;
    object capsule = reinterpret_steal<object>(PyObject_CallOneArg(exporter, t));
    const DLTensor* dl =
        capsule ? static_cast<const DLTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor")) : nullptr;
    if (dl == nullptr) {
      PyErr_Clear();
      return false;
    }
    const int type = dl->device.device_type;
    if (type != 1 && type != 2 && type != 3) return false;
    if (dl->ndim > genfast::kMaxDims)
      throw value_error("a tensor with " + std::to_string(dl->ndim) + " dimensions reached a genfast kernel (at most " +
                        std::to_string(genfast::kMaxDims) + ")");
    value.ndim = dl->ndim;
    int64_t row_major = 1;
    for (int d = dl->ndim - 1; d >= 0; --d) {
      value.shape[d] = dl->shape[d];
      value.strides[d] = dl->strides ? dl->strides[d] : row_major;
      row_major *= dl->shape[d];
    }
    value.dtype = dlpack_dtype(dl->dtype);
    value.device = type == 2 ? dl->device.device_id : -1;
    value.data = static_cast<char*>(dl->data) + dl->byte_offset;
    value.present = true;
    return true;  // the capsule's destructor releases the exported tensor
  }

  static PyObject* dlpack_exporter() {  // torch.utils.dlpack.to_dlpack, or null; looked up once
    static PyObject* exporter = [] {
      PyObject* module = PyImport_ImportModule("torch.utils.dlpack");
      PyObject* fn = module ? PyObject_GetAttrString(module, "to_dlpack") : nullptr;
      Py_XDECREF(module);
      if (fn == nullptr) PyErr_Clear();
      return fn;  // kept for the life of the process, like the module
    }();
    return exporter;
  }

  static int dlpack_dtype(DLDataType t) {
    if (t.lanes != 1) return -1;
    switch (t.code * 1000 + t.bits) {
      case 2032: return genfast::F32;
      case 2016: return genfast::F16;
      case 4016: return genfast::BF16;
      case 2064: return genfast::F64;
      case 64: return genfast::I64;
      case 32: return genfast::I32;
      case 6008: return genfast::BOOL;
      case 1008: return genfast::U8;
      default: return -1;
    }
  }

  // torch.dtype objects are singletons: remember each one's code by identity.
  static int dtype_of(handle dtype) {
    static std::unordered_map<PyObject*, int> known;
    auto it = known.find(dtype.ptr());
    if (it != known.end()) return it->second;
    std::string name = str(dtype).cast<std::string>();  // "torch.float32"
    if (name.rfind("torch.", 0) == 0) name = name.substr(6);
    const int code = genfast::dtype_code(name);
    known.emplace(dtype.inc_ref().ptr(), code);  // kept alive with the table
    return code;
  }
};

}  // namespace detail
}  // namespace pybind11
