// Argument checks and output allocation of adaln_modulate shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "core/checks.h"
#include "core/dispatch.h"

namespace tmd {

inline void adaln_modulate_check(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                                 double eps) {
  check_float(x, "x");
  check_float(shift, "shift");
  check_float(scale, "scale");
  check_same_dtype(shift, "shift", x, "x");
  check_same_dtype(scale, "scale", x, "x");
  check_same_device(shift, "shift", x, "x");
  check_same_device(scale, "scale", x, "x");
  check_dim(x, 3, "x", "[B, T, D]");
  check_nonempty(x, "x");
  check_shape(shift, {x.size(0), x.size(2)}, "shift");
  check_shape(scale, {x.size(0), x.size(2)}, "scale");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
}

inline void adaln_modulate_backward_check(const at::Tensor& grad_out, const at::Tensor& x,
                                          const at::Tensor& scale, const at::Tensor& mean,
                                          const at::Tensor& rstd) {
  check_float(grad_out, "grad_out");
  check_float(x, "x");
  check_float(scale, "scale");
  TORCH_CHECK(mean.defined(), "mean must be a tensor, got None");
  TORCH_CHECK(rstd.defined(), "rstd must be a tensor, got None");
  check_same_dtype(x, "x", grad_out, "grad_out");
  check_same_dtype(scale, "scale", grad_out, "grad_out");
  const at::ScalarType acc = opmath_dtype(x.scalar_type());
  TORCH_CHECK(mean.scalar_type() == acc, "mean must have dtype ", acc, " (the opmath dtype of x), got ",
              mean.scalar_type());
  TORCH_CHECK(rstd.scalar_type() == acc, "rstd must have dtype ", acc, " (the opmath dtype of x), got ",
              rstd.scalar_type());
  check_same_device(x, "x", grad_out, "grad_out");
  check_same_device(scale, "scale", grad_out, "grad_out");
  check_same_device(mean, "mean", grad_out, "grad_out");
  check_same_device(rstd, "rstd", grad_out, "grad_out");
  check_dim(x, 3, "x", "[B, T, D]");
  check_nonempty(x, "x");
  check_shape(grad_out, x.sizes(), "grad_out");
  check_shape(scale, {x.size(0), x.size(2)}, "scale");
  check_shape(mean, {x.size(0), x.size(1)}, "mean");
  check_shape(rstd, {x.size(0), x.size(1)}, "rstd");
}

// Outputs of the forward: out [B,T,D] in the dtype of x, mean and rstd [B,T] in its opmath dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_alloc(const at::Tensor& x) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const auto stat_opts = x.options().dtype(opmath_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({x.size(0), x.size(1)}, stat_opts);
  at::Tensor rstd = at::empty({x.size(0), x.size(1)}, stat_opts);
  return {out, mean, rstd};
}

}  // namespace tmd
