// CPU kernels of flow_step (the twin of flow_step_cuda.cu; same per-element math). The loops are in
// flow_step_cpu_kernels.h, built three times (baseline, AVX2 and AVX-512, core/cpu_vec.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "core/cpu_vec.h"
#include "flow_step/flow_step.h"
#include "flow_step/flow_step_common.h"

namespace tmd {
namespace {

namespace cpu_baseline {
#include "flow_step/flow_step_cpu_kernels.h"
}  // namespace cpu_baseline
#if TMD_CPU_AVX2_BUILD
TMD_CPU_AVX2_BEGIN
namespace cpu_avx2 {
#include "flow_step/flow_step_cpu_kernels.h"
}  // namespace cpu_avx2
TMD_CPU_AVX2_END
TMD_CPU_AVX512_BEGIN
namespace cpu_avx512 {
#include "flow_step/flow_step_cpu_kernels.h"
}  // namespace cpu_avx512
TMD_CPU_AVX512_END
#endif

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
    TMD_CPU_CALL(forward_kernel, p);
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
    TMD_CPU_CALL(backward_kernel, p);
  });
  return {gh, gy1};
}

}  // namespace

TORCH_LIBRARY_IMPL(tmd, CPU, m) {
  m.impl("flow_step", &flow_step_cpu);
  m.impl("flow_step_backward", &flow_step_backward_cpu);
}

}  // namespace tmd
