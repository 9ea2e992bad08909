// FlowHeadLoop: the whole inner flow of one outer step (docs/design.md §1.7, Algorithm 1; §3.5),
//   y = y1;  for j = N..1:  y = y - (s_j - s_{j-1})·(y1 - head(y, s_j, s_{j-1}))
// with a Python head callable. CPU (and CUDA with use_graph=False) runs the loop eagerly with
// tmd::flow_step; CUDA captures one head step + the in-place update into a CUDA graph and replays
// it N times, feeding each step's times through static device buffers. The Python class is
// registered by bind_flow_head_loop(pybind11::module_&) in flow_head_loop.cpp.
#pragma once

#include <ATen/ATen.h>

namespace tmd {

#ifdef TMD_WITH_CUDA
// In place on the current CUDA stream: y <- y - (s-r)[b]·(y1 - head_out), the per-element math
// of flow_step (flow_step_elem, c = (double(s) - double(r)) cast to the opmath dtype).
// y, y1: contiguous [B, ...] of one float dtype; head_out: [B, ...] of that dtype (any layout);
// s, r: contiguous [B] float32/float64. All on one CUDA device. Graph-capturable (no host sync).
void flow_step_inplace_cuda(const at::Tensor& y, const at::Tensor& head_out, const at::Tensor& y1,
                            const at::Tensor& s, const at::Tensor& r);
#endif

}  // namespace tmd
