// CUDA kernels of adaln_modulate (the twin of adaln_modulate_cpu.cpp; same per-element math).
//
// Forward: a row of x ([B*T, D] view) is handled by a warp (small D; several rows per block) or a
// block (larger D). Each thread loads ITEMS vectors of the row (16-byte vectors when D is a
// multiple of the vector width and every pointer is aligned, else scalars) into registers, so x is
// read once from memory; mean and variance come from two fp32 (fp64) row reductions over those
// registers (warp shuffles, then shared memory across warps); then out is written, and mean/rstd.
// Rows wider than the register cache (more than kMaxElems*kMaxThreads = 8192 elements) take a
// streaming kernel that re-reads the row (from cache) for each pass.
//
// Backward: the grid is [B, n_chunks]; a block walks the rows of one chunk of T of one batch
// entry, computes grad_x row by row (two row reductions: mean(gxh), mean(gxh*xhat)) from the row
// of g and x held in registers, and keeps its columns' sums of g and g*xhat in registers. Each
// (block, row slot) writes its own partial row of partial_shift/partial_scale
// [B, n_chunks*rows_per_block, D] (no atomics), and at::sum over that axis finishes
// grad_shift/grad_scale: the result does not depend on scheduling.
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "adaln_modulate/adaln_modulate.h"
#include "adaln_modulate/adaln_modulate_common.h"
#include "core/cuda_utils.cuh"

namespace tmd {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;      // threads per row at most (launch bound: <= 128 registers)
constexpr int kMaxThreadsOneItem = 1024;  // backward, one vector per thread (launch bound: <= 64)
constexpr int kPreferThreads = 256;   // grow vectors per thread before threads beyond this
constexpr int kMaxElems = 16;         // row elements per thread held in registers
constexpr int kRowsPerWarpBlock = 4;  // rows per block when a row needs one warp
constexpr int kStreamThreads = 512;   // threads per row of the streaming kernels
constexpr int64_t kMinRowsPerChunk = 32;

// How a row is spread over threads: `items` vectors per thread (0: the streaming kernels),
// `threads_x` threads per row (a multiple of 32), `rows_per_block` rows per block (> 1 only when
// threads_x == 32, so a block-wide barrier is only ever needed by single-row blocks).
struct RowConfig {
  int items;
  int threads_x;
  int rows_per_block;
};

inline RowConfig make_config(int items, int64_t threads) {
  const int tx = static_cast<int>((threads + kWarp - 1) / kWarp * kWarp);
  return {items, tx, tx == kWarp ? kRowsPerWarpBlock : 1};
}

// Forward: up to kPreferThreads threads per row, then more vectors per thread (registers are
// cheap there: one row copy), then up to kMaxThreads threads.
inline RowConfig row_config(int64_t n_vec, int vec) {
  const int max_items = std::max(1, kMaxElems / vec);
  for (const int limit : {kPreferThreads, kMaxThreads}) {
    for (int items = 1; items <= max_items; items *= 2) {
      const int64_t t = (n_vec + items - 1) / items;
      if (t <= limit) return make_config(items, t);
    }
  }
  return {0, kStreamThreads, 1};
}

// Backward: each thread also carries two column accumulators per element, so one vector per
// thread on up to kMaxThreadsOneItem threads comes first (more warps resident per SM).
inline RowConfig row_config_backward(int64_t n_vec, int vec) {
  return n_vec <= kMaxThreadsOneItem ? make_config(1, n_vec) : row_config(n_vec, vec);
}

// Grids are sized by resident_blocks_of (core/cuda_utils.cuh): the occupancy calculator's count
// for the kernel actually launched, so the register use (e.g. 62 registers of the backward at
// D = 1536) bounds the grid as well as the thread count, and no tail wave is launched.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* q : ptrs) {
    if (!is_aligned(q, 16)) return false;
  }
  return true;
}

