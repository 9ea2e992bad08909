// FlowHeadLoop (Python class tmd_ext.FlowHeadLoop): the persistent inner-flow recurrence of one
// outer step, docs/design.md §1.7 (Algorithm 1) and §3.5:
//   y = y1;  for j = N..1:  y = flow_step(y, head(y, s_j, s_{j-1}), y1, s_j, s_{j-1})
// where flow_step(y, h, y1, s, r) = y - (s-r)·(y1 - h) and head is a Python callable.
//
// CPU, or CUDA with use_graph=False: the loop runs eagerly, calling the head N times and
// torch.ops.tmd.flow_step after each (GIL released around the update).
// CUDA (default): static buffers y_buf, y1_buf [B, ...] and sr_buf [2, B] (s_buf = sr_buf[0],
// r_buf = sr_buf[1]) plus a device table of every step's times [N, 2, B]. On the first call one
// head step, head(y_buf, s_buf, r_buf) followed by the in-place update of y_buf, is run `warmup`
// times on a side stream and then captured there into a CUDA graph (a private memory pool, owned
// by the graph and released with it). Every call then copies y1 into y1_buf and, on the current
// stream with the GIL released: y_buf <- y1_buf, and per step an async device-to-device copy of
// (s_j, s_{j-1}) into sr_buf followed by a graph replay. No host synchronisation, no Python
// between steps.
#include <torch/extension.h>

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/DynamicTypes.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#ifdef TMD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#include "core/checks.h"
#include "flow_head_loop/flow_head_loop.h"

namespace tmd {
namespace {

std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    os << (i ? ", " : "") << sizes[i];
  }
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

std::string type_name(const py::handle& obj) {
  return py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>();
}

std::string dtype_str(at::ScalarType t) {
  return py::str(py::handle(reinterpret_cast<PyObject*>(torch::getTHPDtype(t)))).cast<std::string>();
}

// `obj` as a tensor, or a TypeError naming `name`.
at::Tensor as_tensor(const py::handle& obj, const char* name) {
  py::detail::make_caster<at::Tensor> caster;
  if (!caster.load(obj, /*convert=*/false)) {
    throw py::type_error(std::string(name) + " must be a torch.Tensor, got " + type_name(obj));
  }
  return py::detail::cast_op<at::Tensor>(caster);
}

// Throws the ValueError `msg` when `cond` is false.
void require(bool cond, const std::string& msg) {
  if (!cond) {
    throw py::value_error(msg);
  }
}

// Sets a flag for the duration of a call; a second (re-entrant or concurrent) call fails.
class BusyGuard {
 public:
  explicit BusyGuard(std::atomic<bool>& flag) : flag_(flag) {
    if (flag_.exchange(true)) {
      throw std::runtime_error(
          "FlowHeadLoop is already running: calls must not overlap (a head that calls its own "
          "loop, or two threads sharing one loop)");
    }
  }
  ~BusyGuard() { flag_.store(false); }
  BusyGuard(const BusyGuard&) = delete;
  BusyGuard& operator=(const BusyGuard&) = delete;

 private:
  std::atomic<bool>& flag_;
};

using FlowStepFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&);

class FlowHeadLoop {
 public:
  FlowHeadLoop(py::object head, const py::object& shape, const py::object& dtype, const py::object& device,
               const py::object& s_grid, std::optional<bool> use_graph, int64_t warmup)
      : head_(std::move(head)), dtype_(at::kFloat), device_(at::kCPU), warmup_(warmup) {
    if (PyCallable_Check(head_.ptr()) != 1) {
      throw py::type_error("head must be callable as head(y, s, r) -> head_out, got " + type_name(head_));
    }
    parse_shape(shape);
    parse_dtype(dtype);
    parse_device(device);
    parse_s_grid(s_grid);
    const bool cuda = device_.is_cuda();
    require(!(use_graph.value_or(false) && !cuda),
            "use_graph=True needs a CUDA device (CUDA graphs), got device " + device_.str());
    use_graph_ = use_graph.value_or(cuda);
    require(warmup_ >= 1, "warmup must be >= 1 (head evaluations before the graph capture), got " +
                              std::to_string(warmup_));
  }

