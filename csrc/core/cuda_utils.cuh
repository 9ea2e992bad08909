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

// Blocks of `kernel` launched with `block_threads` threads (and `smem` dynamic shared memory) that
// the device holds at once: the occupancy calculator's per-SM count (registers, shared memory and
// threads all bound it) times the SM count, at least one per SM.
template <typename Kernel>
inline int64_t resident_blocks_of(Kernel kernel, int block_threads, size_t smem = 0) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block_threads, smem));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
}

// A [B] float32 or float64 per-sample time tensor read inside a kernel, so that no coefficient
// has to be formed by small preamble kernels or on the host (no host sync; capturable in a CUDA
// graph). Any stride; the value is widened to double.
struct TimeArg {
  const void* ptr;
  int64_t stride;
  bool is_double;

  __device__ __forceinline__ double operator[](int64_t b) const {
    return is_double ? static_cast<const double*>(ptr)[b * stride]
                     : static_cast<double>(static_cast<const float*>(ptr)[b * stride]);
  }
};

// The TimeArg of a 1-d float32/float64 tensor (dtype checked by the caller).
inline TimeArg time_arg(const at::Tensor& t) {
  return {t.const_data_ptr(), t.stride(0), t.scalar_type() == at::kDouble};
}

}  // namespace tmd