// Calls f(std::integral_constant<int, ITEMS>) for the runtime `items`, only for the ITEMS that fit
// the register budget at vector width VEC.
template <int VEC, typename F>
void with_items(int items, F&& f) {
  switch (items) {
    case 1:
      f(std::integral_constant<int, 1>{});
      return;
    case 2:
      if constexpr (2 * VEC <= kMaxElems) {
        f(std::integral_constant<int, 2>{});
        return;
      }
      break;
    case 4:
      if constexpr (4 * VEC <= kMaxElems) {
        f(std::integral_constant<int, 4>{});
        return;
      }
      break;
    case 8:
      if constexpr (8 * VEC <= kMaxElems) {
        f(std::integral_constant<int, 8>{});
        return;
      }
      break;
    case 16:
      if constexpr (16 * VEC <= kMaxElems) {
        f(std::integral_constant<int, 16>{});
        return;
      }
      break;
    default:
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "adaln_modulate: no kernel for ", items, " vectors per thread at width ", VEC);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // butterfly: every lane holds the bitwise-same total
}

// Sums v[0..N) over the threadIdx.x of one row; every thread of the row gets the totals. With
// blockDim.x > 32 the block holds one row and all its threads must call this (it syncs).
template <typename acc_t, int N>
__device__ __forceinline__ void row_sum(acc_t (&v)[N]) {
  __shared__ acc_t smem[N][kMaxThreadsOneItem / kWarp];
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_sum(v[k]);
  if (blockDim.x == kWarp) return;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, n_warps = blockDim.x / kWarp;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) smem[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = warp_sum(lane < n_warps ? smem[k][lane] : acc_t(0));
  __syncthreads();  // smem is reused by the next call
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename scalar_t, typename acc_t, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxThreads) adaln_fwd_kernel(const AdalnModulateParams<scalar_t, acc_t> p) {
  using V = AlignedVec<scalar_t, VEC>;
  const int64_t rows = p.batch * p.tokens, n_vec = p.dim / VEC;
  const acc_t dim = static_cast<acc_t>(p.dim);
  for (int64_t grp = blockIdx.x; grp * blockDim.y < rows; grp += gridDim.x) {
    const int64_t row = grp * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const int64_t off = (active ? row : 0) * p.dim;
    const V* x = reinterpret_cast<const V*>(p.x + off);
    acc_t v[ITEMS][VEC];
    acc_t sum[1] = {acc_t(0)};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      if (active && j < n_vec) {
        const V t = x[j];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          v[i][k] = static_cast<acc_t>(t.v[k]);
          sum[0] += v[i][k];
        }
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i][k] = acc_t(0);
      }
    }
    row_sum(sum);
    const acc_t mean = sum[0] / dim;
    acc_t sq[1] = {acc_t(0)};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      if (active && j < n_vec) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t c = v[i][k] - mean;
          sq[0] += c * c;
        }
      }
    }
    row_sum(sq);
    const acc_t rstd = adaln_rstd<acc_t>(sq[0] / dim, p.eps);
    if (!active) continue;
    const int64_t b = row / p.tokens;
    const V* shift = reinterpret_cast<const V*>(p.shift + b * p.dim);
    const V* scale = reinterpret_cast<const V*>(p.scale + b * p.dim);
    V* out = reinterpret_cast<V*>(p.out + off);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      if (j < n_vec) {
        const V sh = shift[j], sc = scale[j];
        V o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          o.v[k] = static_cast<scalar_t>(adaln_modulate_elem<acc_t>(
              adaln_xhat<acc_t>(v[i][k], mean, rstd), static_cast<acc_t>(sh.v[k]), static_cast<acc_t>(sc.v[k])));
        }
        out[j] = o;
      }
    }
    if (threadIdx.x == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
  }
}

