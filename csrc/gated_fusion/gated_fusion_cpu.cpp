// CPU kernels of gated_fusion (the twin of gated_fusion_cuda.cu; same per-element math), and the
// elementwise launchers that gated_fusion_linear_cpu.cpp reuses. The loops are in
// gated_fusion_cpu_kernels.h, built three times (baseline, AVX2 and AVX-512, core/cpu_vec.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "core/cpu_vec.h"

#include "gated_fusion/gated_fusion.h"
#include "gated_fusion/gated_fusion_common.h"

namespace tmd {

namespace {

namespace cpu_baseline {
#include "gated_fusion/gated_fusion_cpu_kernels.h"
}  // namespace cpu_baseline
#if TMD_CPU_AVX2_BUILD
TMD_CPU_AVX2_BEGIN
namespace cpu_avx2 {
#include "gated_fusion/gated_fusion_cpu_kernels.h"
}  // namespace cpu_avx2
TMD_CPU_AVX2_END
TMD_CPU_AVX512_BEGIN
namespace cpu_avx512 {
#include "gated_fusion/gated_fusion_cpu_kernels.h"
}  // namespace cpu_avx512
TMD_CPU_AVX512_END
#endif

at::Tensor gated_fusion_cpu(const at::Tensor& m, const at::Tensor& z, const at::Tensor& gate,
                            const at::Tensor& alpha) {
  gated_fusion_check(m, z, gate, alpha);
  const at::Tensor lam = gated_fusion_lambda(gate, alpha);
  const at::Tensor mc = m.contiguous(), zc = z.contiguous();
  at::Tensor out = at::empty(mc.sizes(), mc.options());
  gated_fusion_elem_forward_cpu(mc, zc, std::nullopt, lam, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_fusion_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& m, const at::Tensor& z, const at::Tensor& gate,
    const at::Tensor& alpha) {
  gated_fusion_check(m, z, gate, alpha);
  gated_fusion_check_grad_out(grad_out, m);
  const at::Tensor lam = gated_fusion_lambda(gate, alpha);
  const at::Tensor gc = grad_out.contiguous(), mc = m.contiguous(), zc = z.contiguous();
  at::Tensor grad_m = at::empty(mc.sizes(), mc.options());
  at::Tensor grad_z = at::empty(mc.sizes(), mc.options());
  const at::Tensor partial = gated_fusion_elem_backward_cpu(gc, mc, zc, std::nullopt, lam, grad_m, grad_z);
  auto [grad_gate, grad_alpha] = gated_fusion_gate_alpha_grads(partial.sum(0), gate, alpha);
  return {grad_m, grad_z, grad_gate, grad_alpha};
}

}  // namespace

void gated_fusion_elem_forward_cpu(const at::Tensor& m, const at::Tensor& z,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& lam,
                                   at::Tensor& out, const std::optional<at::Tensor>& residual) {
  const int64_t batch = m.size(0), tokens = m.size(1), dim = m.size(2);
  TMD_DISPATCH_FLOATING(m.scalar_type(), "gated_fusion_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gated_fusion_dispatch_opmath<scalar_t>(z.scalar_type() != m.scalar_type(), [&](auto z_tag) {
      using z_t = decltype(z_tag);
      const GatedFusionParams<scalar_t, z_t, acc_t> p{
          m.data_ptr<scalar_t>(), z.data_ptr<z_t>(), bias ? bias->data_ptr<scalar_t>() : nullptr,
          lam.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), batch, tokens, dim,
          residual ? residual->data_ptr<scalar_t>() : nullptr};
      TMD_CPU_CALL(forward_kernel, p);
    });
  });
}

at::Tensor gated_fusion_elem_backward_cpu(const at::Tensor& grad_out, const at::Tensor& m,
                                          const std::optional<at::Tensor>& z,
                                          const std::optional<at::Tensor>& bias,
                                          const at::Tensor& lam, at::Tensor& grad_m, at::Tensor& grad_z) {
  const int64_t batch = m.size(0), tokens = m.size(1), dim = m.size(2);
  const int64_t chunk = gated_fusion_cpu_chunk_tokens(tokens);
  const int64_t n_chunks = (tokens + chunk - 1) / chunk;
  at::Tensor partial = at::empty({n_chunks, batch, dim}, lam.options());
  TMD_DISPATCH_FLOATING(m.scalar_type(), "gated_fusion_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gated_fusion_dispatch_opmath<scalar_t>(z && z->scalar_type() != m.scalar_type(), [&](auto z_tag) {
      using z_t = decltype(z_tag);
      gated_fusion_dispatch_opmath<scalar_t>(grad_z.scalar_type() != m.scalar_type(), [&](auto gz_tag) {
        using gz_t = decltype(gz_tag);
        const GatedFusionBackwardParams<scalar_t, z_t, acc_t, gz_t> p{
            grad_out.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), z ? z->data_ptr<z_t>() : nullptr,
            bias ? bias->data_ptr<scalar_t>() : nullptr, lam.data_ptr<acc_t>(),
            grad_m.data_ptr<scalar_t>(), grad_z.data_ptr<gz_t>(), partial.data_ptr<acc_t>(),
            batch, tokens, dim, chunk, n_chunks};
        TMD_CPU_CALL(backward_kernel, p);
      });
    });
  });
  return partial;
}

TORCH_LIBRARY_IMPL(tmd, CPU, m) {
  m.impl("gated_fusion", &gated_fusion_cpu);
  m.impl("gated_fusion_backward", &gated_fusion_backward_cpu);
}

}  // namespace tmd
