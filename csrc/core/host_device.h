// Marks per-element math shared by the CPU and CUDA kernels: one definition, both compilers.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TMD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TMD_HOST_DEVICE inline
#endif