// One row per block (blockDim.y == 1), any D: three passes over the row, scalar loads.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    adaln_fwd_streaming_kernel(const AdalnModulateParams<scalar_t, acc_t> p) {
  const int64_t rows = p.batch * p.tokens, D = p.dim;
  const acc_t dim = static_cast<acc_t>(D);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* x = p.x + row * D;
    acc_t sum[1] = {acc_t(0)};
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) sum[0] += static_cast<acc_t>(x[d]);
    row_sum(sum);
    const acc_t mean = sum[0] / dim;
    acc_t sq[1] = {acc_t(0)};
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const acc_t c = static_cast<acc_t>(x[d]) - mean;
      sq[0] += c * c;
    }
    row_sum(sq);
    const acc_t rstd = adaln_rstd<acc_t>(sq[0] / dim, p.eps);
    const int64_t b = row / p.tokens;
    const scalar_t* shift = p.shift + b * D;
    const scalar_t* scale = p.scale + b * D;
    scalar_t* out = p.out + row * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      out[d] = static_cast<scalar_t>(adaln_modulate_elem<acc_t>(adaln_xhat<acc_t>(static_cast<acc_t>(x[d]), mean, rstd),
                                                                 static_cast<acc_t>(shift[d]),
                                                                 static_cast<acc_t>(scale[d])));
    }
    if (threadIdx.x == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC>
void launch_forward(const AdalnModulateParams<scalar_t, acc_t>& p, cudaStream_t stream) {
  const RowConfig cfg = row_config(p.dim / VEC, VEC);
  const int64_t rows = p.batch * p.tokens;
  if (cfg.items == 0) {
    const auto kernel = adaln_fwd_streaming_kernel<scalar_t, acc_t>;
    const int grid = static_cast<int>(std::min(rows, resident_blocks_of(kernel, cfg.threads_x)));
    kernel<<<grid, cfg.threads_x, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const dim3 block(cfg.threads_x, cfg.rows_per_block);
  const int64_t groups = ceil_div(rows, cfg.rows_per_block);
  with_items<VEC>(cfg.items, [&](auto items) {
    const auto kernel = adaln_fwd_kernel<scalar_t, acc_t, VEC, decltype(items)::value>;
    const int grid =
        static_cast<int>(std::min(groups, resident_blocks_of(kernel, cfg.threads_x * cfg.rows_per_block)));
    kernel<<<grid, block, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename scalar_t, typename acc_t, int VEC, int ITEMS>
__global__ void __launch_bounds__(ITEMS == 1 ? kMaxThreadsOneItem : kMaxThreads)
    adaln_bwd_kernel(const AdalnModulateBackwardParams<scalar_t, acc_t> p, int64_t n_chunks, int64_t chunk_len) {
  // Registers per item: the row's g and x as loaded (VEC scalars each) and the two column
  // accumulators (VEC acc_t each); scale, the same row for the whole block, is re-read (L1).
  using V = AlignedVec<scalar_t, VEC>;
  const int64_t n_vec = p.dim / VEC;
  const acc_t dim = static_cast<acc_t>(p.dim);
  for (int64_t task = blockIdx.x; task < p.batch * n_chunks; task += gridDim.x) {
    const int64_t b = task / n_chunks;
    const int64_t t_begin = (task % n_chunks) * chunk_len;
    const int64_t t_end = t_begin + chunk_len < p.tokens ? t_begin + chunk_len : p.tokens;
    const V* scale = reinterpret_cast<const V*>(p.scale + b * p.dim);
    acc_t ps[ITEMS][VEC], pk[ITEMS][VEC];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        ps[i][k] = acc_t(0);
        pk[i][k] = acc_t(0);
      }
    }
    for (int64_t t0 = t_begin; t0 < t_end; t0 += blockDim.y) {
      const int64_t t = t0 + threadIdx.y;
      const bool active = t < t_end;
      const int64_t row = b * p.tokens + (active ? t : t_begin);
      const acc_t mean = p.mean[row], rstd = p.rstd[row];
      const V* g = reinterpret_cast<const V*>(p.grad_out + row * p.dim);
      const V* x = reinterpret_cast<const V*>(p.x + row * p.dim);
      V gv[ITEMS], xv[ITEMS];
      acc_t s[2] = {acc_t(0), acc_t(0)};
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t j = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
        if (active && j < n_vec) {
          gv[i] = g[j];
          xv[i] = x[j];
          const V sc = scale[j];
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const acc_t xh = adaln_xhat<acc_t>(static_cast<acc_t>(xv[i].v[k]), mean, rstd);
            const acc_t gxh = adaln_grad_xhat<acc_t>(static_cast<acc_t>(gv[i].v[k]), static_cast<acc_t>(sc.v[k]));
            s[0] += gxh;
            s[1] += gxh * xh;
          }
        }
      }
      row_sum(s);
      if (!active) continue;
      const acc_t m1 = s[0] / dim, m2 = s[1] / dim;
      V* gx = reinterpret_cast<V*>(p.grad_x + row * p.dim);
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t j = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
        if (j < n_vec) {
          const V sc = scale[j];
          V o;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const acc_t gd = static_cast<acc_t>(gv[i].v[k]);
            const acc_t xh = adaln_xhat<acc_t>(static_cast<acc_t>(xv[i].v[k]), mean, rstd);
            o.v[k] = static_cast<scalar_t>(adaln_grad_x_elem<acc_t>(
                adaln_grad_xhat<acc_t>(gd, static_cast<acc_t>(sc.v[k])), xh, rstd, m1, m2));
            ps[i][k] += gd;
            pk[i][k] += gd * xh;
          }
          gx[j] = o;
        }
      }
    }
    const int64_t slot = (task * blockDim.y + threadIdx.y) * p.dim;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      if (j < n_vec) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          p.partial_shift[slot + j * VEC + k] = ps[i][k];
          p.partial_scale[slot + j * VEC + k] = pk[i][k];
        }
      }
    }
  }
}

