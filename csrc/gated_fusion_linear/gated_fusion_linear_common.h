// Argument checks of gated_fusion_linear shared by the CPU and CUDA entry points. The fusion itself
// (lam, the elementwise launchers, the gate/alpha gradients) comes from gated_fusion_common.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "core/checks.h"
#include "gated_fusion/gated_fusion_common.h"

namespace tmd {

// m [B,T,D]; x [B,T,K]; weight [D,K]; bias [D] or None; gate [B,D]; alpha 0-d; one float dtype,
// one device; B, T, D, K > 0.
inline void gated_fusion_linear_check(const at::Tensor& m, const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& gate,
                                      const at::Tensor& alpha) {
  check_float(m, "m");
  check_float(x, "x");
  check_float(weight, "weight");
  if (bias) check_float(*bias, "bias");
  check_float(gate, "gate");
  check_float(alpha, "alpha");
  check_same_dtype(x, "x", m, "m");
  check_same_dtype(weight, "weight", m, "m");
  if (bias) check_same_dtype(*bias, "bias", m, "m");
  check_same_dtype(gate, "gate", m, "m");
  check_same_dtype(alpha, "alpha", m, "m");
  check_same_device(x, "x", m, "m");
  check_same_device(weight, "weight", m, "m");
  if (bias) check_same_device(*bias, "bias", m, "m");
  check_same_device(gate, "gate", m, "m");
  check_same_device(alpha, "alpha", m, "m");
  check_dim(m, 3, "m", "[B, T, D]");
  check_dim(x, 3, "x", "[B, T, K]");
  check_dim(weight, 2, "weight", "[D, K]");
  check_nonempty(m, "m");
  check_nonempty(x, "x");
  const int64_t batch = m.size(0), tokens = m.size(1), dim = m.size(2), k = x.size(2);
  check_shape(x, {batch, tokens, k}, "x");
  check_shape(weight, {dim, k}, "weight");
  if (bias) check_shape(*bias, {dim}, "bias");
  check_shape(gate, {batch, dim}, "gate");
  gated_fusion_check_alpha(alpha);
}

// The contiguous bias, or nullopt.
inline std::optional<at::Tensor> gated_fusion_linear_bias(const std::optional<at::Tensor>& bias) {
  return bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
}

}  // namespace tmd
