// CPU kernels of meanflow_fd_loss (the twin of meanflow_fd_loss_cuda.cu; same per-element math).
// Work items are fixed (sample, chunk) pairs, so every row is uniformly "FD" or "plain" inside an
// item and the sums do not depend on the thread count: each item sums its chunk in kLanes fixed
// lanes, and the chunk partials of a sample are combined pairwise in a fixed order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "meanflow_fd_loss/meanflow_fd_loss.h"
#include "meanflow_fd_loss/meanflow_fd_loss_common.h"

namespace tmd {
namespace {

constexpr int64_t kChunk = 4096;                   // elements per work item
constexpr int64_t kGrainItems = (1 << 15) / kChunk;  // items per task, at least
constexpr int kLanes = 8;

template <bool FD, typename P, typename acc_t>
inline acc_t delta_at(const P& p, int64_t i, acc_t a) {
  if constexpr (FD) {
    return meanflow_fd_delta<true, acc_t>(static_cast<acc_t>(p.u[i]), static_cast<acc_t>(p.v[i]),
                                          static_cast<acc_t>(p.u_plus[i]), static_cast<acc_t>(p.u_minus[i]), a);
  } else {
    return meanflow_fd_delta<false, acc_t>(static_cast<acc_t>(p.u[i]), static_cast<acc_t>(p.v[i]), acc_t(0),
                                           acc_t(0), a);
  }
}

// sum of delta^2 over [lo, hi).
template <bool FD, typename P, typename acc_t>
acc_t chunk_delta_sq(const P& p, int64_t lo, int64_t hi, acc_t a) {
  acc_t lanes[kLanes] = {};
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t d = delta_at<FD>(p, i + l, a);
      lanes[l] += d * d;
    }
  }
  for (int l = 0; i < hi; ++i, ++l) {
    const acc_t d = delta_at<FD>(p, i, a);
    lanes[l] += d * d;
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  }
  return lanes[0];
}

template <typename acc_t>
acc_t pairwise_sum(const acc_t* x, int64_t n) {
  if (n <= kLanes) {
    acc_t s = 0;
    for (int64_t i = 0; i < n; ++i) s += x[i];
    return s;
  }
  const int64_t h = n / 2;
  return pairwise_sum(x, h) + pairwise_sum(x + h, n - h);
}

// Calls fn(item, b, lo, hi) for every (sample, chunk) item, in parallel: elements [lo, hi) of sample b.
template <typename F>
void for_each_chunk(int64_t batch, int64_t per, F&& fn) {
  const int64_t nchunks = (per + kChunk - 1) / kChunk;
  at::parallel_for(0, batch * nchunks, kGrainItems, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nchunks;
      const int64_t lo = b * per + (item % nchunks) * kChunk;
      fn(item, b, lo, std::min(lo + kChunk, (b + 1) * per));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> meanflow_fd_loss_cpu(const at::Tensor& u, const at::Tensor& u_plus,
                                                        const at::Tensor& u_minus, const at::Tensor& v,
                                                        const at::Tensor& s, const at::Tensor& r,
                                                        const at::Tensor& s_plus, const at::Tensor& s_minus,
                                                        double c) {
  meanflow_fd_loss_check(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c);
  const MeanflowFdCoeffs co = meanflow_fd_coeffs(s, r, s_plus, s_minus, u.scalar_type());
  const at::Tensor uc = u.contiguous(), upc = u_plus.contiguous(), umc = u_minus.contiguous(), vc = v.contiguous();
  const int64_t batch = u.size(0), per = u.numel() / batch, nchunks = (per + kChunk - 1) / kChunk;
  const auto opts = u.options().dtype(opmath_dtype(u.scalar_type()));
  at::Tensor loss = at::empty({batch}, opts), mse = at::empty({batch}, opts);
  at::Tensor partials = at::empty({batch * nchunks}, opts);
  TMD_DISPATCH_FLOATING(u.scalar_type(), "meanflow_fd_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MeanflowFdLossParams<scalar_t, acc_t> p{
        uc.data_ptr<scalar_t>(), upc.data_ptr<scalar_t>(), umc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
        co.a.data_ptr<acc_t>(), co.fd.data_ptr<bool>(), loss.data_ptr<acc_t>(), mse.data_ptr<acc_t>(),
        batch, per, static_cast<acc_t>(c)};
    acc_t* part = partials.data_ptr<acc_t>();
    for_each_chunk(batch, per, [&](int64_t item, int64_t b, int64_t lo, int64_t hi) {
      part[item] = p.fd[b] ? chunk_delta_sq<true>(p, lo, hi, p.a[b]) : chunk_delta_sq<false>(p, lo, hi, p.a[b]);
    });
    for (int64_t b = 0; b < batch; ++b) {
      const acc_t dsq = pairwise_sum(part + b * nchunks, nchunks);
      p.loss[b] = meanflow_fd_loss_value(dsq, p.c);
      p.mse[b] = dsq / static_cast<acc_t>(per);
    }
  });
  return {loss, mse};
}