  // y0 = inner flow from y1; y1 [B, ...] of the static shape/dtype/device. Returns a new tensor.
  at::Tensor call(const py::object& y1_obj) {
    at::Tensor y1 = as_tensor(y1_obj, "y1");
    require(y1.scalar_type() == dtype_, "y1 must have dtype " + dtype_str(dtype_) + " (the loop's dtype), got " +
                                            dtype_str(y1.scalar_type()));
    require(y1.device() == device_, "y1 must be on device " + device_.str() + " (the loop's device), got " +
                                        y1.device().str());
    require(y1.sizes() == at::IntArrayRef(shape_), "y1 must have shape " + shape_str(shape_) +
                                                       " (the loop's shape), got " + shape_str(y1.sizes()));
    BusyGuard busy(busy_);
    at::NoGradGuard no_grad;
#ifdef TMD_WITH_CUDA
    if (use_graph_) {
      return run_graph(y1);
    }
#endif
    return run_eager(y1);
  }

  int64_t num_steps() const { return num_steps_; }
  int64_t num_head_calls() const { return num_head_calls_; }
  int64_t num_warmup_calls() const { return num_warmup_calls_; }
  int64_t warmup() const { return warmup_; }
  bool uses_graph() const { return use_graph_; }
  bool captured() const {
#ifdef TMD_WITH_CUDA
    return graph_ != nullptr;
#else
    return false;
#endif
  }
  py::tuple shape() const { return py::tuple(py::cast(shape_)); }
  at::ScalarType dtype() const { return dtype_; }
  at::Device device() const { return device_; }
  at::Tensor s_grid() const { return s_grid_.clone(); }

  std::string repr() const {
    std::ostringstream os;
    os << "FlowHeadLoop(shape=" << shape_str(shape_) << ", dtype=" << dtype_str(dtype_)
       << ", device=" << device_.str() << ", num_steps=" << num_steps_
       << ", uses_graph=" << (use_graph_ ? "True" : "False") << ", captured=" << (captured() ? "True" : "False")
       << ", num_head_calls=" << num_head_calls_ << ")";
    return os.str();
  }

 private:
  void parse_shape(const py::object& shape) {
    try {
      shape_ = shape.cast<std::vector<int64_t>>();
    } catch (const py::cast_error&) {
      throw py::type_error("shape must be a sequence of ints [B, ...], got " + type_name(shape));
    }
    require(!shape_.empty(), "shape must be [B, ...] with at least 1 dimension, got ()");
    for (int64_t d : shape_) {
      require(d >= 1, "shape must have every size >= 1, got " + shape_str(shape_));
    }
  }

  void parse_dtype(const py::object& dtype) {
    if (!THPDtype_Check(dtype.ptr())) {
      throw py::type_error("dtype must be a torch.dtype, got " + type_name(dtype));
    }
    dtype_ = reinterpret_cast<THPDtype*>(dtype.ptr())->scalar_type;
    require(is_float_dtype(dtype_),
            "dtype must be torch.float32, float64, float16 or bfloat16, got " + dtype_str(dtype_));
  }

  void parse_device(const py::object& device) {
    if (THPDevice_Check(device.ptr())) {
      device_ = reinterpret_cast<THPDevice*>(device.ptr())->device;
    } else if (py::isinstance<py::str>(device)) {
      try {
        device_ = at::Device(device.cast<std::string>());
      } catch (const c10::Error&) {
        throw py::value_error("device must be a valid device string such as 'cpu' or 'cuda:0', got '" +
                              device.cast<std::string>() + "'");
      }
    } else {
      throw py::type_error("device must be a torch.device or a str, got " + type_name(device));
    }
    require(device_.is_cpu() || device_.is_cuda(), "device must be a CPU or CUDA device, got " + device_.str());
    if (device_.is_cuda()) {
#ifdef TMD_WITH_CUDA
      const auto count = c10::cuda::device_count();
      require(count > 0, "device " + device_.str() + " was requested but no CUDA device is available");
      if (!device_.has_index()) {
        device_ = at::Device(at::kCUDA, c10::cuda::current_device());
      }
      require(device_.index() < count, "device " + device_.str() + " does not exist (" + std::to_string(count) +
                                           " CUDA devices)");
#else
      throw py::value_error("device " + device_.str() + " needs tmd_ext built with CUDA; this build is CPU-only");
#endif
    }
  }

