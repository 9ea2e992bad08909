// Argument checks and the backward's small tensor math of gated_fusion_linear, shared by the CPU
// and CUDA entry points. The fusion itself (lam, the elementwise launchers, the gate/alpha
// gradients) comes from gated_fusion_common.h.
//
// The backward does not recompute z. With g = grad_out and G_b = g_bᵀ·x_b ([B,D,K], opmath; one
// GEMM of the FLOPs of grad_weight's):
//   grad_weight[d,k] = sum_b lam[b,d]*G_b[d,k]                 (grad_z = g*lam)
//   sum_t g*(z - m)  = sum_k weight[d,k]*G_b[d,k] + sum_t g*(bias - m)
// where the last sum comes from the elementwise pass run without z. So the backward is one
// elementwise pass and two GEMMs (G and grad_x = grad_z·weight), as for an unfused linear.
// With a residual e (z = x·weightᵀ + bias + e) the elementwise pass takes e in place of z (its
// partial sums become those of g*(e + bias - m)) and grad_e = grad_z.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "core/checks.h"
#include "gated_fusion/gated_fusion_common.h"

namespace tmd {

// m [B,T,D]; x [B,T,K]; weight [D,K]; bias [D] or None; gate [B,D]; alpha 0-d; residual [B,T,D]
// or None; one float dtype, one device; B, T, D, K > 0.
inline void gated_fusion_linear_check(const at::Tensor& m, const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& gate,
                                      const at::Tensor& alpha,
                                      const std::optional<at::Tensor>& residual = std::nullopt) {
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
  if (residual) {
    check_float(*residual, "residual");
    check_same_dtype(*residual, "residual", m, "m");
    check_same_device(*residual, "residual", m, "m");
    check_shape(*residual, m.sizes(), "residual");
  }
}

// From G [B,D,K] and the elementwise pass's partial sums [n_chunks,B,D] of g*(bias - m) (both
// opmath): grad_weight (dtype of weight), grad_gate, grad_alpha.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_fusion_linear_weight_gate_alpha_grads(
    const at::Tensor& gt_x, const at::Tensor& partial, const at::Tensor& weight, const at::Tensor& lam,
    const at::Tensor& gate, const at::Tensor& alpha) {
  const at::ScalarType acc = gt_x.scalar_type();
  at::Tensor grad_weight = (lam.unsqueeze(-1) * gt_x).sum(0).to(weight.scalar_type());
  const at::Tensor p = partial.sum(0) + (gt_x * weight.to(acc)).sum(-1);
  auto [grad_gate, grad_alpha] = gated_fusion_gate_alpha_grads(p, gate, alpha);
  return {grad_weight, grad_gate, grad_alpha};
}

// The contiguous bias (or residual), or nullopt.
inline std::optional<at::Tensor> gated_fusion_linear_bias(const std::optional<at::Tensor>& bias) {
  return bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
}

// grad_residual: grad_z in the dtype of m when there is a residual, else a 0-element tensor.
inline at::Tensor gated_fusion_linear_grad_residual(const std::optional<at::Tensor>& residual,
                                                    const at::Tensor& grad_z, const at::Tensor& m) {
  return residual ? grad_z.to(m.scalar_type()) : at::empty({0}, m.options());
}

}  // namespace tmd
