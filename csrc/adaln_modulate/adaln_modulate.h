// adaln_modulate: out = LayerNorm_noaffine(x)*(1+scale[b])+shift[b] per row of x [B,T,D].
// Shared per-element math of the CPU and CUDA kernels, and the kernel-facing parameters.
//
// Forward per row:  mean = Σx/D, var = Σ(x-mean)²/D (biased), rstd = 1/sqrt(var+eps),
//                   xhat = (x-mean)·rstd, out = xhat·(1+scale) + shift.
// Backward per row: gxh = g·(1+scale), grad_x = rstd·(gxh - mean(gxh) - xhat·mean(gxh·xhat));
//                   grad_shift[b] = Σ_t g, grad_scale[b] = Σ_t g·xhat (column sums over T).
#pragma once

#include <cmath>
#include <cstdint>

#include "core/host_device.h"

namespace tmd {

template <typename acc_t>
TMD_HOST_DEVICE acc_t adaln_rstd(acc_t var, acc_t eps) {
#if defined(__CUDA_ARCH__)
  return rsqrt(var + eps);
#else
  return acc_t(1) / std::sqrt(var + eps);
#endif
}

template <typename acc_t>
TMD_HOST_DEVICE acc_t adaln_xhat(acc_t x, acc_t mean, acc_t rstd) {
  return (x - mean) * rstd;
}

template <typename acc_t>
TMD_HOST_DEVICE acc_t adaln_modulate_elem(acc_t xhat, acc_t shift, acc_t scale) {
  return xhat * (acc_t(1) + scale) + shift;
}

// gxh = grad_out·(1+scale): the gradient reaching xhat.
template <typename acc_t>
TMD_HOST_DEVICE acc_t adaln_grad_xhat(acc_t grad_out, acc_t scale) {
  return grad_out * (acc_t(1) + scale);
}

// grad_x from gxh, xhat and the row means mean(gxh), mean(gxh·xhat).
template <typename acc_t>
TMD_HOST_DEVICE acc_t adaln_grad_x_elem(acc_t gxh, acc_t xhat, acc_t rstd, acc_t mean_gxh,
                                        acc_t mean_gxh_xhat) {
  return rstd * (gxh - mean_gxh - xhat * mean_gxh_xhat);
}

// Kernels see raw pointers, never at::Tensor. All tensors contiguous: x/out [B,T,D],
// shift/scale [B,D], mean/rstd [B,T] in acc_t.
template <typename scalar_t, typename acc_t>
struct AdalnModulateParams {
  const scalar_t* x;
  const scalar_t* shift;
  const scalar_t* scale;
  scalar_t* out;
  acc_t* mean;
  acc_t* rstd;
  int64_t batch;
  int64_t tokens;  // T
  int64_t dim;     // D
  acc_t eps;
};

// grad_out/x/grad_x [B,T,D], scale [B,D], mean/rstd [B,T] in acc_t. The column sums over T
// are written as partial sums: partial_shift/partial_scale [B, n_partials, D] in acc_t, each
// partial row owned by exactly one thread (no atomics), reduced over n_partials afterwards.
template <typename scalar_t, typename acc_t>
struct AdalnModulateBackwardParams {
  const scalar_t* grad_out;
  const scalar_t* x;
  const scalar_t* scale;
  const acc_t* mean;
  const acc_t* rstd;
  scalar_t* grad_x;
  acc_t* partial_shift;
  acc_t* partial_scale;
  int64_t batch;
  int64_t tokens;
  int64_t dim;
  int64_t n_partials;
};

}  // namespace tmd