// One row slot per block (blockDim.y == 1), any D: each thread adds into its own columns of the
// block's (zero-initialised) partial rows in global memory.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads) adaln_bwd_streaming_kernel(
    const AdalnModulateBackwardParams<scalar_t, acc_t> p, int64_t n_chunks, int64_t chunk_len) {
  const int64_t D = p.dim;
  const acc_t dim = static_cast<acc_t>(D);
  for (int64_t task = blockIdx.x; task < p.batch * n_chunks; task += gridDim.x) {
    const int64_t b = task / n_chunks;
    const int64_t t_begin = (task % n_chunks) * chunk_len;
    const int64_t t_end = t_begin + chunk_len < p.tokens ? t_begin + chunk_len : p.tokens;
    const scalar_t* scale = p.scale + b * D;
    acc_t* ps = p.partial_shift + task * D;
    acc_t* pk = p.partial_scale + task * D;
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t row = b * p.tokens + t;
      const acc_t mean = p.mean[row], rstd = p.rstd[row];
      const scalar_t* g = p.grad_out + row * D;
      const scalar_t* x = p.x + row * D;
      acc_t s[2] = {acc_t(0), acc_t(0)};
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        const acc_t xh = adaln_xhat<acc_t>(static_cast<acc_t>(x[d]), mean, rstd);
        const acc_t gxh = adaln_grad_xhat<acc_t>(static_cast<acc_t>(g[d]), static_cast<acc_t>(scale[d]));
        s[0] += gxh;
        s[1] += gxh * xh;
      }
      row_sum(s);
      const acc_t m1 = s[0] / dim, m2 = s[1] / dim;
      scalar_t* gx = p.grad_x + row * D;
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        const acc_t xh = adaln_xhat<acc_t>(static_cast<acc_t>(x[d]), mean, rstd);
        const acc_t gd = static_cast<acc_t>(g[d]);
        gx[d] = static_cast<scalar_t>(
            adaln_grad_x_elem<acc_t>(adaln_grad_xhat<acc_t>(gd, static_cast<acc_t>(scale[d])), xh, rstd, m1, m2));
        ps[d] += gd;
        pk[d] += gd * xh;
      }
    }
  }
}

// Chunks of T per batch entry: enough blocks to fill the device, at least kMinRowsPerChunk rows
// each (fewer, larger chunks keep the partial sums small).
// `resident`: backward_resident_blocks of the kernel that will run.
inline int64_t chunk_count(int64_t batch, int64_t tokens, int64_t resident) {
  const int64_t want = ceil_div(resident, batch);
  return std::max<int64_t>(1, std::min(want, ceil_div(tokens, kMinRowsPerChunk)));
}

// Blocks of the backward kernel launch_backward<scalar_t, acc_t, VEC> will run for `cfg` that the
// device holds at once.
template <typename scalar_t, typename acc_t, int VEC>
int64_t backward_resident_blocks(const RowConfig& cfg) {
  if (cfg.items == 0) return resident_blocks_of(adaln_bwd_streaming_kernel<scalar_t, acc_t>, cfg.threads_x);
  int64_t n = 0;
  with_items<VEC>(cfg.items, [&](auto items) {
    n = resident_blocks_of(adaln_bwd_kernel<scalar_t, acc_t, VEC, decltype(items)::value>,
                           cfg.threads_x * cfg.rows_per_block);
  });
  return n;
}