  // s_grid [N+1]: float32/float64, finite, strictly increasing, inside [0, 1]. Builds the per-step
  // table times_[k] = (s_{N-k}, s_{N-k-1}) broadcast over the batch, and views of its rows.
  void parse_s_grid(const py::object& obj) {
    at::Tensor g = as_tensor(obj, "s_grid");
    require(g.dim() == 1, "s_grid must be 1-D [N+1], got shape " + shape_str(g.sizes()));
    require(g.numel() >= 2, "s_grid must have at least 2 points (N >= 1 inner steps), got " +
                                std::to_string(g.numel()));
    require(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble,
            "s_grid must have dtype torch.float32 or torch.float64, got " + dtype_str(g.scalar_type()));
    at::Tensor host = g.detach().to(at::kCPU, at::kDouble).contiguous();
    const double* v = host.const_data_ptr<double>();
    const int64_t n = host.numel();
    for (int64_t i = 0; i < n; ++i) {
      require(std::isfinite(v[i]), "s_grid must be finite, got " + std::to_string(v[i]) + " at index " +
                                       std::to_string(i));
      require(v[i] >= 0.0 && v[i] <= 1.0, "s_grid must lie in [0, 1], got " + std::to_string(v[i]) +
                                              " at index " + std::to_string(i));
      require(i == 0 || v[i] > v[i - 1], "s_grid must be strictly increasing, got s_grid[" + std::to_string(i - 1) +
                                             "] = " + std::to_string(v[i - 1]) + " >= s_grid[" + std::to_string(i) +
                                             "] = " + std::to_string(v[i]));
    }
    num_steps_ = n - 1;
    at::Tensor grid = g.detach().to(at::kCPU).contiguous();
    at::Tensor hi = grid.index_select(0, at::arange(num_steps_, 0, -1, at::kLong));
    at::Tensor lo = grid.index_select(0, at::arange(num_steps_ - 1, -1, -1, at::kLong));
    const int64_t batch = shape_[0];
    times_ = at::stack({hi, lo}, 1).unsqueeze(-1).expand({num_steps_, 2, batch}).contiguous().to(device_);
    s_grid_ = grid.to(device_);
    for (int64_t k = 0; k < num_steps_; ++k) {
      s_steps_.push_back(times_[k][0]);
      r_steps_.push_back(times_[k][1]);
    }
  }

  // head(y, s, r) with the GIL held; the result checked against the static shape/dtype/device.
  at::Tensor call_head(const at::Tensor& y, const at::Tensor& s, const at::Tensor& r) {
    py::object out = head_(y, s, r);
    py::detail::make_caster<at::Tensor> caster;
    if (!caster.load(out, /*convert=*/false)) {
      throw py::type_error("head must return a torch.Tensor (head_out [B, ...]), got " + type_name(out));
    }
    at::Tensor h = py::detail::cast_op<at::Tensor>(caster);
    require(h.sizes() == at::IntArrayRef(shape_), "head returned a tensor of shape " + shape_str(h.sizes()) +
                                                      ", expected " + shape_str(shape_) + " (the shape of y)");
    require(h.scalar_type() == dtype_, "head returned a tensor of dtype " + dtype_str(h.scalar_type()) +
                                           ", expected " + dtype_str(dtype_) + " (the dtype of y)");
    require(h.device() == device_, "head returned a tensor on device " + h.device().str() + ", expected " +
                                       device_.str() + " (the device of y)");
    return h;
  }

  at::Tensor run_eager(const at::Tensor& y1) {
    static const auto flow_step =
        c10::Dispatcher::singleton().findSchemaOrThrow("tmd::flow_step", "").typed<FlowStepFn>();
    at::Tensor y = y1;
    for (int64_t k = 0; k < num_steps_; ++k) {
      const at::Tensor& s = s_steps_[k];
      const at::Tensor& r = r_steps_[k];
      at::Tensor h = call_head(y, s, r);
      {
        py::gil_scoped_release nogil;
        // Inference only: straight to the CPU/CUDA kernel, skipping the (Python) autograd kernel.
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        y = flow_step.call(y, h, y1, s, r);
      }
      ++num_head_calls_;
    }
    return y;
  }

#ifdef TMD_WITH_CUDA
  void allocate_buffers(const c10::cuda::CUDAStream& stream) {
    const auto opts = at::TensorOptions().dtype(dtype_).device(device_);
    y_buf_ = at::empty(shape_, opts);
    y1_buf_ = at::empty(shape_, opts);
    sr_buf_ = at::empty({2, shape_[0]}, opts.dtype(times_.scalar_type()));
    s_buf_ = sr_buf_[0];
    r_buf_ = sr_buf_[1];
    buf_stream_ = stream.id();
  }

