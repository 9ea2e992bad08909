// CUDA kernels of gated_fusion (the twin of gated_fusion_cpu.cpp; same per-element math), and the
// elementwise launchers that gated_fusion_linear_cuda.cu reuses.
// Memory-bound: 16-byte vector loads/stores (of the input dtype; z and lam in fp32 take two) when
// D is a multiple of the vector width and every pointer is aligned, scalar otherwise.
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <initializer_list>
#include <utility>

#include "core/cuda_utils.cuh"
#include "gated_fusion/gated_fusion.h"
#include "gated_fusion/gated_fusion_common.h"

namespace tmd {

namespace {

constexpr int kThreads = 256;

// The VEC values z[v*VEC ...] (0 when z is null) + bias[d0 ...] (when not null) in acc_t.
template <typename scalar_t, typename z_t, typename acc_t, int VEC>
__device__ __forceinline__ void load_z(const z_t* z, const scalar_t* bias, int64_t v, int64_t d0, acc_t (&out)[VEC]) {
  if (z != nullptr) {
    const AlignedVec<z_t, VEC> zv = reinterpret_cast<const AlignedVec<z_t, VEC>*>(z)[v];
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = static_cast<acc_t>(zv.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = acc_t(0);
  }
  if (bias != nullptr) {
    const AlignedVec<scalar_t, VEC> bv = *reinterpret_cast<const AlignedVec<scalar_t, VEC>*>(bias + d0);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] += static_cast<acc_t>(bv.v[k]);
  }
}

// Grid-stride over the vectors of [B*T, D]; VEC divides D, so a vector never straddles two rows.
template <typename scalar_t, typename z_t, typename acc_t, int VEC>
__global__ void gated_fusion_kernel(GatedFusionParams<scalar_t, z_t, acc_t> p) {
  using VS = AlignedVec<scalar_t, VEC>;
  using VA = AlignedVec<acc_t, VEC>;
  const int64_t per_row = p.dim / VEC;
  const int64_t n_vec = p.batch * p.tokens * per_row;
  for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < n_vec; v += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = v / per_row;
    const int64_t d0 = (v - row * per_row) * VEC;
    const int64_t b = row / p.tokens;
    const VS m = reinterpret_cast<const VS*>(p.m)[v];
    const VA lam = *reinterpret_cast<const VA*>(p.lam + b * p.dim + d0);
    acc_t z[VEC];
    load_z<scalar_t, z_t, acc_t, VEC>(p.z, p.bias, v, d0, z);
    if (p.residual != nullptr) {  // gated_fusion_linear: z + bias + residual
      const VS e = reinterpret_cast<const VS*>(p.residual)[v];
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] += static_cast<acc_t>(e.v[k]);
    }
    VS o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      o.v[k] = static_cast<scalar_t>(gated_fusion_elem<acc_t>(static_cast<acc_t>(m.v[k]), z[k], lam.v[k]));
    }
    reinterpret_cast<VS*>(p.out)[v] = o;
  }
}

// Block blockIdx.x = (c*B + b)*col_blocks + col_block; each thread owns VEC columns d0.. of sample
// b and walks the tokens of chunk c, writing grad_m, grad_z and its own slice of partial[c,b,:]
// (no two threads write the same partial, so no atomics, and the sum order is fixed).
template <typename scalar_t, typename z_t, typename acc_t, typename gz_t, int VEC>
__global__ void gated_fusion_backward_kernel(GatedFusionBackwardParams<scalar_t, z_t, acc_t, gz_t> p) {
  using VS = AlignedVec<scalar_t, VEC>;
  using VG = AlignedVec<gz_t, VEC>;
  using VA = AlignedVec<acc_t, VEC>;
  const int64_t groups = p.dim / VEC;
  const int64_t col_blocks = (groups + blockDim.x - 1) / blockDim.x;
  const int64_t row_block = blockIdx.x / col_blocks;
  const int64_t group = (blockIdx.x - row_block * col_blocks) * blockDim.x + threadIdx.x;
  if (group >= groups) return;
  const int64_t b = row_block % p.batch, c = row_block / p.batch;
  const int64_t d0 = group * VEC;
  const VA lam = *reinterpret_cast<const VA*>(p.lam + b * p.dim + d0);
  acc_t part[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) part[k] = acc_t(0);
  const int64_t t0 = c * p.chunk_tokens;
  const int64_t t1 = t0 + p.chunk_tokens < p.tokens ? t0 + p.chunk_tokens : p.tokens;
#pragma unroll 4
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t v = ((b * p.tokens + t) * p.dim + d0) / VEC;
    const VS g = reinterpret_cast<const VS*>(p.grad_out)[v];
    const VS m = reinterpret_cast<const VS*>(p.m)[v];
    acc_t z[VEC];
    load_z<scalar_t, z_t, acc_t, VEC>(p.z, p.bias, v, d0, z);
    VS gm;
    VG gz;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const GatedFusionElemGrads<acc_t> e = gated_fusion_elem_backward<acc_t>(
          static_cast<acc_t>(g.v[k]), static_cast<acc_t>(m.v[k]), z[k], lam.v[k]);
      gm.v[k] = static_cast<scalar_t>(e.grad_m);
      gz.v[k] = static_cast<gz_t>(e.grad_z);
      part[k] += e.p;
    }
    reinterpret_cast<VS*>(p.grad_m)[v] = gm;
    reinterpret_cast<VG*>(p.grad_z)[v] = gz;
  }
  VA out;
