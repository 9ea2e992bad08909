// The sm_90a CUTLASS path of gated_fusion_linear: one batched TMA + WGMMA GEMM (CUTLASS 3.x
// CollectiveBuilder, warp-specialized persistent kernel, cooperative by default) whose epilogue visitor tree
// (EVT) applies the gated fusion, so z = x·Wᵀ + b never goes to memory:
//   out[b,t,d] = m[b,t,d] + lam[b,d] * (acc[b,t,d] + bias[d] + e[b,t,d] - m[b,t,d]),
//   acc[b,t,d] = sum_k x[b,t,k] * weight[d,k]   (fp32 accumulation, fp32 epilogue math).
//
// GEMM mapping (CUTLASS names (M, N, K, L) = (T, D, K, B)):
//   A = x       [T,K] per batch, K contiguous ("row-major A"),  batch stride T*K
//   B = weight  [D,K], K contiguous ("column-major K×N B"),     batch stride 0 (static _0: the
//               TMA descriptor of B drops the L mode, every batch reads the same weight)
//   C = m       [T,D] per batch, D contiguous,                  batch stride T*D (the EVT source)
//   D = out     like C
//   lam  fp32 [B,D]  row broadcast with batch stride D
//   bias [D]         row broadcast with batch stride 0 (a compile-time variant without it)
//   e   [T,D] per batch (the optional residual), batch stride T*D: an auxiliary load of the
//               epilogue (a compile-time variant with it, whose bias pointer may be null)
// The batch is the L mode rather than folded into M so that a tile never straddles two batches
// (lam depends on b; a partial last M tile of one batch is clipped by the TMA bounds of its own
// batch instead of reading or writing the next one).
//
// Compiled only when the build targets sm_90a (setup.py defines TMD_CUTLASS_SM90 exactly when
// TORCH_CUDA_ARCH_LIST holds 9.0a, the rule build_info() reports as `cutlass_sm90`). nvcc gives
// the host pass no way to tell sm_90 from sm_90a (__CUDA_ARCH_LIST__ reads 900 for both), so the
// host-side answer of gated_fusion_linear_sm90_compiled() has to come from the build. Inside such
// a build, device passes for other archs (e.g. the 8.0 of "8.0;9.0a") still instantiate the
// kernel template, whose body CUTLASS itself compiles only under __CUDA_ARCH_FEAT_SM90_ALL; the
// host side never launches it on a device that is not compute capability 9.0.
#include "gated_fusion_linear/gated_fusion_linear_sm90.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(TMD_CUTLASS_SM90)
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"

#if defined(CUTLASS_ARCH_MMA_SM90_SUPPORTED)  // nvcc >= 12: the SM90 collectives exist
#define TMD_GFL_SM90_KERNELS 1
#endif
#endif

#ifndef TMD_GFL_SM90_KERNELS
#define TMD_GFL_SM90_KERNELS 0
#endif

