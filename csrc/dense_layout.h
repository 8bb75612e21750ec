// Layout checks shared by the bindings. bias_act and pixel_norm walk a dense tensor as n
// consecutive elements seen as [outer, C, S] (C: one dimension's size, S: its stride), so
// contiguous, channels_last and any other dense permutation run without copies.
#pragma once
#include <algorithm>
#include <string>

#include "tensor_view.h"

namespace genfast {

// t covers its memory without gaps or overlaps, in some dimension order.
inline bool dense(const TensorView& t) {
  int order[kMaxDims];
  int n = 0;
  for (int d = 0; d < t.ndim; ++d)
    if (t.shape[d] != 1) order[n++] = d;
  std::sort(order, order + n, [&](int a, int b) { return t.strides[a] < t.strides[b]; });
  int64_t expected = 1;
  for (int i = 0; i < n; ++i) {
    if (t.strides[order[i]] != expected) return false;
    expected *= t.shape[order[i]];
  }
  return true;
}

inline void expect_dense(const char* fn, const char* name, const TensorView& t) {
  expect_present(fn, name, t);
  if (!dense(t))
    fail_value(fn, std::string(name) + " must be dense (contiguous in some dimension order), got " + describe(t));
}

// t has the dtype, shape, device and memory layout of x (the kernels index them alike).
inline void expect_layout_of(const char* fn, const char* name, const TensorView& t, const TensorView& x) {
  expect_dtype(fn, name, t, x.dtype);
  expect_same_shape(fn, name, t, "x", x);
  expect_same_device(fn, name, t, x);
  for (int d = 0; d < x.ndim; ++d)
    if (x.shape[d] != 1 && t.strides[d] != x.strides[d])
      fail_value(fn, std::string(name) + " must have the strides of x (the same memory layout), differs in dimension " +
                         std::to_string(d));
}

}  // namespace genfast
