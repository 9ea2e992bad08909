// CUDA part of FlowHeadLoop: the in-place inner-flow update y <- flow_step(y, head_out, y1, s, r)
// that the captured head step ends with. The same per-element math as flow_step (flow_step_elem,
// c = s - r formed in float64 then cast to the opmath dtype), so the graph path reproduces the
// eager loop (torch.ops.tmd.flow_step) bit for bit. Memory-bound: 16-byte vectors when every
// sample's length is a multiple of the vector width and the pointers are aligned.
#include <ATen/MemoryOverlap.h>

#include "core/checks.h"
#include "core/cuda_utils.cuh"
#include "core/dispatch.h"
#include "flow_head_loop/flow_head_loop.h"
#include "flow_step/flow_step.h"

namespace tmd {
namespace {

constexpr int kThreads = 256;

// Kernel-facing parameters: raw pointers, everything contiguous.
template <typename scalar_t, typename time_t>
struct FlowStepInplaceParams {
  scalar_t* y;               // [B, per] read and written
  const scalar_t* head_out;  // [B, per]
  const scalar_t* y1;        // [B, per]
  const time_t* s;           // [B]
  const time_t* r;           // [B]
  int64_t batch;
  int64_t per_sample;
};

template <typename scalar_t, typename acc_t, typename time_t, int VEC>
__global__ void flow_step_inplace_kernel(FlowStepInplaceParams<scalar_t, time_t> p) {
  using V = AlignedVec<scalar_t, VEC>;
  const int64_t n_vec = p.batch * p.per_sample / VEC;
  for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < n_vec;
       v += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = v * VEC / p.per_sample;  // VEC divides per_sample: one sample per vector
    const acc_t c = static_cast<acc_t>(static_cast<double>(p.s[b]) - static_cast<double>(p.r[b]));
    const V y = reinterpret_cast<const V*>(p.y)[v];
    const V h = reinterpret_cast<const V*>(p.head_out)[v];
    const V y1 = reinterpret_cast<const V*>(p.y1)[v];
    V o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      o.v[k] = static_cast<scalar_t>(flow_step_elem<acc_t>(
          static_cast<acc_t>(y.v[k]), static_cast<acc_t>(h.v[k]), static_cast<acc_t>(y1.v[k]), c));
    }
    reinterpret_cast<V*>(p.y)[v] = o;
  }
}

template <typename scalar_t, typename time_t>
void launch(const at::Tensor& y, const at::Tensor& h, const at::Tensor& y1, const at::Tensor& s,
            const at::Tensor& r) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t batch = y.size(0), per = y.numel() / batch;
  FlowStepInplaceParams<scalar_t, time_t> p{y.data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                            y1.const_data_ptr<scalar_t>(), s.const_data_ptr<time_t>(),
                                            r.const_data_ptr<time_t>(), batch, per};
  auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int VEC = vec_width<scalar_t>();
  const bool vec_ok = per % VEC == 0 && is_aligned(p.y, 16) && is_aligned(p.head_out, 16) &&
                      is_aligned(p.y1, 16);
  if (vec_ok) {
    flow_step_inplace_kernel<scalar_t, acc_t, time_t, VEC>
        <<<grid_for(batch * per / VEC, kThreads), kThreads, 0, stream>>>(p);
  } else {
    flow_step_inplace_kernel<scalar_t, acc_t, time_t, 1>
        <<<grid_for(batch * per, kThreads), kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void flow_step_inplace_cuda(const at::Tensor& y, const at::Tensor& head_out, const at::Tensor& y1,
                            const at::Tensor& s, const at::Tensor& r) {
  check_float(y, "y");
  check_same_dtype(head_out, "head_out", y, "y");
  check_same_dtype(y1, "y1", y, "y");
  check_time_dtype(s, "s");
  check_same_dtype(r, "r", s, "s");
  TORCH_CHECK(y.is_cuda(), "y must be a CUDA tensor, got device ", y.device());
  check_same_device(head_out, "head_out", y, "y");
  check_same_device(y1, "y1", y, "y");
  check_same_device(s, "s", y, "y");
  check_same_device(r, "r", y, "y");
  TORCH_CHECK(y.dim() >= 1, "y must be [B, ...], got a 0-d tensor");
  check_nonempty(y, "y");
  check_shape(head_out, y.sizes(), "head_out");
  check_shape(y1, y.sizes(), "y1");
  check_shape(s, {y.size(0)}, "s");
  check_shape(r, {y.size(0)}, "r");
  TORCH_CHECK(y.is_contiguous() && y1.is_contiguous() && s.is_contiguous() && r.is_contiguous(),
              "flow_step_inplace_cuda: y, y1, s and r must be contiguous");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor h = head_out.contiguous();
  // Elementwise in place is safe when head_out is y itself (each element is read before it is
  // written by the same thread); a shifted overlap is not, so read such a head_out from a copy.
  if (at::get_overlap_status(y, h) == at::MemOverlapStatus::Partial) {
    h = h.clone();
  }
  TMD_DISPATCH_FLOATING(y.scalar_type(), "flow_step_inplace_cuda", [&] {
    if (s.scalar_type() == at::kDouble) {
      launch<scalar_t, double>(y, h, y1, s, r);
    } else {
      launch<scalar_t, float>(y, h, y1, s, r);
    }
  });
}

}  // namespace tmd