namespace tmd {

#if TMD_GFL_SM90_KERNELS
namespace {

using cute::_0;
using cute::_1;
using cute::_2;
using cute::_64;
using cute::_128;
using cute::_256;

// The default schedule, "cooperative": CTA tile 128x128x64: one 64-deep K step of bf16/fp16 is a
// 128-byte row, the widest TMA/WGMMA 128B swizzle; A+B take 32 KB per stage, leaving room for ~6
// mainloop stages next to the epilogue's C/D staging buffers in 227 KB of shared memory. The
// cooperative schedule splits it over two consumer warpgroups (64x128 fp32 accumulators each, 64
// registers/thread), leaving registers for the EVT. With T = 32760 and D, K in {1536, 5120} there
// are thousands of tiles, so the persistent scheduler keeps all SMs busy and the 128-wide N tile
// divides D exactly. Its cost: both warpgroups finish a tile together and then run its epilogue
// together, so the tensor cores idle during every epilogue.
//
// Two alternatives, compiled for the model's path only (bf16 with bias and residual) and chosen at
// run time by TMD_GFL_SM90_SCHEDULE, so that the first GPU run can measure them against the default
// (bench/bench_gated_fusion_linear.py times all three):
//   "pingpong"            64x128x64 tiles, KernelTmaWarpSpecializedPingpong: each consumer
//                         warpgroup owns a whole tile, and one's epilogue overlaps the other's
//                         mainloop (CUTLASS's answer to the serialised epilogue).
//   "cooperative_128x256" 128x256x64 cooperative tiles: half the epilogue visits per FLOP and A
//                         read once per 256 columns; 128 accumulator registers per thread.
// Every other case (fp16, no bias, no residual) always uses "cooperative".
enum class Schedule { kCooperative, kPingpong, kCooperativeWide };

template <Schedule S>
struct ScheduleTraits {  // kCooperative
  using TileShape = cute::Shape<_128, _128, _64>;
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
};
template <>
struct ScheduleTraits<Schedule::kPingpong> {
  using TileShape = cute::Shape<_64, _128, _64>;
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
};
template <>
struct ScheduleTraits<Schedule::kCooperativeWide> {
  using TileShape = cute::Shape<_128, _256, _64>;
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
};

// Cluster 2x1: the two CTAs of a cluster work on vertically adjacent tiles of the same weight
// columns, so the weight tile is loaded once and TMA-multicast to both (half the weight traffic
// out of L2). The M-tile count per batch is rounded up to even: for T = 32760 it already is
// (256 tiles); for a small odd count it costs one idle tile per batch.
using ClusterShape = cute::Shape<_2, _1, _1>;

using LayoutA = cutlass::layout::RowMajor;                 // x: (M,K,L) strides (K, 1, T*K)
using StrideB = cute::Stride<int64_t, _1, _0>;             // weight: (N,K,L) strides (K, 1, 0)
using LayoutC = cutlass::layout::RowMajor;                 // m, out: (M,N,L) strides (D, 1, T*D)
using StrideLam = cute::Stride<_0, _1, int64_t>;           // lam: (M,N,L) strides (0, 1, D)
using StrideBias = cute::Stride<_0, _1, _0>;               // bias: (M,N,L) strides (0, 1, 0)

template <typename Element, bool kHasBias, bool kHasResidual = false, Schedule kSchedule = Schedule::kCooperative>
struct GatedFusionLinearGemm {
  using TileShape = typename ScheduleTraits<kSchedule>::TileShape;
  using KernelSchedule = typename ScheduleTraits<kSchedule>::Kernel;
  using EpilogueSchedule = typename ScheduleTraits<kSchedule>::Epilogue;
  static_assert(kHasBias || !kHasResidual, "the residual variant carries the bias node (null bias: zeros)");
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  static constexpr int kAlign = 16 / sizeof(Element);  // 16-byte TMA alignment, in elements

