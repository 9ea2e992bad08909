// The Python module `tmd_ext._C`: loading it registers the ops (torch_bindings.cpp and the
// kernel files); pybind11 binds what is not an op.
#include <torch/extension.h>

#include "core/cpu_vec.h"

#ifdef TMD_WITH_CUDA
#include <cuda.h>  // CUDA_VERSION
#endif

#ifndef TMD_TORCH_VERSION
#define TMD_TORCH_VERSION "unknown"
#endif
#ifndef TMD_CUDA_ARCHS
#define TMD_CUDA_ARCHS ""
#endif
#ifndef TMD_CUTLASS_VERSION
#define TMD_CUTLASS_VERSION ""
#endif

namespace tmd {
void bind_flow_head_loop(py::module_& m);  // csrc/flow_head_loop/flow_head_loop.cpp
}  // namespace tmd

namespace {
py::dict build_info() {
  py::dict d;
  d["torch_version"] = TMD_TORCH_VERSION;
#ifdef TMD_WITH_CUDA
  d["cuda_compiled"] = true;
  d["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION % 1000) / 10);
#else
  d["cuda_compiled"] = false;
  d["cuda_version"] = py::none();
#endif
  d["cuda_archs"] = TMD_CUDA_ARCHS;
  d["cutlass_version"] = TMD_CUTLASS_VERSION;
  // the build of the CPU kernels this process runs (core/cpu_vec.h)
  static const char* const kLevels[] = {"baseline", "avx2", "avx512"};
  d["cpu_kernels"] = kLevels[tmd::cpu::vector_level()];
  d["cxx"] =
#if defined(__clang__)
      std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
      std::string("gcc ") + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__);
#else
      std::string("unknown");
#endif
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tmd_ext compiled ops (torch.ops.tmd.*) and helpers";
  m.def("build_info", &build_info, "What this library was built with (torch, CUDA archs, CUTLASS).");
  tmd::bind_flow_head_loop(m);
}