  // Async device-to-device copy of step k's (s, r) rows into sr_buf on `stream`.
  void load_times(int64_t k, const c10::cuda::CUDAStream& stream) {
    const size_t bytes = static_cast<size_t>(sr_buf_.numel()) * sr_buf_.element_size();
    const char* src = static_cast<const char*>(times_.const_data_ptr()) + static_cast<size_t>(k) * bytes;
    C10_CUDA_CHECK(cudaMemcpyAsync(sr_buf_.data_ptr(), src, bytes, cudaMemcpyDeviceToDevice, stream.stream()));
  }

  // One head step on the static buffers, on the current stream (GIL held).
  void head_step() {
    at::Tensor h = call_head(y_buf_, s_buf_, r_buf_);
    flow_step_inplace_cuda(y_buf_, h, y1_buf_, s_buf_, r_buf_);
  }

  // Warm-up and capture of head_step() on a side stream ordered after `cur`; `cur` then waits
  // for the side stream. y_buf and y1_buf hold real values (set by the caller on `cur`).
  void capture(const c10::cuda::CUDAStream& cur) {
    c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_.index());
    at::cuda::CUDAEvent ready;
    ready.record(cur);
    ready.block(side);
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      for (int64_t w = 0; w < warmup_; ++w) {
        load_times(0, side);
        head_step();
        ++num_warmup_calls_;
      }
      // Warm-up work (lazy library init, allocator frees) finishes, and Python garbage holding
      // CUDA memory is freed, before the capture starts (as torch.cuda.graph does).
      side.synchronize();
      py::module_::import("gc").attr("collect")();
      auto graph = std::make_unique<at::cuda::CUDAGraph>();
      graph->capture_begin();
      try {
        head_step();
      } catch (py::error_already_set& e) {
        end_failed_capture(*graph);
        py::raise_from(e, PyExc_RuntimeError,
                       "FlowHeadLoop: capturing the head step into a CUDA graph failed; the head must be "
                       "CUDA-graph capturable (static shapes, no host synchronisation such as .item() or "
                       "CPU tensors). use_graph=False runs the loop eagerly.");
        throw py::error_already_set();
      } catch (...) {
        end_failed_capture(*graph);
        throw;
      }
      graph->capture_end();
      ++num_warmup_calls_;
      graph_ = std::move(graph);
    }
    at::cuda::CUDAEvent done;
    done.record(side);
    done.block(cur);
  }

  // Ends a capture abandoned by an exception so the stream leaves capture mode; the error of the
  // capture itself is the one reported, so a failure here is dropped. The graph (and its memory
  // pool) is released when the caller's unique_ptr goes out of scope.
  static void end_failed_capture(at::cuda::CUDAGraph& graph) {
    try {
      graph.capture_end();
    } catch (const std::exception&) {
      (void)cudaGetLastError();
    }
  }

  at::Tensor run_graph(const at::Tensor& y1) {
    const c10::cuda::CUDAGuard guard(device_);
    const c10::cuda::CUDAStream cur = c10::cuda::getCurrentCUDAStream(device_.index());
    if (!y_buf_.defined()) {
      allocate_buffers(cur);
    } else if (cur.id() != buf_stream_) {
      // Used on another stream than the one they were allocated on: keep them from being reused
      // before that stream's work is done when the loop is freed.
      for (at::Tensor* b : {&y_buf_, &y1_buf_, &sr_buf_}) {
        b->record_stream(cur);
      }
    }
    y1_buf_.copy_(y1);
    if (!graph_) {
      y_buf_.copy_(y1_buf_);
      capture(cur);
    }
    py::gil_scoped_release nogil;
    y_buf_.copy_(y1_buf_);
    for (int64_t k = 0; k < num_steps_; ++k) {
      load_times(k, cur);
      graph_->replay();
      ++num_head_calls_;
    }
    return y_buf_.clone();
  }
#endif

  py::object head_;
  std::vector<int64_t> shape_;
  at::ScalarType dtype_;
  at::Device device_;
  at::Tensor s_grid_;               // [N+1] on device_
  at::Tensor times_;                // [N, 2, B] on device_: row k = (s_{N-k}, s_{N-k-1})
  std::vector<at::Tensor> s_steps_;  // times_[k][0], [B] views
  std::vector<at::Tensor> r_steps_;  // times_[k][1]
  int64_t num_steps_ = 0;
  bool use_graph_ = false;
  int64_t warmup_;
  int64_t num_head_calls_ = 0;
  int64_t num_warmup_calls_ = 0;
  std::atomic<bool> busy_{false};
#ifdef TMD_WITH_CUDA
  at::Tensor y_buf_, y1_buf_, sr_buf_, s_buf_, r_buf_;
  c10::StreamId buf_stream_ = 0;
  std::unique_ptr<at::cuda::CUDAGraph> graph_;