  // Epilogue visitor tree (children first, node last; each Sm90EVT<Node, Children...>):
  //   Lam  = lam[b, n]                                 fp32 row broadcast
  //   Src  = m[b, t, n]                                the C tensor (loaded once by TMA, fetched
  //                                                    by both Src leaves from registers)
  //   Z    = acc + bias[n]   (or acc without bias)     fp32
  //          (+ e[b, t, n] in the residual variant: an auxiliary load straight from global memory
  //          into registers, predicated and vectorised by CUTLASS, no shared-memory stage)
  //   Diff = Z - Src                                    fp32
  //   Out  = Lam * Diff + Src                           fp32 FMA, rounded once to Element
  using Lam = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, StrideLam>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, Element, float, StrideBias>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using Src = cutlass::epilogue::fusion::Sm90SrcFetch<Element>;
  using StrideRes = cute::Stride<int64_t, _1, int64_t>;  // e: (M,N,L) strides (D, 1, T*D)
  using Res = cutlass::epilogue::fusion::Sm90AuxLoad<0, cutlass::epilogue::collective::EpilogueTileAuto, Element,
                                                     StrideRes, void, void, kAlign>;
  using AccBias = std::conditional_t<
      kHasBias,
      cutlass::epilogue::fusion::Sm90EVT<
          cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, float, float, kRound>, Acc, Bias>,
      Acc>;
  using Z = std::conditional_t<
      kHasResidual,
      cutlass::epilogue::fusion::Sm90EVT<
          cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, float, float, kRound>, AccBias, Res>,
      AccBias>;
  using Diff = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::minus, float, float, kRound>, Z, Src>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Element, float,
                                             kRound>,
      Lam, Diff, Src>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutC, kAlign,
      Element, LayoutC, kAlign, EpilogueSchedule, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element,
      StrideB, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>,
                                                      CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static_assert(std::is_same_v<typename Kernel::StrideB, StrideB>);
  static_assert(std::is_same_v<typename Kernel::StrideA, cute::Stride<int64_t, _1, int64_t>>);
  static_assert(std::is_same_v<typename Kernel::StrideC, cute::Stride<int64_t, _1, int64_t>>);
  static_assert(std::is_same_v<typename Kernel::StrideD, cute::Stride<int64_t, _1, int64_t>>);

  static typename Fusion::Arguments fusion_arguments(const float* lam, const Element* bias,
                                                     const Element* residual, int64_t T, int64_t D) {
    typename Fusion::Arguments args;  // {Lam, Diff, Src, FMA}
    args.op_0 = {lam, 0.0f, StrideLam{_0{}, _1{}, D}};
    if constexpr (kHasResidual) {
      // Z = {AccBias, Res, plus}, AccBias = {Acc, Bias, plus}; a null bias broadcasts zeros.
      args.op_1.op_0.op_0 = {{}, {bias, Element(0), StrideBias{}}, {}};
      args.op_1.op_0.op_1 = {residual, Element(0), StrideRes{D, _1{}, T * D}};
    } else if constexpr (kHasBias) {
      args.op_1.op_0 = {{}, {bias, Element(0), StrideBias{}}, {}};  // Z = {Acc, Bias, plus}
    }
    return args;
  }