#pragma unroll
  for (int k = 0; k < VEC; ++k) out.v[k] = part[k];
  *reinterpret_cast<VA*>(p.partial + (c * p.batch + b) * p.dim + d0) = out;
}

// Every pointer aligned to one vector of its own type, and D a multiple of VEC.
bool vectorizable(int64_t dim, int vec, std::initializer_list<std::pair<const void*, int>> ptrs) {
  if (dim % vec != 0) return false;
  for (const auto& [q, elem_bytes] : ptrs) {
    if (q != nullptr && !is_aligned(q, elem_bytes * vec)) return false;
  }
  return true;
}

at::Tensor gated_fusion_cuda(const at::Tensor& m, const at::Tensor& z, const at::Tensor& gate,
                             const at::Tensor& alpha) {
  gated_fusion_check(m, z, gate, alpha);
  const c10::cuda::CUDAGuard guard(m.device());
  const at::Tensor lam = gated_fusion_lambda(gate, alpha);
  const at::Tensor mc = m.contiguous(), zc = z.contiguous();
  at::Tensor out = at::empty(mc.sizes(), mc.options());
  gated_fusion_elem_forward_cuda(mc, zc, std::nullopt, lam, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_fusion_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& m, const at::Tensor& z, const at::Tensor& gate,
    const at::Tensor& alpha) {
  gated_fusion_check(m, z, gate, alpha);
  gated_fusion_check_grad_out(grad_out, m);
  const c10::cuda::CUDAGuard guard(m.device());
  const at::Tensor lam = gated_fusion_lambda(gate, alpha);
  const at::Tensor gc = grad_out.contiguous(), mc = m.contiguous(), zc = z.contiguous();
  at::Tensor grad_m = at::empty(mc.sizes(), mc.options());
  at::Tensor grad_z = at::empty(mc.sizes(), mc.options());
  const at::Tensor partial = gated_fusion_elem_backward_cuda(gc, mc, zc, std::nullopt, lam, grad_m, grad_z);
  auto [grad_gate, grad_alpha] = gated_fusion_gate_alpha_grads(partial.sum(0), gate, alpha);
  return {grad_m, grad_z, grad_gate, grad_alpha};
}

}  // namespace

