// CUDA kernels of flow_step (the twin of flow_step_cpu.cpp; same per-element math).
// Memory-bound: 16-byte vector loads/stores when every sample's length is a multiple of the
// vector width and the pointers are aligned, scalar grid-stride loop otherwise. The kernels read s
// and r themselves (c = s - r in float64, then cast to the opmath dtype, as flow_step_coeff), so a
// call is one launch with no preamble kernels.
#include <torch/library.h>

#include "core/cuda_utils.cuh"
#include "flow_step/flow_step.h"
#include "flow_step/flow_step_common.h"

namespace tmd {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t, int VEC>
__global__ void flow_step_kernel(FlowStepParams<scalar_t, acc_t> p, TimeArg s, TimeArg r) {
  using V = AlignedVec<scalar_t, VEC>;
  const int64_t n_vec = p.batch * p.per_sample / VEC;
  for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < n_vec;
       v += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = v * VEC;
    const int64_t b = i / p.per_sample;  // VEC divides per_sample: one sample per vector
    const acc_t c = static_cast<acc_t>(s[b] - r[b]);
    const V y = reinterpret_cast<const V*>(p.y)[v];
    const V h = reinterpret_cast<const V*>(p.head_out)[v];
    const V y1 = reinterpret_cast<const V*>(p.y1)[v];
    V o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      o.v[k] = static_cast<scalar_t>(flow_step_elem<acc_t>(
          static_cast<acc_t>(y.v[k]), static_cast<acc_t>(h.v[k]), static_cast<acc_t>(y1.v[k]), c));
    }
    reinterpret_cast<V*>(p.out)[v] = o;
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void flow_step_backward_kernel(FlowStepBackwardParams<scalar_t, acc_t> p, TimeArg s, TimeArg r) {
  using V = AlignedVec<scalar_t, VEC>;
  const int64_t n_vec = p.batch * p.per_sample / VEC;
  for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < n_vec;
       v += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = v * VEC / p.per_sample;
    const acc_t c = static_cast<acc_t>(s[b] - r[b]);
    const V g = reinterpret_cast<const V*>(p.grad_out)[v];
    V gh, gy1;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t x = static_cast<acc_t>(g.v[k]) * c;
      gh.v[k] = static_cast<scalar_t>(x);
      gy1.v[k] = static_cast<scalar_t>(-x);
    }
    reinterpret_cast<V*>(p.grad_head_out)[v] = gh;
    reinterpret_cast<V*>(p.grad_y1)[v] = gy1;
  }
}

template <typename P>
bool vectorizable(const P& p, int vec, std::initializer_list<const void*> ptrs) {
  if (p.per_sample % vec != 0) return false;
  for (const void* q : ptrs) {
    if (!is_aligned(q, 16)) return false;
  }
  return true;
}

at::Tensor flow_step_cuda(const at::Tensor& y, const at::Tensor& head_out, const at::Tensor& y1,
                          const at::Tensor& s, const at::Tensor& r) {
  flow_step_check(y, head_out, y1, s, r);
  const TimeArg ts = time_arg(s), tr = time_arg(r);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor yc = y.contiguous(), hc = head_out.contiguous(), y1c = y1.contiguous();
  at::Tensor out = at::empty_like(yc);
  const int64_t batch = y.size(0), per = y.numel() / batch;
  auto stream = at::cuda::getCurrentCUDAStream();
  TMD_DISPATCH_FLOATING(y.scalar_type(), "flow_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FlowStepParams<scalar_t, acc_t> p{yc.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(),
                                      y1c.data_ptr<scalar_t>(), nullptr,
                                      out.data_ptr<scalar_t>(), batch, per};
    constexpr int VEC = vec_width<scalar_t>();
    if (vectorizable(p, VEC, {p.y, p.head_out, p.y1, p.out})) {
      flow_step_kernel<scalar_t, acc_t, VEC>
          <<<grid_for(batch * per / VEC, kThreads), kThreads, 0, stream>>>(p, ts, tr);
    } else {
      flow_step_kernel<scalar_t, acc_t, 1><<<grid_for(batch * per, kThreads), kThreads, 0, stream>>>(p, ts, tr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> flow_step_backward_cuda(const at::Tensor& grad_out, const at::Tensor& s,
                                                           const at::Tensor& r) {
  flow_step_backward_check(grad_out, s, r);
  const TimeArg ts = time_arg(s), tr = time_arg(r);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor g = grad_out.contiguous();
  at::Tensor gh = at::empty_like(g), gy1 = at::empty_like(g);
  const int64_t batch = g.size(0), per = batch > 0 ? g.numel() / batch : 0;
  if (g.numel() == 0) return {gh, gy1};
  auto stream = at::cuda::getCurrentCUDAStream();
  TMD_DISPATCH_FLOATING(g.scalar_type(), "flow_step_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FlowStepBackwardParams<scalar_t, acc_t> p{g.data_ptr<scalar_t>(), nullptr,
                                              gh.data_ptr<scalar_t>(), gy1.data_ptr<scalar_t>(), batch, per};
    constexpr int VEC = vec_width<scalar_t>();
    if (vectorizable(p, VEC, {p.grad_out, p.grad_head_out, p.grad_y1})) {
      flow_step_backward_kernel<scalar_t, acc_t, VEC>
          <<<grid_for(batch * per / VEC, kThreads), kThreads, 0, stream>>>(p, ts, tr);
    } else {
      flow_step_backward_kernel<scalar_t, acc_t, 1>
          <<<grid_for(batch * per, kThreads), kThreads, 0, stream>>>(p, ts, tr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gh, gy1};
}

}  // namespace

TORCH_LIBRARY_IMPL(tmd, CUDA, m) {
  m.impl("flow_step", &flow_step_cuda);
  m.impl("flow_step_backward", &flow_step_backward_cuda);
}

}  // namespace tmd