  // Runs the GEMM and returns true, or returns false before launching anything when CUTLASS's
  // can_implement declines the case (the caller then takes the generic path).
  static bool run(const at::Tensor& m, const at::Tensor& x, const at::Tensor& weight,
                  const at::Tensor* bias, const at::Tensor* residual, const at::Tensor& lam,
                  at::Tensor& out) {
    const int64_t B = m.size(0), T = m.size(1), D = m.size(2), K = x.size(2);
    const int device = m.get_device();

    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;  // batched through the L extent
    args.problem_shape = {static_cast<int>(T), static_cast<int>(D), static_cast<int>(K),
                          static_cast<int>(B)};
    args.mainloop.ptr_A = reinterpret_cast<const Element*>(x.const_data_ptr());
    args.mainloop.dA = cute::make_stride(K, _1{}, T * K);
    args.mainloop.ptr_B = reinterpret_cast<const Element*>(weight.const_data_ptr());
    args.mainloop.dB = StrideB{K, _1{}, _0{}};
    args.epilogue.thread = fusion_arguments(
        lam.const_data_ptr<float>(),
        bias != nullptr ? reinterpret_cast<const Element*>(bias->const_data_ptr()) : nullptr,
        residual != nullptr ? reinterpret_cast<const Element*>(residual->const_data_ptr()) : nullptr, T,
        D);
    args.epilogue.ptr_C = reinterpret_cast<const Element*>(m.const_data_ptr());
    args.epilogue.dC = cute::make_stride(D, _1{}, T * D);
    args.epilogue.ptr_D = reinterpret_cast<Element*>(out.data_ptr());
    args.epilogue.dD = cute::make_stride(D, _1{}, T * D);
    args.hw_info.device_id = device;
    args.hw_info.sm_count = at::cuda::getDeviceProperties(device)->multiProcessorCount;

    Gemm gemm;
    cutlass::Status status = gemm.can_implement(args);
    if (status != cutlass::Status::kSuccess) return false;  // e.g. a TMA box or alignment it rejects

    const size_t workspace_bytes = Gemm::get_workspace_size(args);
    at::Tensor workspace;
    if (workspace_bytes > 0) {
      workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, m.options().dtype(at::kByte));
    }
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device).stream();
    status = gemm.initialize(args, workspace_bytes > 0 ? workspace.data_ptr() : nullptr, stream);
    TORCH_CHECK(status == cutlass::Status::kSuccess,
                "gated_fusion_linear (sm90 CUTLASS): initialize failed: ",
                cutlass::cutlassGetStatusString(status), " (", cudaGetErrorString(cudaGetLastError()),
                ")");
    status = gemm.run(stream);
    TORCH_CHECK(status == cutlass::Status::kSuccess,
                "gated_fusion_linear (sm90 CUTLASS): kernel launch failed: ",
                cutlass::cutlassGetStatusString(status), " (", cudaGetErrorString(cudaGetLastError()),
                ")");
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
};

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

bool fits_int(int64_t v) { return v <= std::numeric_limits<int>::max(); }

// TMD_GFL_SM90_SCHEDULE, read at every call (a getenv, so a benchmark can switch it between cases).
Schedule requested_schedule() {
  const char* v = std::getenv("TMD_GFL_SM90_SCHEDULE");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "cooperative") == 0) return Schedule::kCooperative;
  if (std::strcmp(v, "pingpong") == 0) return Schedule::kPingpong;
  if (std::strcmp(v, "cooperative_128x256") == 0) return Schedule::kCooperativeWide;
  TORCH_CHECK(false, "TMD_GFL_SM90_SCHEDULE='", v,
              "': expected one of cooperative (the default), pingpong, cooperative_128x256");
}

}  // namespace
#endif  // TMD_GFL_SM90_KERNELS

bool gated_fusion_linear_sm90_compiled() { return TMD_GFL_SM90_KERNELS != 0; }