template <typename scalar_t, typename acc_t, int VEC>
void launch_backward(const AdalnModulateBackwardParams<scalar_t, acc_t>& p, const RowConfig& cfg,
                     int64_t n_chunks, int64_t chunk_len, cudaStream_t stream) {
  const int grid = static_cast<int>(std::min<int64_t>(p.batch * n_chunks, INT32_MAX));
  if (cfg.items == 0) {
    adaln_bwd_streaming_kernel<scalar_t, acc_t><<<grid, cfg.threads_x, 0, stream>>>(p, n_chunks, chunk_len);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const dim3 block(cfg.threads_x, cfg.rows_per_block);
  with_items<VEC>(cfg.items, [&](auto items) {
    adaln_bwd_kernel<scalar_t, acc_t, VEC, decltype(items)::value><<<grid, block, 0, stream>>>(p, n_chunks,
                                                                                              chunk_len);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------
// Entry points

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                                   const at::Tensor& scale, double eps) {
  adaln_modulate_check(x, shift, scale, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous(), shc = shift.contiguous(), scc = scale.contiguous();
  at::Tensor out, mean, rstd;
  std::tie(out, mean, rstd) = adaln_modulate_alloc(x);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TMD_DISPATCH_FLOATING(x.scalar_type(), "adaln_modulate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AdalnModulateParams<scalar_t, acc_t> p{
        xc.data_ptr<scalar_t>(), shc.data_ptr<scalar_t>(), scc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), B, T, D, static_cast<acc_t>(eps)};
    constexpr int VEC = vec_width<scalar_t>();
    if (D % VEC == 0 && all_aligned({p.x, p.shift, p.scale, p.out})) {
      launch_forward<scalar_t, acc_t, VEC>(p, stream);
    } else {
      launch_forward<scalar_t, acc_t, 1>(p, stream);
    }
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_backward_cuda(const at::Tensor& grad_out,
                                                                            const at::Tensor& x,
                                                                            const at::Tensor& scale,
                                                                            const at::Tensor& mean,
                                                                            const at::Tensor& rstd) {
  adaln_modulate_backward_check(grad_out, x, scale, mean, rstd);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gc = grad_out.contiguous(), xc = x.contiguous(), scc = scale.contiguous();
  at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const auto acc_opts = x.options().dtype(opmath_dtype(x.scalar_type()));
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor partial_shift, partial_scale;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TMD_DISPATCH_FLOATING(x.scalar_type(), "adaln_modulate_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int VEC = vec_width<scalar_t>();
    const bool vec_ok = D % VEC == 0 && all_aligned({gc.data_ptr(), xc.data_ptr(), scc.data_ptr(), grad_x.data_ptr()});
    const RowConfig cfg = vec_ok ? row_config_backward(D / VEC, VEC) : row_config_backward(D, 1);
    const int64_t resident = vec_ok ? backward_resident_blocks<scalar_t, acc_t, VEC>(cfg)
                                    : backward_resident_blocks<scalar_t, acc_t, 1>(cfg);
    int64_t n_chunks = chunk_count(B, T, resident);
    const int64_t chunk_len = ceil_div(T, n_chunks);
    n_chunks = ceil_div(T, chunk_len);  // no empty chunk
    const int64_t n_partials = n_chunks * cfg.rows_per_block;
    // The register kernel writes every partial entry; the streaming one accumulates into them.
    partial_shift = cfg.items == 0 ? at::zeros({B, n_partials, D}, acc_opts) : at::empty({B, n_partials, D}, acc_opts);
    partial_scale = cfg.items == 0 ? at::zeros({B, n_partials, D}, acc_opts) : at::empty({B, n_partials, D}, acc_opts);
    const AdalnModulateBackwardParams<scalar_t, acc_t> p{
        gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), scc.data_ptr<scalar_t>(), mc.data_ptr<acc_t>(),
        rc.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(), partial_shift.data_ptr<acc_t>(),
        partial_scale.data_ptr<acc_t>(), B, T, D, n_partials};
    if (vec_ok) {
      launch_backward<scalar_t, acc_t, VEC>(p, cfg, n_chunks, chunk_len, stream);
    } else {
      launch_backward<scalar_t, acc_t, 1>(p, cfg, n_chunks, chunk_len, stream);
    }
  });
  at::Tensor grad_shift = partial_shift.sum(1).to(x.scalar_type());
  at::Tensor grad_scale = partial_scale.sum(1).to(x.scalar_type());
  return {grad_x, grad_shift, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(tmd, CUDA, m) {
  m.impl("adaln_modulate", &adaln_modulate_cuda);
  m.impl("adaln_modulate_backward", &adaln_modulate_backward_cuda);
}

}  // namespace tmd
