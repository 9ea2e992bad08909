// CPU kernels of meanflow_fd_loss (the twin of meanflow_fd_loss_cuda.cu; same per-element math).
// Work items are fixed (sample, chunk) pairs, so every row is uniformly "FD" or "plain" inside an
// item and the sums do not depend on the thread count: each item sums its chunk in kLanes fixed
// lanes, and the chunk partials of a sample are combined pairwise in a fixed order. The loops are in
// meanflow_fd_loss_cpu_kernels.h, built three times (baseline, AVX2 and AVX-512, core/cpu_vec.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "core/cpu_vec.h"
#include "meanflow_fd_loss/meanflow_fd_loss.h"
#include "meanflow_fd_loss/meanflow_fd_loss_common.h"

namespace tmd {
namespace {

namespace cpu_baseline {
#include "meanflow_fd_loss/meanflow_fd_loss_cpu_kernels.h"
}  // namespace cpu_baseline
#if TMD_CPU_AVX2_BUILD
TMD_CPU_AVX2_BEGIN
namespace cpu_avx2 {
#include "meanflow_fd_loss/meanflow_fd_loss_cpu_kernels.h"
}  // namespace cpu_avx2
TMD_CPU_AVX2_END
TMD_CPU_AVX512_BEGIN
namespace cpu_avx512 {
#include "meanflow_fd_loss/meanflow_fd_loss_cpu_kernels.h"
}  // namespace cpu_avx512
TMD_CPU_AVX512_END
#endif

using cpu_baseline::kChunk;
using cpu_baseline::kLanes;

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

// The forward; with save_delta also returns delta [B, ...] in the opmath dtype (else an undefined tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> meanflow_fd_loss_forward_cpu(
    const at::Tensor& u, const at::Tensor& u_plus, const at::Tensor& u_minus, const at::Tensor& v,
    const at::Tensor& s, const at::Tensor& r, const at::Tensor& s_plus, const at::Tensor& s_minus, double c,
    bool save_delta) {
  meanflow_fd_loss_check(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c);
  const MeanflowFdCoeffs co = meanflow_fd_coeffs(s, r, s_plus, s_minus, u.scalar_type());
  const at::Tensor uc = u.contiguous(), upc = u_plus.contiguous(), umc = u_minus.contiguous(), vc = v.contiguous();
  const int64_t batch = u.size(0), per = u.numel() / batch, nchunks = (per + kChunk - 1) / kChunk;
  const auto opts = u.options().dtype(opmath_dtype(u.scalar_type()));
  at::Tensor loss = at::empty({batch}, opts), mse = at::empty({batch}, opts);
  at::Tensor partials = at::empty({batch * nchunks}, opts);
  at::Tensor delta = save_delta ? at::empty(u.sizes(), opts) : at::Tensor();
  TMD_DISPATCH_FLOATING(u.scalar_type(), "meanflow_fd_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MeanflowFdLossParams<scalar_t, acc_t> p{
        uc.data_ptr<scalar_t>(), upc.data_ptr<scalar_t>(), umc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
        co.a.data_ptr<acc_t>(), co.fd.data_ptr<bool>(), loss.data_ptr<acc_t>(), mse.data_ptr<acc_t>(),
        batch, per, static_cast<acc_t>(c), save_delta ? delta.data_ptr<acc_t>() : nullptr};
    acc_t* part = partials.data_ptr<acc_t>();
    TMD_CPU_CALL(forward_partials, p, part);
    for (int64_t b = 0; b < batch; ++b) {
      const acc_t dsq = pairwise_sum(part + b * nchunks, nchunks);
      p.loss[b] = meanflow_fd_loss_value(dsq, p.c);
      p.mse[b] = dsq / static_cast<acc_t>(per);
    }
  });
  return {loss, mse, delta};
}

std::tuple<at::Tensor, at::Tensor> meanflow_fd_loss_cpu(const at::Tensor& u, const at::Tensor& u_plus,
                                                        const at::Tensor& u_minus, const at::Tensor& v,
                                                        const at::Tensor& s, const at::Tensor& r,
                                                        const at::Tensor& s_plus, const at::Tensor& s_minus,
                                                        double c) {
  auto [loss, mse, delta] = meanflow_fd_loss_forward_cpu(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c, false);
  return {loss, mse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> meanflow_fd_loss_delta_cpu(
    const at::Tensor& u, const at::Tensor& u_plus, const at::Tensor& u_minus, const at::Tensor& v,
    const at::Tensor& s, const at::Tensor& r, const at::Tensor& s_plus, const at::Tensor& s_minus, double c) {
  return meanflow_fd_loss_forward_cpu(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c, true);
}

// grad_u = scale_b * delta into grad_u (contiguous; may be dc itself).
void delta_backward_into_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_mse, const at::Tensor& dc,
                             const at::Tensor& mse, double c, at::Tensor& grad_u) {
  const at::ScalarType acc = dc.scalar_type();
  const at::Tensor gl = grad_loss.to(acc).contiguous(), gm = grad_mse.to(acc).contiguous();
  const at::Tensor msec = mse.to(acc).contiguous();
  const int64_t batch = dc.size(0), per = dc.numel() / batch;
  AT_DISPATCH_FLOATING_TYPES(acc, "meanflow_fd_loss_delta_backward_cpu", [&] {
    const MeanflowFdLossDeltaBackwardParams<scalar_t> p{
        gl.data_ptr<scalar_t>(), gm.data_ptr<scalar_t>(), msec.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
        grad_u.data_ptr<scalar_t>(), batch, per, static_cast<scalar_t>(c)};
    TMD_CPU_CALL(delta_backward_kernel, p);
  });
}

at::Tensor meanflow_fd_loss_delta_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_mse,
                                               const at::Tensor& delta, const at::Tensor& mse, double c) {
  meanflow_fd_loss_delta_backward_check(grad_loss, grad_mse, delta, mse, c);
  const at::Tensor dc = delta.contiguous();
  at::Tensor grad_u = at::empty_like(dc);
  delta_backward_into_cpu(grad_loss, grad_mse, dc, mse, c, grad_u);
  return grad_u;
}

void meanflow_fd_loss_delta_backward_inplace_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_mse,
                                                 at::Tensor& delta, const at::Tensor& mse, double c) {
  meanflow_fd_loss_delta_backward_inplace_check(grad_loss, grad_mse, delta, mse, c);
  delta_backward_into_cpu(grad_loss, grad_mse, delta, mse, c, delta);
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
    TMD_CPU_CALL(backward_kernel, p);
  });
  return grad_u;
}

}  // namespace

TORCH_LIBRARY_IMPL(tmd, CPU, m) {
  m.impl("meanflow_fd_loss", &meanflow_fd_loss_cpu);
  m.impl("meanflow_fd_loss_backward", &meanflow_fd_loss_backward_cpu);
  m.impl("meanflow_fd_loss_delta", &meanflow_fd_loss_delta_cpu);
  m.impl("meanflow_fd_loss_delta_backward", &meanflow_fd_loss_delta_backward_cpu);
  m.impl("meanflow_fd_loss_delta_backward_", &meanflow_fd_loss_delta_backward_inplace_cpu);
}

}  // namespace tmd