at::Tensor meanflow_fd_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_mse,
                                         const at::Tensor& u, const at::Tensor& u_plus, const at::Tensor& u_minus,
                                         const at::Tensor& v, const at::Tensor& s, const at::Tensor& r,
                                         const at::Tensor& s_plus, const at::Tensor& s_minus, const at::Tensor& mse,
                                         double c) {
  meanflow_fd_loss_check(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c);
  meanflow_fd_loss_backward_check(grad_loss, grad_mse, mse, u);
  const MeanflowFdCoeffs co = meanflow_fd_coeffs(s, r, s_plus, s_minus, u.scalar_type());
  const at::ScalarType acc = opmath_dtype(u.scalar_type());
  const at::Tensor gl = grad_loss.to(acc).contiguous(), gm = grad_mse.to(acc).contiguous();
  const at::Tensor msec = mse.to(acc).contiguous();
  const at::Tensor uc = u.contiguous(), upc = u_plus.contiguous(), umc = u_minus.contiguous(), vc = v.contiguous();
  at::Tensor grad_u = at::empty_like(uc);
  const int64_t batch = u.size(0), per = u.numel() / batch;
  TMD_DISPATCH_FLOATING(u.scalar_type(), "meanflow_fd_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MeanflowFdLossBackwardParams<scalar_t, acc_t> p{
        gl.data_ptr<acc_t>(), gm.data_ptr<acc_t>(), msec.data_ptr<acc_t>(), uc.data_ptr<scalar_t>(),
        upc.data_ptr<scalar_t>(), umc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), co.a.data_ptr<acc_t>(),
        co.fd.data_ptr<bool>(), grad_u.data_ptr<scalar_t>(), batch, per, static_cast<acc_t>(c)};
    for_each_chunk(batch, per, [&](int64_t, int64_t b, int64_t lo, int64_t hi) {
      const acc_t scale =
          meanflow_fd_grad_scale(p.grad_loss[b], p.grad_mse[b], p.mse[b], static_cast<acc_t>(per), p.c);
      const acc_t a = p.a[b];
      if (p.fd[b]) {
        for (int64_t i = lo; i < hi; ++i) p.grad_u[i] = static_cast<scalar_t>(scale * delta_at<true>(p, i, a));
      } else {
        for (int64_t i = lo; i < hi; ++i) p.grad_u[i] = static_cast<scalar_t>(scale * delta_at<false>(p, i, a));
      }
    });
  });
  return grad_u;
}

}  // namespace

TORCH_LIBRARY_IMPL(tmd, CPU, m) {
  m.impl("meanflow_fd_loss", &meanflow_fd_loss_cpu);
  m.impl("meanflow_fd_loss_backward", &meanflow_fd_loss_backward_cpu);
}

}  // namespace tmd
