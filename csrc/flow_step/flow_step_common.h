// Argument checks and output allocation of flow_step shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include "core/checks.h"
#include "core/dispatch.h"

namespace tmd {

// c = s - r as a contiguous [B] tensor in the opmath dtype of the data (computed in float64
// first, so fp64 times keep their precision until the last cast).
inline at::Tensor flow_step_coeff(const at::Tensor& s, const at::Tensor& r, at::ScalarType data) {
  return (s.to(at::kDouble) - r.to(at::kDouble)).to(opmath_dtype(data)).contiguous();
}

// Validates the arguments of flow_step.
inline void flow_step_check(const at::Tensor& y, const at::Tensor& head_out, const at::Tensor& y1,
                            const at::Tensor& s, const at::Tensor& r) {
  check_float(y, "y");
  check_float(head_out, "head_out");
  check_float(y1, "y1");
  check_time_dtype(s, "s");
  check_time_dtype(r, "r");
  check_same_dtype(head_out, "head_out", y, "y");
  check_same_dtype(y1, "y1", y, "y");
  check_same_device(head_out, "head_out", y, "y");
  check_same_device(y1, "y1", y, "y");
  check_same_device(s, "s", y, "y");
  check_same_device(r, "r", y, "y");
  TORCH_CHECK(y.dim() >= 1, "y must be [B, ...] with at least 1 dimension, got a 0-d tensor");
  check_nonempty(y, "y");
  check_shape(head_out, y.sizes(), "head_out");
  check_shape(y1, y.sizes(), "y1");
  check_shape(s, {y.size(0)}, "s");
  check_shape(r, {y.size(0)}, "r");
}

// Validates the arguments and returns flow_step_coeff(s, r) (the CPU path; the CUDA kernels read
// s and r themselves and form the same coefficient in float64).
inline at::Tensor flow_step_check_and_coeff(const at::Tensor& y, const at::Tensor& head_out,
                                            const at::Tensor& y1, const at::Tensor& s,
                                            const at::Tensor& r) {
  flow_step_check(y, head_out, y1, s, r);
  return flow_step_coeff(s, r, y.scalar_type());
}

// Validates the arguments of flow_step_backward.
inline void flow_step_backward_check(const at::Tensor& grad_out, const at::Tensor& s, const at::Tensor& r) {
  check_float(grad_out, "grad_out");
  check_time_dtype(s, "s");
  check_time_dtype(r, "r");
  check_same_device(s, "s", grad_out, "grad_out");
  check_same_device(r, "r", grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() >= 1, "grad_out must be [B, ...], got a 0-d tensor");
  check_shape(s, {grad_out.size(0)}, "s");
  check_shape(r, {grad_out.size(0)}, "r");
}

inline at::Tensor flow_step_backward_check_and_coeff(const at::Tensor& grad_out, const at::Tensor& s,
                                                     const at::Tensor& r) {
  flow_step_backward_check(grad_out, s, r);
  return flow_step_coeff(s, r, grad_out.scalar_type());
}

}  // namespace tmd