void gated_fusion_elem_forward_cuda(const at::Tensor& m, const at::Tensor& z,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& lam,
                                    at::Tensor& out, const std::optional<at::Tensor>& residual) {
  const int64_t batch = m.size(0), tokens = m.size(1), dim = m.size(2);
  const int64_t n = m.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  TMD_DISPATCH_FLOATING(m.scalar_type(), "gated_fusion_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gated_fusion_dispatch_opmath<scalar_t>(z.scalar_type() != m.scalar_type(), [&](auto z_tag) {
      using z_t = decltype(z_tag);
      const GatedFusionParams<scalar_t, z_t, acc_t> p{
          m.data_ptr<scalar_t>(), z.data_ptr<z_t>(), bias ? bias->data_ptr<scalar_t>() : nullptr,
          lam.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), batch, tokens, dim,
          residual ? residual->data_ptr<scalar_t>() : nullptr};
      constexpr int VEC = vec_width<scalar_t>();
      if (vectorizable(dim, VEC, {{p.m, (int)sizeof(scalar_t)}, {p.z, (int)sizeof(z_t)},
                                  {p.bias, (int)sizeof(scalar_t)}, {p.lam, (int)sizeof(acc_t)},
                                  {p.out, (int)sizeof(scalar_t)}, {p.residual, (int)sizeof(scalar_t)}})) {
        gated_fusion_kernel<scalar_t, z_t, acc_t, VEC><<<grid_for(n / VEC, kThreads), kThreads, 0, stream>>>(p);
      } else {
        gated_fusion_kernel<scalar_t, z_t, acc_t, 1><<<grid_for(n, kThreads), kThreads, 0, stream>>>(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor gated_fusion_elem_backward_cuda(const at::Tensor& grad_out, const at::Tensor& m,
                                           const std::optional<at::Tensor>& z,
                                           const std::optional<at::Tensor>& bias,
                                           const at::Tensor& lam, at::Tensor& grad_m, at::Tensor& grad_z) {
  const int64_t batch = m.size(0), tokens = m.size(1), dim = m.size(2);
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  TMD_DISPATCH_FLOATING(m.scalar_type(), "gated_fusion_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gated_fusion_dispatch_opmath<scalar_t>(z && z->scalar_type() != m.scalar_type(), [&](auto z_tag) {
      using z_t = decltype(z_tag);
      gated_fusion_dispatch_opmath<scalar_t>(grad_z.scalar_type() != m.scalar_type(), [&](auto gz_tag) {
        using gz_t = decltype(gz_tag);
        constexpr int VEC = vec_width<scalar_t>();
        const bool vec = vectorizable(
            dim, VEC, {{grad_out.data_ptr(), (int)sizeof(scalar_t)}, {m.data_ptr(), (int)sizeof(scalar_t)},
                       {z ? z->data_ptr() : nullptr, (int)sizeof(z_t)},
                       {bias ? bias->data_ptr() : nullptr, (int)sizeof(scalar_t)},
                       {lam.data_ptr(), (int)sizeof(acc_t)}, {grad_m.data_ptr(), (int)sizeof(scalar_t)},
                       {grad_z.data_ptr(), (int)sizeof(gz_t)}});
        const int vec_used = vec ? VEC : 1;
        // Launch shape: one thread per column group, enough token chunks for one full wave of the
        // blocks the device holds at once (the occupancy calculator's count for this kernel, so
        // its register use bounds it too; fewer when B*D alone fills the device); partial
        // [n_chunks,B,D] is 16-byte aligned for every row since D is a multiple of VEC on the
        // vector path.
        const int64_t groups = dim / vec_used;
        const int threads = static_cast<int>(std::min<int64_t>(kThreads, (groups + 31) / 32 * 32));
        const int64_t col_blocks = (groups + threads - 1) / threads;
        const int64_t resident =
            vec ? resident_blocks_of(gated_fusion_backward_kernel<scalar_t, z_t, acc_t, gz_t, VEC>, threads)
                : resident_blocks_of(gated_fusion_backward_kernel<scalar_t, z_t, acc_t, gz_t, 1>, threads);
        const int64_t want_chunks = std::clamp<int64_t>(
            (resident + col_blocks * batch - 1) / (col_blocks * batch), 1, tokens);
        const int64_t chunk = (tokens + want_chunks - 1) / want_chunks;
        const int64_t n_chunks = (tokens + chunk - 1) / chunk;
        const int64_t blocks = n_chunks * batch * col_blocks;
        TORCH_CHECK(blocks <= INT_MAX, "gated_fusion backward: B*D too large (", blocks, " blocks)");
        partial = at::empty({n_chunks, batch, dim}, lam.options());
        const GatedFusionBackwardParams<scalar_t, z_t, acc_t, gz_t> p{
            grad_out.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), z ? z->data_ptr<z_t>() : nullptr,
            bias ? bias->data_ptr<scalar_t>() : nullptr, lam.data_ptr<acc_t>(),
            grad_m.data_ptr<scalar_t>(), grad_z.data_ptr<gz_t>(), partial.data_ptr<acc_t>(),
            batch, tokens, dim, chunk, n_chunks};
        if (vec) {
          gated_fusion_backward_kernel<scalar_t, z_t, acc_t, gz_t, VEC>
              <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
        } else {
          gated_fusion_backward_kernel<scalar_t, z_t, acc_t, gz_t, 1>
              <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(p);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return partial;
}

TORCH_LIBRARY_IMPL(tmd, CUDA, m) {
  m.impl("gated_fusion", &gated_fusion_cuda);
  m.impl("gated_fusion_backward", &gated_fusion_backward_cuda);
}

}  // namespace tmd
