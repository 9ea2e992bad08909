// The loops of the flow_step CPU kernels. No include guard and no includes: flow_step_cpu.cpp
// includes this file three times, in namespaces cpu_baseline, cpu_avx2 and cpu_avx512
// (core/cpu_vec.h), after the headers it needs. A task's range of the flattened [B*per] elements
// is cut at sample boundaries, so each inner loop is a plain contiguous loop with one coefficient
// (vectorised).

constexpr int64_t kGrain = 1 << 14;

// Calls fn(b, lo, hi) for the pieces of [begin, end) inside sample b (elements [lo, hi)).
template <typename F>
inline void for_each_sample_piece(int64_t begin, int64_t end, int64_t per, F&& fn) {
  for (int64_t lo = begin; lo < end;) {
    const int64_t b = lo / per, hi = std::min(end, (b + 1) * per);
    fn(b, lo, hi);
    lo = hi;
  }
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const FlowStepParams<scalar_t, acc_t>& p) {
  at::parallel_for(0, p.batch * p.per_sample, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, p.per_sample, [&](int64_t b, int64_t lo, int64_t hi) {
      const acc_t c = p.c[b];
      const scalar_t* __restrict__ y = p.y;
      const scalar_t* __restrict__ h = p.head_out;
      const scalar_t* __restrict__ y1 = p.y1;
      scalar_t* __restrict__ out = p.out;
      for (int64_t i = lo; i < hi; ++i) {
        out[i] = cpu::store<scalar_t>(flow_step_elem<acc_t>(cpu::load(y[i]), cpu::load(h[i]), cpu::load(y1[i]), c));
      }
    });
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const FlowStepBackwardParams<scalar_t, acc_t>& p) {
  at::parallel_for(0, p.batch * p.per_sample, kGrain, [&](int64_t begin, int64_t end) {
    for_each_sample_piece(begin, end, p.per_sample, [&](int64_t b, int64_t lo, int64_t hi) {
      const acc_t c = p.c[b];
      const scalar_t* __restrict__ g = p.grad_out;
      scalar_t* __restrict__ gh = p.grad_head_out;
      scalar_t* __restrict__ gy1 = p.grad_y1;
      for (int64_t i = lo; i < hi; ++i) {
        const acc_t gi = cpu::load(g[i]) * c;
        gh[i] = cpu::store<scalar_t>(gi);
        gy1[i] = cpu::store<scalar_t>(-gi);
      }
    });
  });
}
