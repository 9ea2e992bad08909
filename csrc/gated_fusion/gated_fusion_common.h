// Argument checks and the small [B,D] tensor math of gated_fusion, shared by the CPU and CUDA entry
// points (and by gated_fusion_linear): lam = sigmoid(alpha)*gate and the gate/alpha gradients from
// the per-chunk partial sums of g*(z - m).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "core/checks.h"
#include "core/dispatch.h"

namespace tmd {

// alpha: the learnt gate logit, a 0-d tensor (its dtype and device are checked by the callers).
inline void gated_fusion_check_alpha(const at::Tensor& alpha) {
  TORCH_CHECK(alpha.dim() == 0, "alpha must be a 0-d tensor, got shape ", alpha.sizes());
}

// m, z [B,T,D]; gate [B,D]; alpha 0-d; one float dtype, one device, non-empty.
inline void gated_fusion_check(const at::Tensor& m, const at::Tensor& z, const at::Tensor& gate,
                               const at::Tensor& alpha) {
  check_float(m, "m");
  check_float(z, "z");
  check_float(gate, "gate");
  check_float(alpha, "alpha");
  check_same_dtype(z, "z", m, "m");
  check_same_dtype(gate, "gate", m, "m");
  check_same_dtype(alpha, "alpha", m, "m");
  check_same_device(z, "z", m, "m");
  check_same_device(gate, "gate", m, "m");
  check_same_device(alpha, "alpha", m, "m");
  check_dim(m, 3, "m", "[B, T, D]");
  check_nonempty(m, "m");
  check_shape(z, m.sizes(), "z");
  check_shape(gate, {m.size(0), m.size(2)}, "gate");
  gated_fusion_check_alpha(alpha);
}

// grad_out [B,T,D] of the dtype and device of m (checked after the forward arguments).
inline void gated_fusion_check_grad_out(const at::Tensor& grad_out, const at::Tensor& m) {
  check_float(grad_out, "grad_out");
  check_same_dtype(grad_out, "grad_out", m, "m");
  check_same_device(grad_out, "grad_out", m, "m");
  check_shape(grad_out, m.sizes(), "grad_out");
}

// lam = sigmoid(alpha)*gate as a contiguous [B,D] tensor in the opmath dtype, computed on the
// device of gate (no host synchronisation).
inline at::Tensor gated_fusion_lambda(const at::Tensor& gate, const at::Tensor& alpha) {
  const at::ScalarType acc = opmath_dtype(gate.scalar_type());
  return (at::sigmoid(alpha.to(acc)) * gate.to(acc)).contiguous();
}

// Tokens per chunk of the backward's partial sums on the CPU: a function of T only, so the
// summation order (hence the result) does not depend on the thread count.
inline int64_t gated_fusion_cpu_chunk_tokens(int64_t tokens) {
  constexpr int64_t kMaxChunks = 64;
  return (tokens + kMaxChunks - 1) / kMaxChunks;
}

// From p[b,d] = sum over tokens of g*(z - m) (opmath [B,D]): grad_gate = sigmoid(alpha)*p (dtype
// of gate), grad_alpha = s(1-s)*sum(gate*p) (0-d, dtype of alpha).
inline std::tuple<at::Tensor, at::Tensor> gated_fusion_gate_alpha_grads(const at::Tensor& p,
                                                                       const at::Tensor& gate,
                                                                       const at::Tensor& alpha) {
  const at::ScalarType acc = p.scalar_type();
  const at::Tensor s = at::sigmoid(alpha.to(acc));
  at::Tensor grad_gate = (s * p).to(gate.scalar_type()).contiguous();
  at::Tensor grad_alpha = (s * (1 - s) * (gate.to(acc) * p).sum()).to(alpha.scalar_type());
  return {grad_gate, grad_alpha};
}

// Calls f(z_t{}) with z_t = at::opmath_type<scalar_t> when `opmath`, else z_t = scalar_t: the
// element type of z (gated_fusion: the input dtype; gated_fusion_linear: the unrounded GEMM
// output) and of grad_z.
template <typename scalar_t, typename F>
void gated_fusion_dispatch_opmath(bool opmath, F&& f) {
  if (opmath) {
    f(at::opmath_type<scalar_t>{});
  } else {
    f(scalar_t{});
  }
}

// Elementwise launchers shared by gated_fusion and gated_fusion_linear, defined in
// gated_fusion_cpu.cpp and gated_fusion_cuda.cu (the CUDA ones only in a CUDA build). All tensors
// contiguous, on one device:
// m, z, out, grad_out, grad_m, grad_z [B,T,D]; z and grad_z of the dtype of m or its opmath dtype;
// bias [D] of the dtype of m (added to z) or nullopt; lam [B,D] opmath (gated_fusion_lambda);
// residual [B,T,D] of the dtype of m, added to z + bias by the forward in the same pass, or nullopt.
// The backward writes grad_m = g*(1-lam) (dtype of m), grad_z = g*lam, and returns the opmath
// partial sums [n_chunks,B,D] of g*(z+bias-m) over token chunks (z nullopt: taken as 0), whose
// sum over chunks feeds gated_fusion_gate_alpha_grads.
void gated_fusion_elem_forward_cpu(const at::Tensor& m, const at::Tensor& z,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& lam,
                                   at::Tensor& out, const std::optional<at::Tensor>& residual = std::nullopt);
at::Tensor gated_fusion_elem_backward_cpu(const at::Tensor& grad_out, const at::Tensor& m,
                                          const std::optional<at::Tensor>& z,
                                          const std::optional<at::Tensor>& bias,
                                          const at::Tensor& lam, at::Tensor& grad_m, at::Tensor& grad_z);
void gated_fusion_elem_forward_cuda(const at::Tensor& m, const at::Tensor& z,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& lam,
                                    at::Tensor& out, const std::optional<at::Tensor>& residual = std::nullopt);
at::Tensor gated_fusion_elem_backward_cuda(const at::Tensor& grad_out, const at::Tensor& m,
                                           const std::optional<at::Tensor>& z,
                                           const std::optional<at::Tensor>& bias,
                                           const at::Tensor& lam, at::Tensor& grad_m, at::Tensor& grad_z);

}  // namespace tmd
