// Every schema of the `tmd` namespace, each with a one-line doc. Kernels register themselves
// (TORCH_LIBRARY_IMPL) in the files that implement them: <op>_cpu.cpp for CPU, <op>_cuda.cu for
// CUDA, so a CPU-only build still knows every op. Autograd and fake (meta) kernels are registered
// from Python in tmd_ext/ops/<op>.py. Backward ops are ops of their own.
#include <torch/library.h>

TORCH_LIBRARY(tmd, m) {
  // out = LayerNorm_noaffine(x)*(1+scale[:,None])+shift[:,None]; x [B,T,D], shift/scale [B,D].
  // Also returns the per-row mean and rstd [B,T] (opmath dtype) that the backward needs.
  m.def("adaln_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  // Gradients of adaln_modulate w.r.t. x, shift, scale.
  m.def("adaln_modulate_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor mean, Tensor rstd) -> (Tensor grad_x, Tensor grad_shift, Tensor grad_scale)");

  // out = m + lam*(z-m), lam = sigmoid(alpha)*gate[:,None,:]; m, z [B,T,D], gate [B,D], alpha 0-d.
  m.def("gated_fusion(Tensor m, Tensor z, Tensor gate, Tensor alpha) -> Tensor");
  // Gradients of gated_fusion w.r.t. m, z, gate, alpha.
  m.def("gated_fusion_backward(Tensor grad_out, Tensor m, Tensor z, Tensor gate, Tensor alpha) -> (Tensor grad_m, Tensor grad_z, Tensor grad_gate, Tensor grad_alpha)");

  // gated_fusion(m, x @ weight.T + bias + residual, gate, alpha); x [B,T,K], weight [D,K], bias [D]
  // or None, residual [B,T,D] or None. On sm_90a a CUTLASS TMA+WGMMA GEMM whose epilogue applies
  // the fusion (z never hits memory).
  m.def("gated_fusion_linear(Tensor m, Tensor x, Tensor weight, Tensor? bias, Tensor gate, Tensor alpha, Tensor? residual=None) -> Tensor");
  // Gradients of gated_fusion_linear w.r.t. m, x, weight, bias (zeros-shaped [D] sum even when
  // bias is None; the Python side drops it), gate, alpha, residual (a 0-element tensor when residual
  // is None). Needs no z: sum_t g*z comes from g_bᵀ·x_b.
  m.def("gated_fusion_linear_backward(Tensor grad_out, Tensor m, Tensor x, Tensor weight, Tensor? bias, Tensor gate, Tensor alpha, Tensor? residual=None) -> (Tensor grad_m, Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_gate, Tensor grad_alpha, Tensor grad_residual)");

  // One inner-flow step: y - (s-r)[:,None..]*(y1 - head_out); y, head_out, y1 [B,...], s, r [B].
  m.def("flow_step(Tensor y, Tensor head_out, Tensor y1, Tensor s, Tensor r) -> Tensor");
  // Gradients of flow_step w.r.t. head_out and y1 (that w.r.t. y is grad_out itself).
  m.def("flow_step_backward(Tensor grad_out, Tensor s, Tensor r) -> (Tensor grad_head_out, Tensor grad_y1)");

  // TM-MeanFlow loss, per sample: delta = u - (v - (s-r)*(u_plus-u_minus)/(s_plus-s_minus)) (delta = u - v
  // where s == r), loss = |delta|^2/sg(|delta|^2+c), mse = |delta|^2/d; u.. [B,...], s.. [B]; outputs [B] fp32/fp64.
  m.def("meanflow_fd_loss(Tensor u, Tensor u_plus, Tensor u_minus, Tensor v, Tensor s, Tensor r, Tensor s_plus, Tensor s_minus, float c) -> (Tensor loss, Tensor mse)");
  // Gradient of meanflow_fd_loss w.r.t. u (the only input with one); recomputes delta, |delta|^2 = mse*d.
  m.def("meanflow_fd_loss_backward(Tensor grad_loss, Tensor grad_mse, Tensor u, Tensor u_plus, Tensor u_minus, Tensor v, Tensor s, Tensor r, Tensor s_plus, Tensor s_minus, Tensor mse, float c) -> Tensor grad_u");
  // meanflow_fd_loss that also returns delta [B,...] in the opmath dtype (fp32/fp64), for a backward that
  // reads delta once instead of the four inputs (used when u is fp32 or fp64, where saving delta is exact).
  m.def("meanflow_fd_loss_delta(Tensor u, Tensor u_plus, Tensor u_minus, Tensor v, Tensor s, Tensor r, Tensor s_plus, Tensor s_minus, float c) -> (Tensor loss, Tensor mse, Tensor delta)");
  // Gradient w.r.t. u from the saved delta: grad_u = (2*grad_loss/(mse*d+c) + 2*grad_mse/d)[b] * delta, dtype of delta.
  m.def("meanflow_fd_loss_delta_backward(Tensor grad_loss, Tensor grad_mse, Tensor delta, Tensor mse, float c) -> Tensor grad_u");
  // The same, written over delta (contiguous): the autograd backward's choice when delta is not needed again
  // (no retain_graph, no create_graph), as a compiled graph reuses its saved buffer: no u-sized allocation,
  // and each line is read and written back while in cache.
  m.def("meanflow_fd_loss_delta_backward_(Tensor grad_loss, Tensor grad_mse, Tensor(a!) delta, Tensor mse, float c) -> ()");
}
