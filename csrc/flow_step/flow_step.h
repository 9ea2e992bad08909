// flow_step: one inner-flow step y_r = y_s - (s-r)*(y1 - head_out), with c = s-r per sample.
// Shared per-element math of the CPU and CUDA kernels, and the kernel-facing parameters.
#pragma once

#include <cstdint>

#include "core/host_device.h"

namespace tmd {

template <typename acc_t>
TMD_HOST_DEVICE acc_t flow_step_elem(acc_t y, acc_t head_out, acc_t y1, acc_t c) {
  return y - c * (y1 - head_out);
}

// Kernels see raw pointers, never at::Tensor. All tensors contiguous; `c` is [B] in acc_t.
template <typename scalar_t, typename acc_t>
struct FlowStepParams {
  const scalar_t* y;
  const scalar_t* head_out;
  const scalar_t* y1;
  const acc_t* c;       // s - r per sample (CPU; the CUDA kernels read s and r themselves)
  scalar_t* out;
  int64_t batch;
  int64_t per_sample;   // elements per sample
};

template <typename scalar_t, typename acc_t>
struct FlowStepBackwardParams {
  const scalar_t* grad_out;
  const acc_t* c;  // s - r per sample (CPU only, as above)
  scalar_t* grad_head_out;  //  c * grad_out
  scalar_t* grad_y1;        // -c * grad_out
  int64_t batch;
  int64_t per_sample;
};

}  // namespace tmd
