// Small CUDA helpers shared by the kernels: aligned vectors for 16-byte loads, launch sizing.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace tmd {

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

// Elements per 16-byte vector.
template <typename T>
constexpr int vec_width() {
  return 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1;
}

inline bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// Grid size for a grid-stride loop over `n` work items with `threads` threads per block:
// enough blocks to fill the device a few times over, never more than the work.
inline int64_t grid_for(int64_t n, int threads) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (n + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sms) * 8;
  return want < 1 ? 1 : (want < cap ? want : cap);
}

}  // namespace tmd
