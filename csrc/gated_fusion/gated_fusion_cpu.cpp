// CPU kernels of gated_fusion (the twin of gated_fusion_cuda.cu; same per-element math), and the
// elementwise launchers that gated_fusion_linear_cpu.cpp reuses.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gated_fusion/gated_fusion.h"
#include "gated_fusion/gated_fusion_common.h"

namespace tmd {

namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per parallel task, at least

template <typename scalar_t, typename z_t, typename acc_t>
void forward_kernel(const GatedFusionParams<scalar_t, z_t, acc_t>& p) {
  const int64_t rows = p.batch * p.tokens, dim = p.dim;
  const int64_t grain_rows = std::max<int64_t>(1, kGrain / dim);
  at::parallel_for(0, rows, grain_rows, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      // Row pointers marked __restrict__ so the compiler vectorises the loop.
      const acc_t* __restrict__ lam = p.lam + (row / p.tokens) * dim;
      const scalar_t* __restrict__ m = p.m + row * dim;
      const z_t* __restrict__ z = p.z + row * dim;
      const scalar_t* __restrict__ bias = p.bias;
      scalar_t* __restrict__ out = p.out + row * dim;
      for (int64_t d = 0; d < dim; ++d) {
        const acc_t zb = static_cast<acc_t>(z[d]) + (bias ? static_cast<acc_t>(bias[d]) : acc_t(0));
        out[d] = static_cast<scalar_t>(gated_fusion_elem<acc_t>(static_cast<acc_t>(m[d]), zb, lam[d]));
      }
    }
  });
}

// One task per (chunk, sample): it owns the row partial[c,b,:], so no two tasks write the same
// memory and the sum order is fixed by the chunking alone.
template <typename scalar_t, typename z_t, typename acc_t, typename gz_t>
void backward_kernel(const GatedFusionBackwardParams<scalar_t, z_t, acc_t, gz_t>& p) {
  const int64_t dim = p.dim;
  at::parallel_for(0, p.n_chunks * p.batch, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i / p.batch, b = i % p.batch;
      const acc_t* __restrict__ lam = p.lam + b * dim;
      const scalar_t* __restrict__ bias = p.bias;
      acc_t* __restrict__ part = p.partial + i * dim;  // [c, b, :]
      std::fill(part, part + dim, acc_t(0));
      const int64_t t0 = c * p.chunk_tokens, t1 = std::min(p.tokens, t0 + p.chunk_tokens);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t base = (b * p.tokens + t) * dim;
        const scalar_t* __restrict__ g = p.grad_out + base;
        const scalar_t* __restrict__ m = p.m + base;
        const z_t* __restrict__ z = p.z ? p.z + base : nullptr;
        scalar_t* __restrict__ grad_m = p.grad_m + base;
        gz_t* __restrict__ grad_z = p.grad_z + base;
        for (int64_t d = 0; d < dim; ++d) {
          const acc_t zb =
              (z ? static_cast<acc_t>(z[d]) : acc_t(0)) + (bias ? static_cast<acc_t>(bias[d]) : acc_t(0));
          const GatedFusionElemGrads<acc_t> e = gated_fusion_elem_backward<acc_t>(
              static_cast<acc_t>(g[d]), static_cast<acc_t>(m[d]), zb, lam[d]);
          grad_m[d] = static_cast<scalar_t>(e.grad_m);
          grad_z[d] = static_cast<gz_t>(e.grad_z);
          part[d] += e.p;
        }
      }
    }
  });
}

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
                                   at::Tensor& out) {
  const int64_t batch = m.size(0), tokens = m.size(1), dim = m.size(2);
  TMD_DISPATCH_FLOATING(m.scalar_type(), "gated_fusion_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gated_fusion_dispatch_opmath<scalar_t>(z.scalar_type() != m.scalar_type(), [&](auto z_tag) {
      using z_t = decltype(z_tag);
      const GatedFusionParams<scalar_t, z_t, acc_t> p{
          m.data_ptr<scalar_t>(), z.data_ptr<z_t>(), bias ? bias->data_ptr<scalar_t>() : nullptr,
          lam.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), batch, tokens, dim};
      forward_kernel(p);
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
        backward_kernel(p);
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
