// The loops of the gated_fusion CPU kernels. No include guard and no includes: gated_fusion_cpu.cpp
// includes this file three times, in namespaces cpu_baseline, cpu_avx2 and cpu_avx512
// (core/cpu_vec.h), after the headers it needs. Each inner loop is a plain contiguous loop over d
// (compile-time switches for the optional operands), which the compiler vectorises; rows are
// spread over threads with
// at::parallel_for, and a grain keeps small shapes on one thread.

constexpr int64_t kGrain = 1 << 14;  // elements per parallel task, at least

template <bool kBias, bool kResidual, typename scalar_t, typename z_t, typename acc_t>
void forward_rows(const GatedFusionParams<scalar_t, z_t, acc_t>& p, int64_t r0, int64_t r1) {
  const int64_t dim = p.dim;
  for (int64_t row = r0; row < r1; ++row) {
    const acc_t* __restrict__ lam = p.lam + (row / p.tokens) * dim;
    const scalar_t* __restrict__ m = p.m + row * dim;
    const z_t* __restrict__ z = p.z + row * dim;
    const scalar_t* __restrict__ bias = p.bias;
    const scalar_t* __restrict__ residual = kResidual ? p.residual + row * dim : nullptr;
    scalar_t* __restrict__ out = p.out + row * dim;
    for (int64_t d = 0; d < dim; ++d) {
      acc_t zb = cpu::load(z[d]);
      if constexpr (kBias) zb += cpu::load(bias[d]);
      if constexpr (kResidual) zb += cpu::load(residual[d]);
      out[d] = cpu::store<scalar_t>(gated_fusion_elem<acc_t>(cpu::load(m[d]), zb, lam[d]));
    }
  }
}

template <typename scalar_t, typename z_t, typename acc_t>
void forward_kernel(const GatedFusionParams<scalar_t, z_t, acc_t>& p) {
  const int64_t rows = p.batch * p.tokens;
  const int64_t grain_rows = std::max<int64_t>(1, kGrain / p.dim);
  at::parallel_for(0, rows, grain_rows, [&](int64_t r0, int64_t r1) {
    if (p.bias) {
      p.residual ? forward_rows<true, true>(p, r0, r1) : forward_rows<true, false>(p, r0, r1);
    } else {
      p.residual ? forward_rows<false, true>(p, r0, r1) : forward_rows<false, false>(p, r0, r1);
    }
  });
}

// One row of the backward. The pointers are parameters marked __restrict__ (GCC honours restrict on
// parameters, not always on block-scope pointers): with all of them float (fp32), the loop written
// inline in backward_task needed more run-time alias checks than GCC allows and stayed scalar
// (1.6 ms instead of 0.5 ms at 1x1024x1536).
template <bool kZ, bool kBias, typename scalar_t, typename z_t, typename acc_t, typename gz_t>
void backward_row(int64_t dim, const scalar_t* __restrict__ g, const scalar_t* __restrict__ m,
                  const z_t* __restrict__ z, const scalar_t* __restrict__ bias, const acc_t* __restrict__ lam,
                  scalar_t* __restrict__ grad_m, gz_t* __restrict__ grad_z, acc_t* __restrict__ part) {
  for (int64_t d = 0; d < dim; ++d) {
    const acc_t zb = (kZ ? cpu::load(z[d]) : acc_t(0)) + (kBias ? cpu::load(bias[d]) : acc_t(0));
    const GatedFusionElemGrads<acc_t> e = gated_fusion_elem_backward<acc_t>(cpu::load(g[d]), cpu::load(m[d]), zb, lam[d]);
    grad_m[d] = cpu::store<scalar_t>(e.grad_m);
    grad_z[d] = cpu::store<gz_t>(e.grad_z);
    part[d] += e.p;
  }
}

// Task i = (chunk c, sample b) owns the row partial[c,b,:], so no two tasks write the same memory
// and the sum order (over the chunk's tokens, in order) is fixed by the chunking alone.
template <bool kZ, bool kBias, typename scalar_t, typename z_t, typename acc_t, typename gz_t>
void backward_task(const GatedFusionBackwardParams<scalar_t, z_t, acc_t, gz_t>& p, int64_t i) {
  const int64_t dim = p.dim;
  const int64_t c = i / p.batch, b = i % p.batch;
  acc_t* part = p.partial + i * dim;  // [c, b, :]
  std::fill(part, part + dim, acc_t(0));
  const int64_t t0 = c * p.chunk_tokens, t1 = std::min(p.tokens, t0 + p.chunk_tokens);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t base = (b * p.tokens + t) * dim;
    backward_row<kZ, kBias>(dim, p.grad_out + base, p.m + base, kZ ? p.z + base : nullptr, p.bias,
                            p.lam + b * dim, p.grad_m + base, p.grad_z + base, part);
  }
}

template <typename scalar_t, typename z_t, typename acc_t, typename gz_t>
void backward_kernel(const GatedFusionBackwardParams<scalar_t, z_t, acc_t, gz_t>& p) {
  const int64_t tasks = p.n_chunks * p.batch;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, p.chunk_tokens * p.dim));
  at::parallel_for(0, tasks, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (p.z && p.bias) {
        backward_task<true, true>(p, i);
      } else if (p.z) {
        backward_task<true, false>(p, i);
      } else if (p.bias) {
        backward_task<false, true>(p, i);
      } else {
        backward_task<false, false>(p, i);
      }
    }
  });
}
