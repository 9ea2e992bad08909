// gated_fusion: out = m + lam*(z - m), lam[b,d] = sigmoid(alpha)*gate[b,d], broadcast over tokens.
// Shared per-element math of the CPU and CUDA kernels (also those of gated_fusion_linear, whose
// z is the fp32 GEMM output plus the bias), and the kernel-facing parameters.
#pragma once

#include <cstdint>

#include "core/host_device.h"

namespace tmd {

template <typename acc_t>
TMD_HOST_DEVICE acc_t gated_fusion_elem(acc_t m, acc_t z, acc_t lam) {
  return m + lam * (z - m);
}

// The per-element terms of the backward: d out/d m = 1 - lam, d out/d z = lam, and g*(z - m), whose
// sum over tokens P[b,d] gives grad_gate = sigmoid(alpha)*P and grad_alpha.
template <typename acc_t>
struct GatedFusionElemGrads {
  acc_t grad_m;
  acc_t grad_z;
  acc_t p;
};

template <typename acc_t>
TMD_HOST_DEVICE GatedFusionElemGrads<acc_t> gated_fusion_elem_backward(acc_t g, acc_t m, acc_t z, acc_t lam) {
  return {g * (acc_t(1) - lam), g * lam, g * (z - m)};
}

// Kernels see raw pointers, never at::Tensor. All tensors contiguous: m, z, out [B,T,D];
// lam [B,D] in acc_t; bias [D] in scalar_t or null (then z is taken as is). z is scalar_t for
// gated_fusion and the unrounded acc_t GEMM output for gated_fusion_linear, whose residual
// [B,T,D] (scalar_t, or null) is added in the same pass: z + bias + residual, in that order.
template <typename scalar_t, typename z_t, typename acc_t>
struct GatedFusionParams {
  const scalar_t* m;
  const z_t* z;
  const scalar_t* bias;
  const acc_t* lam;
  scalar_t* out;
  int64_t batch;
  int64_t tokens;
  int64_t dim;
  const scalar_t* residual = nullptr;
};

// One fused pass of the backward over grad_out, m, z: writes grad_m (scalar_t) and grad_z (gz_t),
// and partial[c,b,d] = sum over the tokens of chunk c of g*(z + bias - m) (acc_t, [n_chunks,B,D]);
// the caller sums the chunks (fixed order: deterministic, no float atomics). z may be null, then
// taken as 0 (gated_fusion_linear adds the sum of g*(x·weightᵀ) from a GEMM instead).
template <typename scalar_t, typename z_t, typename acc_t, typename gz_t>
struct GatedFusionBackwardParams {
  const scalar_t* grad_out;
  const scalar_t* m;
  const z_t* z;
  const scalar_t* bias;
  const acc_t* lam;
  scalar_t* grad_m;
  gz_t* grad_z;
  acc_t* partial;
  int64_t batch;
  int64_t tokens;
  int64_t dim;
  int64_t chunk_tokens;  // tokens per chunk (the last chunk may hold fewer)
  int64_t n_chunks;
};

}  // namespace tmd
