// CUDA kernels of meanflow_fd_loss (the twin of meanflow_fd_loss_cpu.cpp; same per-element math).
// Forward, one pass over memory: a flat grid of (sample, chunk) blocks, each summing delta^2 over
// kChunkVecs vectors of one sample into partials[B * nchunks] with a fixed-order block reduction;
// then one block per sample reduces its partials (fixed order again) and writes loss and mse. No
// float atomics, so the result is deterministic. Rows with s == r never load u_plus/u_minus (the
// branch is uniform per block). Backward: one elementwise pass writing grad_u.
// 16-byte vector loads when every sample's length is a multiple of the vector width and the
// pointers are aligned, scalar loads otherwise.
// The kernels read the four times themselves (a = (s-r)/(s_plus-s_minus) formed in float64 and cast
// to the opmath dtype, as meanflow_fd_coeffs does on the CPU): no host sync, no preamble kernels,
// capturable in a CUDA graph. The value check of the CPU path (s_plus != s_minus on rows with
// s != r) costs a host sync here, so it is not made: such a row gets a = NaN, hence NaN loss, mse
// and grad_u on that row only.
#include <torch/library.h>

#include <climits>

#include "core/cuda_utils.cuh"
#include "meanflow_fd_loss/meanflow_fd_loss.h"
#include "meanflow_fd_loss/meanflow_fd_loss_common.h"