bool gated_fusion_linear_sm90(const at::Tensor& m, const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, const at::Tensor& lam,
                              at::Tensor& out) {
#if !TMD_GFL_SM90_KERNELS
  (void)m, (void)x, (void)weight, (void)bias, (void)residual, (void)lam, (void)out;
  return false;
#else
  const at::Tensor* b = bias.has_value() && bias->defined() ? &*bias : nullptr;
  const at::Tensor* e = residual.has_value() && residual->defined() ? &*residual : nullptr;
  TORCH_CHECK(e == nullptr || (e->sizes() == m.sizes() && e->scalar_type() == m.scalar_type() &&
                               e->device() == m.device() && e->is_contiguous()),
              "gated_fusion_linear_sm90: residual must be a contiguous tensor like m (", m.sizes(), ", ",
              m.scalar_type(), "), got ", e->sizes(), ", ", e->scalar_type());

  // The caller's contract (checked, not a fallback condition).
  TORCH_CHECK(m.dim() == 3 && x.dim() == 3 && weight.dim() == 2 && lam.dim() == 2 &&
                  out.dim() == 3,
              "gated_fusion_linear_sm90: expected m [B,T,D], x [B,T,K], weight [D,K], lam [B,D], "
              "out [B,T,D]; got m ", m.sizes(), ", x ", x.sizes(), ", weight ", weight.sizes(),
              ", lam ", lam.sizes(), ", out ", out.sizes());
  const int64_t B = m.size(0), T = m.size(1), D = m.size(2), K = x.size(2);
  TORCH_CHECK(x.size(0) == B && x.size(1) == T && weight.size(0) == D && weight.size(1) == K &&
                  lam.size(0) == B && lam.size(1) == D && out.sizes() == m.sizes() &&
                  (b == nullptr || (b->dim() == 1 && b->size(0) == D)),
              "gated_fusion_linear_sm90: inconsistent shapes: m ", m.sizes(), ", x ", x.sizes(),
              ", weight ", weight.sizes(), ", bias ", b ? b->sizes() : at::IntArrayRef{}, ", lam ",
              lam.sizes(), ", out ", out.sizes());
  TORCH_CHECK(x.scalar_type() == m.scalar_type() && weight.scalar_type() == m.scalar_type() &&
                  out.scalar_type() == m.scalar_type() &&
                  (b == nullptr || b->scalar_type() == m.scalar_type()),
              "gated_fusion_linear_sm90: x, weight, bias and out must have the dtype of m (",
              m.scalar_type(), ")");
  TORCH_CHECK(lam.scalar_type() == at::kFloat, "gated_fusion_linear_sm90: lam must be float32, got ",
              lam.scalar_type());
  TORCH_CHECK(m.is_cuda(), "gated_fusion_linear_sm90: m must be a CUDA tensor, got ", m.device());
  for (const at::Tensor* t : {&x, &weight, &lam, static_cast<const at::Tensor*>(&out), b}) {
    if (t != nullptr) {
      TORCH_CHECK(t->device() == m.device(),
                  "gated_fusion_linear_sm90: all tensors must be on the device of m (", m.device(),
                  "), got one on ", t->device());
    }
  }
  for (const at::Tensor* t : {&m, &x, &weight, &lam, static_cast<const at::Tensor*>(&out), b}) {
    if (t != nullptr) {
      TORCH_CHECK(t->is_contiguous(), "gated_fusion_linear_sm90: all tensors must be contiguous");
    }
  }

  // Cases this kernel does not cover: the caller takes the cuBLAS + elementwise path.
  const at::ScalarType dtype = m.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(m.get_device());
  if (prop->major != 9 || prop->minor != 0) return false;
  if (B < 1 || T < 1 || D < 1 || K < 1) return false;
  if (!fits_int(B) || !fits_int(T) || !fits_int(D) || !fits_int(K)) return false;
  if (K % 8 != 0 || D % 8 != 0) return false;  // 16-byte TMA rows of x, weight, m, out
  for (const at::Tensor* t : {&m, &x, &weight, &lam, static_cast<const at::Tensor*>(&out), b, e}) {
    if (t != nullptr && !aligned16(*t)) return false;
  }

  const c10::cuda::CUDAGuard guard(m.device());
  const Schedule schedule = requested_schedule();
  if (dtype == at::kBFloat16) {
    using E = cutlass::bfloat16_t;
    if (e != nullptr && b != nullptr && schedule == Schedule::kPingpong) {
      return GatedFusionLinearGemm<E, true, true, Schedule::kPingpong>::run(m, x, weight, b, e, lam, out);
    }
    if (e != nullptr && b != nullptr && schedule == Schedule::kCooperativeWide) {
      return GatedFusionLinearGemm<E, true, true, Schedule::kCooperativeWide>::run(m, x, weight, b, e, lam,
                                                                                   out);
    }
    if (e != nullptr) return GatedFusionLinearGemm<E, true, true>::run(m, x, weight, b, e, lam, out);
    if (b != nullptr) return GatedFusionLinearGemm<E, true>::run(m, x, weight, b, nullptr, lam, out);
    return GatedFusionLinearGemm<E, false>::run(m, x, weight, nullptr, nullptr, lam, out);
  }
  using E = cutlass::half_t;
  if (e != nullptr) return GatedFusionLinearGemm<E, true, true>::run(m, x, weight, b, e, lam, out);
  if (b != nullptr) return GatedFusionLinearGemm<E, true>::run(m, x, weight, b, nullptr, lam, out);
  return GatedFusionLinearGemm<E, false>::run(m, x, weight, nullptr, nullptr, lam, out);
#endif
}

}  // namespace tmd
