// meanflow_fd_loss: the TM-MeanFlow loss with the finite-difference target (docs/design.md §1.4; contract §3.2).
// Per sample b, with a_b = (s-r)/(s_plus-s_minus) and d = elements per sample:
//   u_hat = v - a_b*(u_plus - u_minus)  on rows with s != r,   u_hat = v  on rows with s == r,
//   delta = u - u_hat,  loss_b = |delta_b|^2 / sg(|delta_b|^2 + c),  mse_b = |delta_b|^2 / d.
// Shared math of the CPU and CUDA kernels, and the kernel-facing parameters.
#pragma once

#include <cstdint>

#include "core/host_device.h"

namespace tmd {

// One element of delta = u - u_hat. On rows with s == r (FD false) u_plus and u_minus are never
// part of the result, whatever they hold (NaN, Inf): the callers do not even load them.
template <bool FD, typename acc_t>
TMD_HOST_DEVICE acc_t meanflow_fd_delta(acc_t u, acc_t v, acc_t u_plus, acc_t u_minus, acc_t a) {
  if constexpr (FD) {
    return u - (v - a * (u_plus - u_minus));
  } else {
    return u - v;
  }
}

// loss_b = |delta|^2 / (|delta|^2 + c) (the denominator is a constant for the gradient).
template <typename acc_t>
TMD_HOST_DEVICE acc_t meanflow_fd_loss_value(acc_t delta_sq, acc_t c) {
  return delta_sq / (delta_sq + c);
}

// d(grad_loss*loss + grad_mse*mse)/d(delta) = scale * delta, with
// scale = 2*grad_loss/(|delta|^2 + c) + 2*grad_mse/d, where |delta|^2 = mse*d.
template <typename acc_t>
TMD_HOST_DEVICE acc_t meanflow_fd_grad_scale(acc_t grad_loss, acc_t grad_mse, acc_t mse, acc_t d, acc_t c) {
  return acc_t(2) * grad_loss / (mse * d + c) + acc_t(2) * grad_mse / d;
}

// Kernels see raw pointers, never at::Tensor. All tensors contiguous; per-sample arrays are [B].
template <typename scalar_t, typename acc_t>
struct MeanflowFdLossParams {
  const scalar_t* u;
  const scalar_t* u_plus;
  const scalar_t* u_minus;
  const scalar_t* v;
  const acc_t* a;    // (s-r)/(s_plus-s_minus), 0 where s == r (CPU; the CUDA kernels read the times)
  const bool* fd;    // s != r (CPU, as a)
  acc_t* loss;       // [B]
  acc_t* mse;        // [B]
  int64_t batch;
  int64_t per_sample;  // d
  acc_t c;
  acc_t* delta = nullptr;  // [B, d] in acc_t, written when not null (meanflow_fd_loss_delta)
};

// Backward from a saved delta (meanflow_fd_loss_delta_backward): grad_u = scale_b * delta, in acc_t.
template <typename acc_t>
struct MeanflowFdLossDeltaBackwardParams {
  const acc_t* grad_loss;  // [B]
  const acc_t* grad_mse;   // [B]
  const acc_t* mse;        // [B]
  const acc_t* delta;      // [B, d]
  acc_t* grad_u;           // [B, d]
  int64_t batch;
  int64_t per_sample;
  acc_t c;
};

template <typename scalar_t, typename acc_t>
struct MeanflowFdLossBackwardParams {
  const acc_t* grad_loss;  // [B]
  const acc_t* grad_mse;   // [B]
  const acc_t* mse;        // [B], the forward's output (|delta|^2 = mse*d)
  const scalar_t* u;
  const scalar_t* u_plus;
  const scalar_t* u_minus;
  const scalar_t* v;
  const acc_t* a;
  const bool* fd;
  scalar_t* grad_u;  // scale_b * delta
  int64_t batch;
  int64_t per_sample;
  acc_t c;
};

}  // namespace tmd