namespace tmd {
namespace {

// The four [B] times of a call, read in-kernel.
struct MeanflowTimes {
  TimeArg s, r, s_plus, s_minus;
};

MeanflowTimes meanflow_times(const at::Tensor& s, const at::Tensor& r, const at::Tensor& s_plus,
                             const at::Tensor& s_minus) {
  return {time_arg(s), time_arg(r), time_arg(s_plus), time_arg(s_minus)};
}

// Row b: fd = (s != r) and a = (s-r)/(s_plus-s_minus) (NaN when s_plus == s_minus), 0 when !fd.
template <typename acc_t>
__device__ __forceinline__ bool meanflow_row_coeff(const MeanflowTimes& t, int64_t b, acc_t& a) {
  const double s = t.s[b], r = t.r[b];
  if (s == r) {
    a = acc_t(0);
    return false;
  }
  const double step = t.s_plus[b] - t.s_minus[b];
  a = static_cast<acc_t>(step != 0.0 ? (s - r) / step : __longlong_as_double(0x7ff8000000000000LL));
  return true;
}

constexpr int kThreads = 256;  // every kernel here is launched with exactly this many threads
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunkVecs = kThreads * 4;  // vectors per forward block

// Sum of x over the block, valid in thread 0. Needs blockDim.x == kThreads; call once per kernel.
template <typename T>
__device__ __forceinline__ T block_sum(T x) {
  __shared__ T warp_sums[kWarps];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kWarps ? warp_sums[lane] : T(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  return x;
}

// This thread's share of sum(delta^2) over the vectors [v0, v1); with SAVE also writes delta (acc_t).
template <bool FD, bool SAVE, int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t thread_delta_sq(const MeanflowFdLossParams<scalar_t, acc_t>& p, int64_t v0,
                                                 int64_t v1, acc_t a) {
  using V = AlignedVec<scalar_t, VEC>;
  using VA = AlignedVec<acc_t, VEC>;
  acc_t sum = 0;
  for (int64_t j = v0 + threadIdx.x; j < v1; j += kThreads) {
    const V u = reinterpret_cast<const V*>(p.u)[j];
    const V v = reinterpret_cast<const V*>(p.v)[j];
    VA dv;
    if constexpr (FD) {
      const V up = reinterpret_cast<const V*>(p.u_plus)[j];
      const V um = reinterpret_cast<const V*>(p.u_minus)[j];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        dv.v[k] = meanflow_fd_delta<true, acc_t>(static_cast<acc_t>(u.v[k]), static_cast<acc_t>(v.v[k]),
                                                 static_cast<acc_t>(up.v[k]), static_cast<acc_t>(um.v[k]), a);
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        dv.v[k] = meanflow_fd_delta<false, acc_t>(static_cast<acc_t>(u.v[k]), static_cast<acc_t>(v.v[k]), acc_t(0),
                                                  acc_t(0), a);
      }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += dv.v[k] * dv.v[k];
    if constexpr (SAVE) reinterpret_cast<VA*>(p.delta)[j] = dv;
  }
  return sum;
}

// Block `item` = (b, k) = (item / nchunks, item % nchunks) writes partials[item] = sum of delta^2
// over vectors [k*kChunkVecs, (k+1)*kChunkVecs) of sample b.
template <bool SAVE, typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    meanflow_fd_loss_partial_kernel(MeanflowFdLossParams<scalar_t, acc_t> p, MeanflowTimes times, int64_t nchunks,
                                    acc_t* partials) {
  const int64_t item = blockIdx.x;
  const int64_t b = item / nchunks;
  const int64_t per_vec = p.per_sample / VEC;
  const int64_t v0 = b * per_vec + (item % nchunks) * kChunkVecs;
  const int64_t end = (b + 1) * per_vec;
  const int64_t v1 = v0 + kChunkVecs < end ? v0 + kChunkVecs : end;
  acc_t a;
  const bool fd = meanflow_row_coeff(times, b, a);
  const acc_t part =
      fd ? thread_delta_sq<true, SAVE, VEC>(p, v0, v1, a) : thread_delta_sq<false, SAVE, VEC>(p, v0, v1, a);
  const acc_t total = block_sum(part);
  if (threadIdx.x == 0) partials[item] = total;
}

// Block b reduces partials[b*nchunks : (b+1)*nchunks] and writes loss[b], mse[b].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    meanflow_fd_loss_finalize_kernel(MeanflowFdLossParams<scalar_t, acc_t> p, int64_t nchunks,
                                     const acc_t* partials) {
  const int64_t b = blockIdx.x;
  acc_t sum = 0;
  for (int64_t k = threadIdx.x; k < nchunks; k += kThreads) sum += partials[b * nchunks + k];
  const acc_t delta_sq = block_sum(sum);
  if (threadIdx.x == 0) {
    p.loss[b] = meanflow_fd_loss_value(delta_sq, p.c);
    p.mse[b] = delta_sq / static_cast<acc_t>(p.per_sample);
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    meanflow_fd_loss_backward_kernel(MeanflowFdLossBackwardParams<scalar_t, acc_t> p, MeanflowTimes times) {
  using V = AlignedVec<scalar_t, VEC>;
  const int64_t per_vec = p.per_sample / VEC;
  const int64_t n_vec = p.batch * per_vec;
  const acc_t d = static_cast<acc_t>(p.per_sample);
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n_vec; j += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = j / per_vec;  // VEC divides per_sample: one sample per vector
    const acc_t scale = meanflow_fd_grad_scale(p.grad_loss[b], p.grad_mse[b], p.mse[b], d, p.c);
    acc_t a;
    const bool fd = meanflow_row_coeff(times, b, a);
    const V u = reinterpret_cast<const V*>(p.u)[j];
    const V v = reinterpret_cast<const V*>(p.v)[j];
    V g;
    if (fd) {
      const V up = reinterpret_cast<const V*>(p.u_plus)[j];
      const V um = reinterpret_cast<const V*>(p.u_minus)[j];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        g.v[k] = static_cast<scalar_t>(scale * meanflow_fd_delta<true, acc_t>(
                                                   static_cast<acc_t>(u.v[k]), static_cast<acc_t>(v.v[k]),
                                                   static_cast<acc_t>(up.v[k]), static_cast<acc_t>(um.v[k]), a));
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        g.v[k] = static_cast<scalar_t>(scale * meanflow_fd_delta<false, acc_t>(
                                                   static_cast<acc_t>(u.v[k]), static_cast<acc_t>(v.v[k]), acc_t(0),
                                                   acc_t(0), a));
      }
    }
    reinterpret_cast<V*>(p.grad_u)[j] = g;
  }
}

// grad_u = scale_b * delta from the saved delta (meanflow_fd_loss_delta_backward); VEC divides d.
template <typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    meanflow_fd_loss_delta_backward_kernel(MeanflowFdLossDeltaBackwardParams<acc_t> p) {
  using V = AlignedVec<acc_t, VEC>;
  const int64_t per_vec = p.per_sample / VEC;
  const int64_t n_vec = p.batch * per_vec;
  const acc_t d = static_cast<acc_t>(p.per_sample);
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n_vec; j += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = j / per_vec;
    const acc_t scale = meanflow_fd_grad_scale(p.grad_loss[b], p.grad_mse[b], p.mse[b], d, p.c);
    V g = reinterpret_cast<const V*>(p.delta)[j];
#pragma unroll
    for (int k = 0; k < VEC; ++k) g.v[k] *= scale;
    reinterpret_cast<V*>(p.grad_u)[j] = g;
  }
}

bool vectorizable(int64_t per_sample, int vec, std::initializer_list<const void*> ptrs) {
  if (per_sample % vec != 0) return false;
  for (const void* q : ptrs) {
    if (!is_aligned(q, 16)) return false;
  }
  return true;
}

template <int VEC, typename scalar_t, typename acc_t>
void launch_forward(const MeanflowFdLossParams<scalar_t, acc_t>& p, const MeanflowTimes& times,
                    const at::Tensor& loss, cudaStream_t stream) {
  const int64_t per_vec = p.per_sample / VEC;
  const int64_t nchunks = (per_vec + kChunkVecs - 1) / kChunkVecs;
  TORCH_CHECK(p.batch * nchunks <= INT_MAX && p.batch <= INT_MAX, "meanflow_fd_loss: u is too large (", p.batch,
              " samples of ", p.per_sample, " elements)");
  at::Tensor partials = at::empty({p.batch * nchunks}, loss.options());
  const unsigned blocks = static_cast<unsigned>(p.batch * nchunks);
  if (p.delta != nullptr) {
    meanflow_fd_loss_partial_kernel<true, scalar_t, acc_t, VEC>
        <<<blocks, kThreads, 0, stream>>>(p, times, nchunks, partials.data_ptr<acc_t>());
  } else {
    meanflow_fd_loss_partial_kernel<false, scalar_t, acc_t, VEC>
        <<<blocks, kThreads, 0, stream>>>(p, times, nchunks, partials.data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  meanflow_fd_loss_finalize_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(p.batch), kThreads, 0, stream>>>(p, nchunks, partials.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The forward; with save_delta also returns delta [B, ...] in the opmath dtype (else an undefined tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor> meanflow_fd_loss_forward_cuda(
    const at::Tensor& u, const at::Tensor& u_plus, const at::Tensor& u_minus, const at::Tensor& v,
    const at::Tensor& s, const at::Tensor& r, const at::Tensor& s_plus, const at::Tensor& s_minus, double c,
    bool save_delta) {
  meanflow_fd_loss_check(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c);
  const c10::cuda::CUDAGuard guard(u.device());
  const MeanflowTimes times = meanflow_times(s, r, s_plus, s_minus);
  const at::Tensor uc = u.contiguous(), upc = u_plus.contiguous(), umc = u_minus.contiguous(), vc = v.contiguous();
  const int64_t batch = u.size(0), per = u.numel() / batch;
  const auto opts = u.options().dtype(opmath_dtype(u.scalar_type()));
  at::Tensor loss = at::empty({batch}, opts), mse = at::empty({batch}, opts);
  at::Tensor delta = save_delta ? at::empty(u.sizes(), opts) : at::Tensor();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TMD_DISPATCH_FLOATING(u.scalar_type(), "meanflow_fd_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MeanflowFdLossParams<scalar_t, acc_t> p{
        uc.data_ptr<scalar_t>(), upc.data_ptr<scalar_t>(), umc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
        nullptr, nullptr, loss.data_ptr<acc_t>(), mse.data_ptr<acc_t>(),
        batch, per, static_cast<acc_t>(c), save_delta ? delta.data_ptr<acc_t>() : nullptr};
    constexpr int VEC = vec_width<scalar_t>();
    // delta (acc_t, VEC elements a vector) is a fresh allocation: aligned whenever VEC divides d
    if (vectorizable(per, VEC, {p.u, p.u_plus, p.u_minus, p.v})) {
      launch_forward<VEC>(p, times, loss, stream);
    } else {
      launch_forward<1>(p, times, loss, stream);
    }
  });
  return {loss, mse, delta};
}

std::tuple<at::Tensor, at::Tensor> meanflow_fd_loss_cuda(const at::Tensor& u, const at::Tensor& u_plus,
                                                         const at::Tensor& u_minus, const at::Tensor& v,
                                                         const at::Tensor& s, const at::Tensor& r,
                                                         const at::Tensor& s_plus, const at::Tensor& s_minus,
                                                         double c) {
  auto [loss, mse, delta] = meanflow_fd_loss_forward_cuda(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c, false);
  return {loss, mse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> meanflow_fd_loss_delta_cuda(
    const at::Tensor& u, const at::Tensor& u_plus, const at::Tensor& u_minus, const at::Tensor& v,
    const at::Tensor& s, const at::Tensor& r, const at::Tensor& s_plus, const at::Tensor& s_minus, double c) {
  return meanflow_fd_loss_forward_cuda(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c, true);
}

// grad_u = scale_b * delta into grad_u (contiguous; may be dc itself: each thread reads its elements
// before it writes them, and no other thread touches them).
void delta_backward_into_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_mse, const at::Tensor& dc,
                              const at::Tensor& mse, double c, at::Tensor& grad_u) {
  const c10::cuda::CUDAGuard guard(dc.device());
  const at::ScalarType acc = dc.scalar_type();
  const at::Tensor gl = grad_loss.to(acc).contiguous(), gm = grad_mse.to(acc).contiguous();
  const at::Tensor msec = mse.to(acc).contiguous();
  const int64_t batch = dc.size(0), per = dc.numel() / batch;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "meanflow_fd_loss_delta_backward_cuda", [&] {
    const MeanflowFdLossDeltaBackwardParams<scalar_t> p{
        gl.data_ptr<scalar_t>(), gm.data_ptr<scalar_t>(), msec.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
        grad_u.data_ptr<scalar_t>(), batch, per, static_cast<scalar_t>(c)};
    constexpr int VEC = 16 / sizeof(scalar_t);
    if (vectorizable(per, VEC, {p.delta, p.grad_u})) {
      meanflow_fd_loss_delta_backward_kernel<scalar_t, VEC>
          <<<grid_for(batch * per / VEC, kThreads), kThreads, 0, stream>>>(p);
    } else {
      meanflow_fd_loss_delta_backward_kernel<scalar_t, 1><<<grid_for(batch * per, kThreads), kThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor meanflow_fd_loss_delta_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_mse,
                                                const at::Tensor& delta, const at::Tensor& mse, double c) {
  meanflow_fd_loss_delta_backward_check(grad_loss, grad_mse, delta, mse, c);
  const at::Tensor dc = delta.contiguous();
  at::Tensor grad_u = at::empty_like(dc);
  delta_backward_into_cuda(grad_loss, grad_mse, dc, mse, c, grad_u);
  return grad_u;
}

void meanflow_fd_loss_delta_backward_inplace_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_mse,
                                                  at::Tensor& delta, const at::Tensor& mse, double c) {
  meanflow_fd_loss_delta_backward_inplace_check(grad_loss, grad_mse, delta, mse, c);
  delta_backward_into_cuda(grad_loss, grad_mse, delta, mse, c, delta);
}

at::Tensor meanflow_fd_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_mse,
                                          const at::Tensor& u, const at::Tensor& u_plus, const at::Tensor& u_minus,
                                          const at::Tensor& v, const at::Tensor& s, const at::Tensor& r,
                                          const at::Tensor& s_plus, const at::Tensor& s_minus,
                                          const at::Tensor& mse, double c) {
  meanflow_fd_loss_check(u, u_plus, u_minus, v, s, r, s_plus, s_minus, c);
  meanflow_fd_loss_backward_check(grad_loss, grad_mse, mse, u);
  const c10::cuda::CUDAGuard guard(u.device());
  const MeanflowTimes times = meanflow_times(s, r, s_plus, s_minus);
  const at::ScalarType acc = opmath_dtype(u.scalar_type());
  const at::Tensor gl = grad_loss.to(acc).contiguous(), gm = grad_mse.to(acc).contiguous();
  const at::Tensor msec = mse.to(acc).contiguous();
  const at::Tensor uc = u.contiguous(), upc = u_plus.contiguous(), umc = u_minus.contiguous(), vc = v.contiguous();
  at::Tensor grad_u = at::empty_like(uc);
  const int64_t batch = u.size(0), per = u.numel() / batch;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TMD_DISPATCH_FLOATING(u.scalar_type(), "meanflow_fd_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MeanflowFdLossBackwardParams<scalar_t, acc_t> p{
        gl.data_ptr<acc_t>(), gm.data_ptr<acc_t>(), msec.data_ptr<acc_t>(), uc.data_ptr<scalar_t>(),
        upc.data_ptr<scalar_t>(), umc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), nullptr,
        nullptr, grad_u.data_ptr<scalar_t>(), batch, per, static_cast<acc_t>(c)};
    constexpr int VEC = vec_width<scalar_t>();
    if (vectorizable(per, VEC, {p.u, p.u_plus, p.u_minus, p.v, p.grad_u})) {
      meanflow_fd_loss_backward_kernel<scalar_t, acc_t, VEC>
          <<<grid_for(batch * per / VEC, kThreads), kThreads, 0, stream>>>(p, times);
    } else {
      meanflow_fd_loss_backward_kernel<scalar_t, acc_t, 1>
          <<<grid_for(batch * per, kThreads), kThreads, 0, stream>>>(p, times);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_u;
}

}  // namespace

TORCH_LIBRARY_IMPL(tmd, CUDA, m) {
  m.impl("meanflow_fd_loss", &meanflow_fd_loss_cuda);
  m.impl("meanflow_fd_loss_backward", &meanflow_fd_loss_backward_cuda);
  m.impl("meanflow_fd_loss_delta", &meanflow_fd_loss_delta_cuda);
  m.impl("meanflow_fd_loss_delta_backward", &meanflow_fd_loss_delta_backward_cuda);
  m.impl("meanflow_fd_loss_delta_backward_", &meanflow_fd_loss_delta_backward_inplace_cuda);
}

}  // namespace tmd
