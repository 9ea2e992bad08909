// CPU kernels of flow_step (the twin of flow_step_cuda.cu; same per-element math).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "flow_step/flow_step.h"
#include "flow_step/flow_step_common.h"

namespace tmd {
namespace {

constexpr int64_t kGrain = 1 << 14;

at::Tensor flow_step_cpu(const at::Tensor& y, const at::Tensor& head_out, const at::Tensor& y1,
                         const at::Tensor& s, const at::Tensor& r) {
  at::Tensor c = flow_step_check_and_coeff(y, head_out, y1, s, r);
  at::Tensor yc = y.contiguous(), hc = head_out.contiguous(), y1c = y1.contiguous();
  at::Tensor out = at::empty_like(yc);
  const int64_t batch = y.size(0), per = y.numel() / batch;
  TMD_DISPATCH_FLOATING(y.scalar_type(), "flow_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FlowStepParams<scalar_t, acc_t> p{yc.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(),
                                      y1c.data_ptr<scalar_t>(), c.data_ptr<acc_t>(),
                                      out.data_ptr<scalar_t>(), batch, per};
    at::parallel_for(0, batch * per, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t ci = p.c[i / p.per_sample];
        p.out[i] = static_cast<scalar_t>(flow_step_elem<acc_t>(
            static_cast<acc_t>(p.y[i]), static_cast<acc_t>(p.head_out[i]), static_cast<acc_t>(p.y1[i]), ci));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> flow_step_backward_cpu(const at::Tensor& grad_out, const at::Tensor& s,
                                                          const at::Tensor& r) {
  at::Tensor c = flow_step_backward_check_and_coeff(grad_out, s, r);
  at::Tensor g = grad_out.contiguous();
  at::Tensor gh = at::empty_like(g), gy1 = at::empty_like(g);
  const int64_t batch = g.size(0), per = batch > 0 ? g.numel() / batch : 0;
  TMD_DISPATCH_FLOATING(g.scalar_type(), "flow_step_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FlowStepBackwardParams<scalar_t, acc_t> p{g.data_ptr<scalar_t>(), c.data_ptr<acc_t>(),
                                              gh.data_ptr<scalar_t>(), gy1.data_ptr<scalar_t>(), batch, per};
    at::parallel_for(0, batch * per, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t gi = static_cast<acc_t>(p.grad_out[i]) * p.c[i / p.per_sample];
        p.grad_head_out[i] = static_cast<scalar_t>(gi);
        p.grad_y1[i] = static_cast<scalar_t>(-gi);
      }
    });
  });
  return {gh, gy1};
}

}  // namespace

TORCH_LIBRARY_IMPL(tmd, CPU, m) {
  m.impl("flow_step", &flow_step_cpu);
  m.impl("flow_step_backward", &flow_step_backward_cpu);
}

}  // namespace tmd
