// CPU kernels of gated_fusion_linear (the twin of gated_fusion_linear_cuda.cu): z = x·weightᵀ as an
// opmath GEMM on upcast operands (never rounded to the input dtype), then the gated_fusion
// elementwise pass adding the bias and the residual in opmath (z + bias + residual, one pass). The
// backward (gated_fusion_linear_common.h) runs its GEMMs in opmath too, grad_z included.
#include <torch/library.h>

#include "gated_fusion_linear/gated_fusion_linear_common.h"

namespace tmd {
namespace {

// x·weightᵀ over the flattened tokens: [B*T, D] in the opmath dtype, contiguous.
at::Tensor linear_opmath_cpu(const at::Tensor& x2d, const at::Tensor& weight) {
  const at::ScalarType acc = opmath_dtype(x2d.scalar_type());
  return at::mm(x2d.to(acc), weight.to(acc).t());
}

at::Tensor gated_fusion_linear_cpu(const at::Tensor& m_in, const at::Tensor& x_in, const at::Tensor& weight_in,
                                   const std::optional<at::Tensor>& bias_in, const at::Tensor& gate,
                                   const at::Tensor& alpha, const std::optional<at::Tensor>& residual_in) {
  gated_fusion_linear_check(m_in, x_in, weight_in, bias_in, gate, alpha, residual_in);
  const at::Tensor lam = gated_fusion_lambda(gate, alpha);
  const at::Tensor m = m_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = gated_fusion_linear_bias(bias_in);
  const std::optional<at::Tensor> residual = gated_fusion_linear_bias(residual_in);  // contiguous
  const int64_t batch = m.size(0), tokens = m.size(1), dim = m.size(2), k = x.size(2);
  const at::Tensor z = linear_opmath_cpu(x.view({batch * tokens, k}), weight).view({batch, tokens, dim});
  at::Tensor out = at::empty(m.sizes(), m.options());
  gated_fusion_elem_forward_cpu(m, z, bias, lam, out, residual);  // z + bias + residual in opmath, one pass
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_fusion_linear_backward_cpu(const at::Tensor& grad_out, const at::Tensor& m_in, const at::Tensor& x_in,
                                 const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
                                 const at::Tensor& gate, const at::Tensor& alpha,
                                 const std::optional<at::Tensor>& residual_in) {
  gated_fusion_linear_check(m_in, x_in, weight_in, bias_in, gate, alpha, residual_in);
  gated_fusion_check_grad_out(grad_out, m_in);
  const at::Tensor lam = gated_fusion_lambda(gate, alpha);
  const at::Tensor g = grad_out.contiguous(), m = m_in.contiguous(), x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = gated_fusion_linear_bias(bias_in);
  const std::optional<at::Tensor> residual = gated_fusion_linear_bias(residual_in);
  const int64_t batch = m.size(0), tokens = m.size(1), dim = m.size(2), k = x.size(2);
  const at::ScalarType dtype = m.scalar_type(), acc = opmath_dtype(dtype);

  at::Tensor grad_m = at::empty(m.sizes(), m.options());
  at::Tensor grad_z = at::empty(m.sizes(), m.options().dtype(acc));
  const at::Tensor partial = gated_fusion_elem_backward_cpu(g, m, residual, bias, lam, grad_m, grad_z);
  const at::Tensor gt_x = at::bmm(g.to(acc).transpose(1, 2), x.to(acc));  // [B, D, K]
  auto [grad_weight, grad_gate, grad_alpha] =
      gated_fusion_linear_weight_gate_alpha_grads(gt_x, partial, weight, lam, gate, alpha);

  const at::Tensor gz2d = grad_z.view({batch * tokens, dim});
  at::Tensor grad_x = at::mm(gz2d, weight.to(acc)).to(dtype).view({batch, tokens, k});
  at::Tensor grad_bias = gz2d.sum(0).to(dtype);
  at::Tensor grad_residual = gated_fusion_linear_grad_residual(residual, grad_z, m);
  return {grad_m, grad_x, grad_weight, grad_bias, grad_gate, grad_alpha, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(tmd, CPU, m) {
  m.impl("gated_fusion_linear", &gated_fusion_linear_cpu);
  m.impl("gated_fusion_linear_backward", &gated_fusion_linear_backward_cpu);
}

}  // namespace tmd
