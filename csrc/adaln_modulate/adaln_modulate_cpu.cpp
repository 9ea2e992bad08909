// CPU kernels of adaln_modulate (the twin of adaln_modulate_cuda.cu; same per-element math).
// Forward: at::parallel_for over the rows of x viewed as [B*T, D], two-pass mean/variance in the
// opmath dtype. Backward: rows are grouped into chunks of a fixed size (a function of the shape
// only, never of the thread count); each chunk writes its own partial column sums for
// grad_shift/grad_scale, which are then added in chunk order, so results are deterministic. The
// loops are in adaln_modulate_cpu_kernels.h, built three times (baseline, AVX2 and AVX-512, core/cpu_vec.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "core/cpu_vec.h"
#include "adaln_modulate/adaln_modulate.h"
#include "adaln_modulate/adaln_modulate_common.h"

namespace tmd {
namespace {

namespace cpu_baseline {
#include "adaln_modulate/adaln_modulate_cpu_kernels.h"
}  // namespace cpu_baseline
#if TMD_CPU_AVX2_BUILD
TMD_CPU_AVX2_BEGIN
namespace cpu_avx2 {
#include "adaln_modulate/adaln_modulate_cpu_kernels.h"
}  // namespace cpu_avx2
TMD_CPU_AVX2_END
TMD_CPU_AVX512_BEGIN
namespace cpu_avx512 {
#include "adaln_modulate/adaln_modulate_cpu_kernels.h"
}  // namespace cpu_avx512
TMD_CPU_AVX512_END
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                                  const at::Tensor& scale, double eps) {
  adaln_modulate_check(x, shift, scale, eps);
  at::Tensor xc = x.contiguous(), shc = shift.contiguous(), scc = scale.contiguous();
  at::Tensor out, mean, rstd;
  std::tie(out, mean, rstd) = adaln_modulate_alloc(x);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  TMD_DISPATCH_FLOATING(x.scalar_type(), "adaln_modulate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AdalnModulateParams<scalar_t, acc_t> p{
        xc.data_ptr<scalar_t>(), shc.data_ptr<scalar_t>(), scc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), B, T, D, static_cast<acc_t>(eps)};
    TMD_CPU_CALL(forward_kernel, p);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_backward_cpu(const at::Tensor& grad_out,
                                                                           const at::Tensor& x,
                                                                           const at::Tensor& scale,
                                                                           const at::Tensor& mean,
                                                                           const at::Tensor& rstd) {
  adaln_modulate_backward_check(grad_out, x, scale, mean, rstd);
  at::Tensor gc = grad_out.contiguous(), xc = x.contiguous(), scc = scale.contiguous();
  at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const int64_t rows_per_chunk = cpu_baseline::backward_rows_per_chunk(T, D);
  const int64_t n_chunks = (T + rows_per_chunk - 1) / rows_per_chunk;
  const auto acc_opts = x.options().dtype(opmath_dtype(x.scalar_type()));
  at::Tensor grad_x = at::empty_like(xc);
  // Every row of the partial sums is written by its chunk's first token (no zero fill).
  at::Tensor partial_shift = at::empty({B, n_chunks, D}, acc_opts);
  at::Tensor partial_scale = at::empty({B, n_chunks, D}, acc_opts);
  at::Tensor grad_shift = at::empty({B, D}, x.options());
  at::Tensor grad_scale = at::empty({B, D}, x.options());
  TMD_DISPATCH_FLOATING(x.scalar_type(), "adaln_modulate_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AdalnModulateBackwardParams<scalar_t, acc_t> p{
        gc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), scc.data_ptr<scalar_t>(), mc.data_ptr<acc_t>(),
        rc.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(), partial_shift.data_ptr<acc_t>(),
        partial_scale.data_ptr<acc_t>(), B, T, D, n_chunks};
    TMD_CPU_CALL(backward_kernel, p, rows_per_chunk, grad_shift.data_ptr<scalar_t>(),
                 grad_scale.data_ptr<scalar_t>());
  });
  return {grad_x, grad_shift, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(tmd, CPU, m) {
  m.impl("adaln_modulate", &adaln_modulate_cpu);
  m.impl("adaln_modulate_backward", &adaln_modulate_backward_cpu);
}

}  // namespace tmd
