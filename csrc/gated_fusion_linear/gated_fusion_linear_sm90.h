// The sm_90a CUTLASS path of gated_fusion_linear: a TMA + WGMMA GEMM whose epilogue applies the
// gated fusion, so z = x·Wᵀ + b never goes to memory:
//   out[b,t,d] = m[b,t,d] + lam[b,d] * (sum_k x[b,t,k]*weight[d,k] + bias[d] + e[b,t,d] - m[b,t,d])
// (bias and the residual e optional)
// with lam = sigmoid(alpha)*gate precomputed as fp32 [B, D] on the device (no host sync).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace tmd {

// True when this build holds the sm_90a kernels (TORCH_CUDA_ARCH_LIST had 9.0a).
bool gated_fusion_linear_sm90_compiled();

// Runs the fused GEMM into `out` ([B,T,D], contiguous, dtype of m) and returns true, or returns
// false without touching anything when the case is not supported (device not sm_90, dtype not
// bf16/fp16, K or D not a multiple of 8, pointers not 16-byte aligned, kernels not compiled, or
// CUTLASS's can_implement declines it); the caller then takes the cuBLAS + elementwise path. All
// tensors contiguous, on one device: m [B,T,D], x [B,T,K], weight [D,K] (dtype of m), bias [D]
// (dtype of m) or empty, residual [B,T,D] (dtype of m) or empty, lam fp32 [B,D].
bool gated_fusion_linear_sm90(const at::Tensor& m, const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, const at::Tensor& lam,
                              at::Tensor& out);

}  // namespace tmd
