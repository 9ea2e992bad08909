// CUDA kernels of gated_fusion_linear (the twin of gated_fusion_linear_cpu.cpp). Generic path:
// z = x·weightᵀ by cuBLAS with an fp32 output for 16-bit inputs (never rounded to the input
// dtype), then the gated_fusion elementwise kernel adding the bias and the residual (when there is
// one) in the same pass. On sm_90a the CUTLASS GEMM with the fusion in its epilogue (gated_fusion_linear_sm90.h) replaces both when it supports the
// case. The backward (gated_fusion_linear_common.h) does not recompute z: one fused elementwise
// pass (grad_m, grad_z in the input dtype, partial sums of g*(bias - m)), then two cuBLAS GEMMs,
// G_b = g_bᵀ·x_b with an fp32 output and grad_x = grad_z·weight.
#include <torch/library.h>

#include "core/cuda_utils.cuh"
#include "gated_fusion_linear/gated_fusion_linear_common.h"
#include "gated_fusion_linear/gated_fusion_linear_sm90.h"

namespace tmd {
namespace {

// x·weightᵀ over the flattened tokens: [B*T, D] in the opmath dtype, contiguous. 16-bit inputs use
// the tensor-core GEMM with fp32 accumulation and fp32 output (aten::mm.dtype).
at::Tensor linear_opmath_cuda(const at::Tensor& x2d, const at::Tensor& weight) {
  const at::ScalarType acc = opmath_dtype(x2d.scalar_type());
  if (x2d.scalar_type() == acc) return at::mm(x2d, weight.t());
  return at::mm(x2d, weight.t(), acc);
}

// G_b = g_bᵀ·x_b: [B, D, K] in the opmath dtype (aten::bmm.dtype for 16-bit inputs).
at::Tensor gt_x_opmath_cuda(const at::Tensor& g, const at::Tensor& x) {
  const at::ScalarType acc = opmath_dtype(x.scalar_type());
  if (x.scalar_type() == acc) return at::bmm(g.transpose(1, 2), x);
  return at::bmm(g.transpose(1, 2), x, acc);
}

at::Tensor gated_fusion_linear_cuda(const at::Tensor& m_in, const at::Tensor& x_in, const at::Tensor& weight_in,
                                    const std::optional<at::Tensor>& bias_in, const at::Tensor& gate,
                                    const at::Tensor& alpha, const std::optional<at::Tensor>& residual_in) {
  gated_fusion_linear_check(m_in, x_in, weight_in, bias_in, gate, alpha, residual_in);
  const c10::cuda::CUDAGuard guard(m_in.device());
  const at::Tensor m = m_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = gated_fusion_linear_bias(bias_in);
  const std::optional<at::Tensor> residual = gated_fusion_linear_bias(residual_in);
  const at::Tensor lam = gated_fusion_lambda(gate, alpha);
  at::Tensor out = at::empty(m.sizes(), m.options());
  // sm_90a, bf16/fp16: the CUTLASS GEMM with the fusion in its epilogue (z never goes to memory).
  // It declines (returns false) for cases it does not support; then the generic path below runs.
  const bool low_precision = m.scalar_type() == at::kBFloat16 || m.scalar_type() == at::kHalf;
  if (low_precision && gated_fusion_linear_sm90(m, x, weight, bias, residual, lam, out)) return out;
  const int64_t batch = m.size(0), tokens = m.size(1), dim = m.size(2), k = x.size(2);
  const at::Tensor z = linear_opmath_cuda(x.view({batch * tokens, k}), weight).view({batch, tokens, dim});
  gated_fusion_elem_forward_cuda(m, z, bias, lam, out, residual);  // z + bias + residual in opmath, one pass
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_fusion_linear_backward_cuda(const at::Tensor& grad_out, const at::Tensor& m_in, const at::Tensor& x_in,
                                  const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
                                  const at::Tensor& gate, const at::Tensor& alpha,
                                  const std::optional<at::Tensor>& residual_in) {
  gated_fusion_linear_check(m_in, x_in, weight_in, bias_in, gate, alpha, residual_in);
  gated_fusion_check_grad_out(grad_out, m_in);
  const c10::cuda::CUDAGuard guard(m_in.device());
  const at::Tensor g = grad_out.contiguous(), m = m_in.contiguous(), x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = gated_fusion_linear_bias(bias_in);
  const std::optional<at::Tensor> residual = gated_fusion_linear_bias(residual_in);
  const at::Tensor lam = gated_fusion_lambda(gate, alpha);
  const int64_t batch = m.size(0), tokens = m.size(1), dim = m.size(2), k = x.size(2);
  const at::ScalarType acc = opmath_dtype(m.scalar_type());

  at::Tensor grad_m = at::empty(m.sizes(), m.options());
  at::Tensor grad_z = at::empty(m.sizes(), m.options());
  const at::Tensor partial = gated_fusion_elem_backward_cuda(g, m, residual, bias, lam, grad_m, grad_z);
  auto [grad_weight, grad_gate, grad_alpha] =
      gated_fusion_linear_weight_gate_alpha_grads(gt_x_opmath_cuda(g, x), partial, weight, lam, gate, alpha);

  const at::Tensor gz2d = grad_z.view({batch * tokens, dim});
  at::Tensor grad_x = at::mm(gz2d, weight).view({batch, tokens, k});
  at::Tensor grad_bias = at::sum(gz2d, {0}, false, acc).to(m.scalar_type());
  at::Tensor grad_residual = gated_fusion_linear_grad_residual(residual, grad_z, m);
  return {grad_m, grad_x, grad_weight, grad_bias, grad_gate, grad_alpha, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(tmd, CUDA, m) {
  m.impl("gated_fusion_linear", &gated_fusion_linear_cuda);
  m.impl("gated_fusion_linear_backward", &gated_fusion_linear_backward_cuda);
}

}  // namespace tmd
