// Argument checks and per-sample coefficients of meanflow_fd_loss, shared by the CPU and CUDA
// entry points.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "core/checks.h"
#include "core/dispatch.h"

namespace tmd {

// Per-sample coefficients the kernels read: a = (s-r)/(s_plus-s_minus) (0 where s == r) in the
// opmath dtype of the data, and fd = (s != r) as bool. Both contiguous [B].
struct MeanflowFdCoeffs {
  at::Tensor a;
  at::Tensor fd;
};

// Checks everything but the values of the times; order: dtype -> dtypes agree -> device ->
// sizes -> every tensor's shape -> c.
inline void meanflow_fd_loss_check(const at::Tensor& u, const at::Tensor& u_plus, const at::Tensor& u_minus,
                                   const at::Tensor& v, const at::Tensor& s, const at::Tensor& r,
                                   const at::Tensor& s_plus, const at::Tensor& s_minus, double c) {
  check_float(u, "u");
  check_float(u_plus, "u_plus");
  check_float(u_minus, "u_minus");
  check_float(v, "v");
  check_time_dtype(s, "s");
  check_time_dtype(r, "r");
  check_time_dtype(s_plus, "s_plus");
  check_time_dtype(s_minus, "s_minus");
  check_same_dtype(u_plus, "u_plus", u, "u");
  check_same_dtype(u_minus, "u_minus", u, "u");
  check_same_dtype(v, "v", u, "u");
  check_same_device(u_plus, "u_plus", u, "u");
  check_same_device(u_minus, "u_minus", u, "u");
  check_same_device(v, "v", u, "u");
  check_same_device(s, "s", u, "u");
  check_same_device(r, "r", u, "u");
  check_same_device(s_plus, "s_plus", u, "u");
  check_same_device(s_minus, "s_minus", u, "u");
  TORCH_CHECK(u.dim() >= 1, "u must be [B, ...] with at least 1 dimension, got a 0-d tensor");
  check_nonempty(u, "u");
  check_shape(u_plus, u.sizes(), "u_plus");
  check_shape(u_minus, u.sizes(), "u_minus");
  check_shape(v, u.sizes(), "v");
  check_shape(s, {u.size(0)}, "s");
  check_shape(r, {u.size(0)}, "r");
  check_shape(s_plus, {u.size(0)}, "s_plus");
  check_shape(s_minus, {u.size(0)}, "s_minus");
  TORCH_CHECK(std::isfinite(c) && c > 0, "c must be a finite number > 0, got ", c);
}

// Validates the time values and returns the coefficients on the device of the times. The times
// are read on the host in one [4, B] float64 copy (on CUDA: one device-to-host copy, i.e. a host
// sync per call), where the check is free and the coefficients take a loop instead of a chain of
// small tensor ops.
inline MeanflowFdCoeffs meanflow_fd_coeffs(const at::Tensor& s, const at::Tensor& r, const at::Tensor& s_plus,
                                           const at::Tensor& s_minus, at::ScalarType data) {
  const at::Tensor times = at::stack({s, r, s_plus, s_minus}).to(at::kCPU, at::kDouble).contiguous();
  const int64_t batch = s.size(0);
  const double* sv = times.data_ptr<double>();
  const double *rv = sv + batch, *spv = sv + 2 * batch, *smv = sv + 3 * batch;
  at::Tensor a = at::empty({batch}, times.options());
  at::Tensor fd = at::empty({batch}, times.options().dtype(at::kBool));
  double* av = a.data_ptr<double>();
  bool* fdv = fd.data_ptr<bool>();
  for (int64_t b = 0; b < batch; ++b) {
    fdv[b] = sv[b] != rv[b];
    TORCH_CHECK(!fdv[b] || spv[b] != smv[b], "s_plus must differ from s_minus on every row with s != r (the ",
                "finite-difference step s_plus - s_minus is zero there); row ", b, " has s = ", sv[b], ", r = ", rv[b],
                ", s_plus = s_minus = ", spv[b]);
    av[b] = fdv[b] ? (sv[b] - rv[b]) / (spv[b] - smv[b]) : 0.0;
  }
  return {a.to(s.device(), opmath_dtype(data)), fd.to(s.device())};
}

// Checks of the backward's own arguments (the forward inputs are checked by meanflow_fd_loss_check).
inline void meanflow_fd_loss_backward_check(const at::Tensor& grad_loss, const at::Tensor& grad_mse,
                                            const at::Tensor& mse, const at::Tensor& u) {
  check_float(grad_loss, "grad_loss");
  check_float(grad_mse, "grad_mse");
  check_float(mse, "mse");
  check_same_device(grad_loss, "grad_loss", u, "u");
  check_same_device(grad_mse, "grad_mse", u, "u");
  check_same_device(mse, "mse", u, "u");
  check_shape(grad_loss, {u.size(0)}, "grad_loss");
  check_shape(grad_mse, {u.size(0)}, "grad_mse");
  check_shape(mse, {u.size(0)}, "mse");
}

// Checks of meanflow_fd_loss_delta_backward: delta [B, ...] float32 or float64 (the opmath dtype of
// the forward), non-empty per sample; grad_loss, grad_mse, mse [B] floating, on delta's device; c > 0.
inline void meanflow_fd_loss_delta_backward_check(const at::Tensor& grad_loss, const at::Tensor& grad_mse,
                                                  const at::Tensor& delta, const at::Tensor& mse, double c) {
  check_float(delta, "delta");
  TORCH_CHECK(delta.scalar_type() == at::kFloat || delta.scalar_type() == at::kDouble,
              "delta must be float32 or float64 (the forward's opmath dtype), got ", delta.scalar_type());
  TORCH_CHECK(delta.dim() >= 1, "delta must be [B, ...] with at least 1 dimension, got a 0-d tensor");
  check_nonempty(delta, "delta");
  meanflow_fd_loss_backward_check(grad_loss, grad_mse, mse, delta);
  TORCH_CHECK(std::isfinite(c) && c > 0, "c must be a finite number > 0, got ", c);
}

// meanflow_fd_loss_delta_backward_ writes over delta: it must be contiguous (a contiguous copy would
// take the result and be thrown away).
inline void meanflow_fd_loss_delta_backward_inplace_check(const at::Tensor& grad_loss, const at::Tensor& grad_mse,
                                                          const at::Tensor& delta, const at::Tensor& mse, double c) {
  meanflow_fd_loss_delta_backward_check(grad_loss, grad_mse, delta, mse, c);
  TORCH_CHECK(delta.is_contiguous(), "delta must be contiguous for the in-place backward (it receives grad_u)");
}

}  // namespace tmd
