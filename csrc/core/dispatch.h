// dtype dispatch for the ops: fp32, fp64, fp16, bf16. Arithmetic uses at::opmath_type<scalar_t>
// (fp32 for the 16-bit types and fp32, fp64 for fp64).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#define TMD_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

namespace tmd {
// Dtype of the arithmetic for inputs of dtype `t`.
inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}
}  // namespace tmd
