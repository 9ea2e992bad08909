// CPU kernels of adaln_modulate (the twin of adaln_modulate_cuda.cu; same per-element math).
// Forward: at::parallel_for over the rows of x viewed as [B*T, D], two-pass mean/variance in the
// opmath dtype. Backward: rows are grouped into chunks of a fixed size (a function of the shape
// only, never of the thread count); each chunk writes its own partial column sums for
// grad_shift/grad_scale, which are then added in chunk order, so results are deterministic.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "adaln_modulate/adaln_modulate.h"
#include "adaln_modulate/adaln_modulate_common.h"

namespace tmd {
namespace {

constexpr int64_t kGrainElems = 1 << 14;
constexpr int kLanes = 8;  // independent accumulators per row sum (vectorisable, shorter chains)

// Σ_d f(d) over d < n with kLanes interleaved partial sums added in a fixed order.
template <typename acc_t, typename F>
acc_t lane_sum(int64_t n, F f) {
  acc_t lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += f(d + k);
  }
  for (int k = 0; d < n; ++d, ++k) lanes[k] += f(d);
  acc_t s = 0;
  for (int k = 0; k < kLanes; ++k) s += lanes[k];
  return s;
}

// One row of the forward; `xf` [D] is scratch for the row in acc_t (converted once).
template <typename scalar_t, typename acc_t>
void forward_row(const AdalnModulateParams<scalar_t, acc_t>& p, int64_t row, acc_t* xf) {
  const int64_t D = p.dim, b = row / p.tokens;
  const scalar_t* x = p.x + row * D;
  const scalar_t* shift = p.shift + b * D;
  const scalar_t* scale = p.scale + b * D;
  scalar_t* out = p.out + row * D;
  for (int64_t d = 0; d < D; ++d) xf[d] = static_cast<acc_t>(x[d]);
  const acc_t mean = lane_sum<acc_t>(D, [&](int64_t d) { return xf[d]; }) / D;
  const acc_t var = lane_sum<acc_t>(D, [&](int64_t d) {
                      const acc_t c = xf[d] - mean;
                      return c * c;
                    }) / D;
  const acc_t rstd = adaln_rstd<acc_t>(var, p.eps);
  for (int64_t d = 0; d < D; ++d) {
    out[d] = static_cast<scalar_t>(adaln_modulate_elem<acc_t>(
        adaln_xhat<acc_t>(xf[d], mean, rstd), static_cast<acc_t>(shift[d]), static_cast<acc_t>(scale[d])));
  }
  p.mean[row] = mean;
  p.rstd[row] = rstd;
}

// grad_x of one row, adding g and g·xhat into the chunk's partial column sums ps, pk [D].
// `gf`, `xh`, `gxh` [D] are scratch rows in acc_t.
template <typename scalar_t, typename acc_t>
void backward_row(const AdalnModulateBackwardParams<scalar_t, acc_t>& p, int64_t row, acc_t* ps, acc_t* pk,
                  acc_t* gf, acc_t* xh, acc_t* gxh) {
  const int64_t D = p.dim, b = row / p.tokens;
  const scalar_t* g = p.grad_out + row * D;
  const scalar_t* x = p.x + row * D;
  const scalar_t* scale = p.scale + b * D;
  scalar_t* gx = p.grad_x + row * D;
  const acc_t mean = p.mean[row], rstd = p.rstd[row];
  for (int64_t d = 0; d < D; ++d) {
    gf[d] = static_cast<acc_t>(g[d]);
    xh[d] = adaln_xhat<acc_t>(static_cast<acc_t>(x[d]), mean, rstd);
    gxh[d] = adaln_grad_xhat<acc_t>(gf[d], static_cast<acc_t>(scale[d]));
  }
  const acc_t m1 = lane_sum<acc_t>(D, [&](int64_t d) { return gxh[d]; }) / D;
  const acc_t m2 = lane_sum<acc_t>(D, [&](int64_t d) { return gxh[d] * xh[d]; }) / D;
  for (int64_t d = 0; d < D; ++d) {
    gx[d] = static_cast<scalar_t>(adaln_grad_x_elem<acc_t>(gxh[d], xh[d], rstd, m1, m2));
    ps[d] += gf[d];
    pk[d] += gf[d] * xh[d];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                                  const at::Tensor& scale, double eps) {
  adaln_modulate_check(x, shift, scale, eps);
  at::Tensor xc = x.contiguous(), shc = shift.contiguous(), scc = scale.contiguous();
  at::Tensor out, mean, rstd;
  std::tie(out, mean, rstd) = adaln_modulate_alloc(x);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  TMD_DISPATCH_FLOATING(x.scalar_type(), "adaln_modulate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AdalnModulateParams<scalar_t, acc_t> p{
        xc.data_ptr<scalar_t>(), shc.data_ptr<scalar_t>(), scc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), B, T, D, static_cast<acc_t>(eps)};
    at::parallel_for(0, B * T, std::max<int64_t>(1, kGrainElems / D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> xf(D);
      for (int64_t row = begin; row < end; ++row) forward_row(p, row, xf.data());
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_backward_cpu(const at::Tensor& grad_out,
                                                                           const at::Tensor& x,
                                                                           const at::Tensor& scale,
                                                                           const at::Tensor& mean,
                                                                           const at::Tensor& rstd) {
  adaln_modulate_backward_check(grad_out, x, scale, mean, rstd);
  at::Tensor gc = grad_out.contiguous(), xc = x.contiguous(), scc = scale.contiguous();
  at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const int64_t rows_per_chunk = std::max<int64_t>(1, kGrainElems / D);
  const int64_t n_chunks = (T + rows_per_chunk - 1) / rows_per_chunk;
  const auto acc_opts = x.options().dtype(opmath_dtype(x.scalar_type()));
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor partial_shift = at::zeros({B, n_chunks, D}, acc_opts);
  at::Tensor partial_scale = at::zeros({B, n_chunks, D}, acc_opts);
  at::Tensor grad_shift = at::empty({B, D}, x.options());
  at::Tensor grad_scale = at::empty({B, D}, x.options());
  TMD_DISPATCH_FLOATING(x.scalar_type(), "adaln_modulate_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AdalnModulateBackwardParams<scalar_t, acc_t> p{
        gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), scc.data_ptr<scalar_t>(), mc.data_ptr<acc_t>(),
        rc.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(), partial_shift.data_ptr<acc_t>(),
        partial_scale.data_ptr<acc_t>(), B, T, D, n_chunks};
    at::parallel_for(0, B * n_chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(3 * D);
      acc_t* gf = scratch.data();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / n_chunks, t0 = (task % n_chunks) * rows_per_chunk;
        const int64_t t1 = std::min(T, t0 + rows_per_chunk);
        for (int64_t t = t0; t < t1; ++t) {
          backward_row(p, b * T + t, p.partial_shift + task * D, p.partial_scale + task * D, gf, gf + D, gf + 2 * D);
        }
      }
    });
    scalar_t* gs = grad_shift.data_ptr<scalar_t>();
    scalar_t* gk = grad_scale.data_ptr<scalar_t>();
    at::parallel_for(0, B * D, kGrainElems, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / D, d = i % D;
        acc_t s = 0, k = 0;
        for (int64_t c = 0; c < n_chunks; ++c) {
          s += p.partial_shift[(b * n_chunks + c) * D + d];
          k += p.partial_scale[(b * n_chunks + c) * D + d];
        }
        gs[i] = static_cast<scalar_t>(s);
        gk[i] = static_cast<scalar_t>(k);
      }
    });
  });
  return {grad_x, grad_shift, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(tmd, CPU, m) {
  m.impl("adaln_modulate", &adaln_modulate_cpu);
  m.impl("adaln_modulate_backward", &adaln_modulate_backward_cpu);
}

}  // namespace tmd