#endif
};

constexpr const char* kClassDoc = R"doc(
The whole inner flow of one outer step (docs/design.md §1.7, Algorithm 1; §3.5) run by C++:

    y = y1;  for j = N..1:  y = y - (s_j - s_{j-1})·(y1 - head(y, s_j, s_{j-1}))

i.e. ``y = tmd_ext.flow_step(y, head(y, s, r), y1, s, r)`` with ``s = s_grid[j]``,
``r = s_grid[j-1]`` broadcast to ``[B]`` tensors of ``s_grid``'s dtype. Inference only (runs
under ``torch.no_grad()``; the output does not require grad).

FlowHeadLoop(head, shape, dtype, device, s_grid, *, use_graph=None, warmup=2)

Args:
    head: callable ``head(y [B, ...], s [B], r [B]) -> head_out [B, ...]`` of ``shape``, ``dtype``
        and ``device`` (the student's flow head with the backbone features bound in a closure).
    shape: the static shape ``[B, ...]`` of ``y1`` (latents are ``[B, C, F, H, W]``).
    dtype: float32, float64, float16 or bfloat16.
    device: ``torch.device`` or str, CPU or CUDA.
    s_grid: 1-D ``[N+1]`` float32/float64 tensor, finite, strictly increasing in ``[0, 1]``
        (``s_grid[0] = 0`` ... ``s_grid[N] ≈ 1``); ``N`` head evaluations per call.
    use_graph: CUDA graph path (default on CUDA; ``True`` on CPU is an error). ``False`` runs
        the loop eagerly like on CPU.
    warmup: head evaluations on a side stream before the one-time capture (>= 1).

CUDA graph path: on the first call one head step (``head(y_buf, s_buf, r_buf)`` then the fused
in-place ``flow_step`` update of ``y_buf``) is captured into a CUDA graph; every call replays it
``N`` times on the current stream, feeding each step's times by an async device-to-device copy
into ``s_buf``/``r_buf``: no host synchronisation and no Python between steps. The head must be
capturable (static shapes, no ``.item()``/host sync). The graph replays the exact kernels and
addresses it captured: any other tensor the head reads (backbone features, text context, ...)
must stay at a fixed address — update it in place (``feats.copy_(new)``) between calls, never
rebind the closure to a new tensor. A capture that fails leaves the loop uncaptured; the next call
tries again.

Call ``loop(y1)`` with ``y1`` of ``shape``, ``dtype`` and ``device``; returns a new tensor ``y0``.
Calls must not overlap (not thread-safe, not re-entrant).
)doc";

}  // namespace

void bind_flow_head_loop(py::module_& m) {
  py::class_<FlowHeadLoop>(m, "FlowHeadLoop", kClassDoc)
      .def(py::init<py::object, const py::object&, const py::object&, const py::object&, const py::object&,
                    std::optional<bool>, int64_t>(),
           py::arg("head"), py::arg("shape"), py::arg("dtype"), py::arg("device"), py::arg("s_grid"), py::kw_only(),
           py::arg("use_graph") = py::none(), py::arg("warmup") = 2)
      .def("__call__", &FlowHeadLoop::call, py::arg("y1"),
           "Run the N inner steps from y1 [B, ...]; returns y0 [B, ...] (a new tensor).")
      .def("__repr__", &FlowHeadLoop::repr)
      .def_property_readonly("num_steps", &FlowHeadLoop::num_steps, "N, head evaluations per call.")
      .def_property_readonly("num_head_calls", &FlowHeadLoop::num_head_calls,
                             "Head evaluations of the inner flows run so far (N per call; graph replays count).")
      .def_property_readonly("num_warmup_calls", &FlowHeadLoop::num_warmup_calls,
                             "Extra evaluations of the callable spent on warm-up and capture (CUDA graph path).")
      .def_property_readonly("warmup", &FlowHeadLoop::warmup)
      .def_property_readonly("uses_graph", &FlowHeadLoop::uses_graph, "Whether calls replay a CUDA graph.")
      .def_property_readonly("captured", &FlowHeadLoop::captured, "Whether the CUDA graph has been captured.")
      .def_property_readonly("shape", &FlowHeadLoop::shape)
      .def_property_readonly("dtype", &FlowHeadLoop::dtype)
      .def_property_readonly("device", &FlowHeadLoop::device)
      .def_property_readonly("s_grid", &FlowHeadLoop::s_grid, "A copy of the time grid [N+1].");
}

}  // namespace tmd
