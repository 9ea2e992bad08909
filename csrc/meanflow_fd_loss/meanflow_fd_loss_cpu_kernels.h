// The loops of the meanflow_fd_loss CPU kernels. No include guard and no includes:
// meanflow_fd_loss_cpu.cpp includes this file three times, in namespaces cpu_baseline,
// cpu_avx2 and cpu_avx512 (core/cpu_vec.h), after the headers it needs.
//
// Work items are fixed (sample, chunk) pairs, so every row is uniformly "FD" or "plain" inside an
// item and the sums do not depend on the thread count: each item sums its chunk in kLanes fixed
// lanes, and the chunk partials of a sample are combined pairwise in a fixed order.

constexpr int64_t kChunk = 4096;                     // elements per work item
constexpr int64_t kGrainItems = (1 << 15) / kChunk;  // items per task, at least
constexpr int kLanes = 32;  // 4 independent AVX2 accumulators (8 lanes: one add latency per 8 terms)

template <bool FD, typename P, typename acc_t>
inline acc_t delta_at(const P& p, int64_t i, acc_t a) {
  if constexpr (FD) {
    return meanflow_fd_delta<true, acc_t>(cpu::load(p.u[i]), cpu::load(p.v[i]), cpu::load(p.u_plus[i]),
                                          cpu::load(p.u_minus[i]), a);
  } else {
    return meanflow_fd_delta<false, acc_t>(cpu::load(p.u[i]), cpu::load(p.v[i]), acc_t(0), acc_t(0), a);
  }
}

// Sum of delta^2 over [lo, hi), read through __restrict__ row pointers (which keeps the compiler
// from vectorising across the lane blocks with shuffles); with SAVE also writes delta there.
template <bool FD, bool SAVE, typename P, typename acc_t>
acc_t chunk_delta_sq(const P& p, int64_t lo, int64_t hi, acc_t a) {
  using scalar_t = std::remove_cv_t<std::remove_pointer_t<decltype(p.u)>>;
  const scalar_t* __restrict__ u = p.u + lo;
  const scalar_t* __restrict__ v = p.v + lo;
  const scalar_t* __restrict__ up = p.u_plus + lo;
  const scalar_t* __restrict__ um = p.u_minus + lo;
  acc_t* __restrict__ out = SAVE ? p.delta + lo : nullptr;
  auto term = [&](int64_t i) {
    acc_t d;
    if constexpr (FD) {
      d = meanflow_fd_delta<true, acc_t>(cpu::load(u[i]), cpu::load(v[i]), cpu::load(up[i]), cpu::load(um[i]), a);
    } else {
      d = meanflow_fd_delta<false, acc_t>(cpu::load(u[i]), cpu::load(v[i]), acc_t(0), acc_t(0), a);
    }
    if constexpr (SAVE) out[i] = d;
    return d * d;
  };
  const int64_t n = hi - lo;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += term(i + l);
  }
  for (int l = 0; i < n; ++i, ++l) lanes[l] += term(i);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) lanes[l] += lanes[l + w];
  }
  return lanes[0];
}

// Calls fn(item, b, lo, hi) for every (sample, chunk) item, in parallel: elements [lo, hi) of sample b.
template <typename F>
void for_each_chunk(int64_t batch, int64_t per, F&& fn) {
  const int64_t nchunks = (per + kChunk - 1) / kChunk;
  at::parallel_for(0, batch * nchunks, kGrainItems, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nchunks;
      const int64_t lo = b * per + (item % nchunks) * kChunk;
      fn(item, b, lo, std::min(lo + kChunk, (b + 1) * per));
    }
  });
}

// part[item] = the item's sum of delta^2 (and delta itself written to p.delta when that is set).
template <bool SAVE, typename scalar_t, typename acc_t>
void forward_partials_impl(const MeanflowFdLossParams<scalar_t, acc_t>& p, acc_t* part) {
  for_each_chunk(p.batch, p.per_sample, [&](int64_t item, int64_t b, int64_t lo, int64_t hi) {
    part[item] = p.fd[b] ? chunk_delta_sq<true, SAVE>(p, lo, hi, p.a[b])
                         : chunk_delta_sq<false, SAVE>(p, lo, hi, p.a[b]);
  });
}

template <typename scalar_t, typename acc_t>
void forward_partials(const MeanflowFdLossParams<scalar_t, acc_t>& p, acc_t* part) {
  if (p.delta) {
    forward_partials_impl<true>(p, part);
  } else {
    forward_partials_impl<false>(p, part);
  }
}

// grad_u = scale_b * delta from the saved delta: one read, one write. grad_u may be delta itself
// (meanflow_fd_loss_delta_backward_), which takes the one-pointer loop.
template <typename acc_t>
void delta_backward_kernel(const MeanflowFdLossDeltaBackwardParams<acc_t>& p) {
  const int64_t per = p.per_sample;
  const bool in_place = p.grad_u == p.delta;
  for_each_chunk(p.batch, per, [&](int64_t, int64_t b, int64_t lo, int64_t hi) {
    const acc_t scale = meanflow_fd_grad_scale(p.grad_loss[b], p.grad_mse[b], p.mse[b], static_cast<acc_t>(per), p.c);
    if (in_place) {
      acc_t* __restrict__ delta = p.grad_u;
      for (int64_t i = lo; i < hi; ++i) delta[i] = scale * delta[i];
    } else {
      const acc_t* __restrict__ delta = p.delta;
      acc_t* __restrict__ grad_u = p.grad_u;
      for (int64_t i = lo; i < hi; ++i) grad_u[i] = scale * delta[i];
    }
  });
}

template <bool FD, typename scalar_t, typename acc_t>
void backward_range(const MeanflowFdLossBackwardParams<scalar_t, acc_t>& p, int64_t lo, int64_t hi, acc_t scale,
                    acc_t a) {
  scalar_t* __restrict__ grad_u = p.grad_u;
  for (int64_t i = lo; i < hi; ++i) grad_u[i] = cpu::store<scalar_t>(scale * delta_at<FD>(p, i, a));
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const MeanflowFdLossBackwardParams<scalar_t, acc_t>& p) {
  const int64_t per = p.per_sample;
  for_each_chunk(p.batch, per, [&](int64_t, int64_t b, int64_t lo, int64_t hi) {
    const acc_t scale = meanflow_fd_grad_scale(p.grad_loss[b], p.grad_mse[b], p.mse[b], static_cast<acc_t>(per), p.c);
    if (p.fd[b]) {
      backward_range<true>(p, lo, hi, scale, p.a[b]);
    } else {
      backward_range<false>(p, lo, hi, scale, p.a[b]);
    }
  });
}
