// The loops of the adaln_modulate CPU kernels. No include guard and no includes:
// adaln_modulate_cpu.cpp includes this file three times, in namespaces cpu_baseline, cpu_avx2 and
// cpu_avx512 (core/cpu_vec.h), after the headers it needs. Inner loops are plain contiguous loops
// over d; row sums use kLanes interleaved partial sums added pairwise in a fixed order
// (vectorisable, and the same order in every build). 32 lanes are 4 independent AVX2 accumulators
// (2 of AVX-512): with 8, every add waited for the previous one's latency and the forward ran at
// half torch.compile's speed.

constexpr int64_t kGrainElems = 1 << 14;
constexpr int kLanes = 32;
// At most this many backward chunks per sample: enough tasks for any CPU, and partial column sums
// of at most 2 x kMaxChunks x D opmath values per sample, instead of one pair of rows per
// kGrainElems elements (T = 1024, D = 1536: 1.3 MB of partials, allocated and zeroed per call).
constexpr int64_t kMaxChunks = 64;

// Tokens per backward chunk: a function of the shape only (never of the thread count), so the
// order of the column sums, and the result, is the same on every machine.
inline int64_t backward_rows_per_chunk(int64_t T, int64_t D) {
  const int64_t by_grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, D));
  return std::max(by_grain, (T + kMaxChunks - 1) / kMaxChunks);
}

// Σ_d a[d] (kSquare: Σ_d (a[d] - shift)², kProduct: Σ_d a[d]·b[d]) in kLanes lanes.
template <int kMode, typename acc_t>
acc_t lane_sum(const acc_t* __restrict__ a, const acc_t* __restrict__ b, acc_t shift, int64_t n) {
  acc_t lanes[kLanes] = {};
  auto term = [&](int64_t d) {
    if constexpr (kMode == 0) {
      return a[d];
    } else if constexpr (kMode == 1) {
      const acc_t c = a[d] - shift;
      return c * c;
    } else {
      return a[d] * b[d];
    }
  };
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += term(d + k);
  }
  for (int k = 0; d < n; ++d, ++k) lanes[k] += term(d);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) lanes[k] += lanes[k + w];
  }
  return lanes[0];
}
constexpr int kSum = 0, kSquares = 1, kDot = 2;

// Rows [r0, r1) of the forward; `xf` [D] is scratch for a row in acc_t (converted once).
template <typename scalar_t, typename acc_t>
void forward_rows(const AdalnModulateParams<scalar_t, acc_t>& p, int64_t r0, int64_t r1, acc_t* __restrict__ xf) {
  const int64_t D = p.dim;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t b = row / p.tokens;
    const scalar_t* __restrict__ x = p.x + row * D;
    const scalar_t* __restrict__ shift = p.shift + b * D;
    const scalar_t* __restrict__ scale = p.scale + b * D;
    scalar_t* __restrict__ out = p.out + row * D;
    for (int64_t d = 0; d < D; ++d) xf[d] = cpu::load(x[d]);
    const acc_t mean = lane_sum<kSum>(xf, xf, acc_t(0), D) / D;
    const acc_t var = lane_sum<kSquares>(xf, xf, mean, D) / D;
    const acc_t rstd = adaln_rstd<acc_t>(var, p.eps);
    for (int64_t d = 0; d < D; ++d) {
      out[d] = cpu::store<scalar_t>(adaln_modulate_elem<acc_t>(adaln_xhat<acc_t>(xf[d], mean, rstd),
                                                                cpu::load(shift[d]), cpu::load(scale[d])));
    }
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const AdalnModulateParams<scalar_t, acc_t>& p) {
  const int64_t D = p.dim;
  at::parallel_for(0, p.batch * p.tokens, std::max<int64_t>(1, kGrainElems / D), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> xf(D);
    forward_rows(p, r0, r1, xf.data());
  });
}

// grad_x of rows [t0, t1) of sample b, adding g and g·xhat into the chunk's partial column sums
// ps, pk [D] (in token order). `sc1` [D] holds 1 + scale[b] in acc_t. Two passes per row, both
// reading g and x: the first gathers the row sums Σ gxh, Σ gxh·xhat (kLanes lanes, the order of
// lane_sum) and the column sums; the second, while the row is still in L1, writes grad_x. No
// scratch row is written: the backward streams its inputs once and its output once.
template <typename scalar_t, typename acc_t>
void backward_rows(const AdalnModulateBackwardParams<scalar_t, acc_t>& p, int64_t b, int64_t t0, int64_t t1,
                   acc_t* __restrict__ ps, acc_t* __restrict__ pk, const acc_t* __restrict__ sc1) {
  const int64_t D = p.dim;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t row = b * p.tokens + t;
    const scalar_t* __restrict__ g = p.grad_out + row * D;
    const scalar_t* __restrict__ x = p.x + row * D;
    scalar_t* __restrict__ gx = p.grad_x + row * D;
    const acc_t mean = p.mean[row], rstd = p.rstd[row];
    acc_t l1[kLanes] = {}, l2[kLanes] = {};
    if (t == t0) {  // the chunk's first token starts its partial column sums
      std::fill(ps, ps + D, acc_t(0));
      std::fill(pk, pk + D, acc_t(0));
    }
    auto gather = [&](int64_t d, int k) {
      const acc_t gv = cpu::load(g[d]);
      const acc_t xh = adaln_xhat<acc_t>(cpu::load(x[d]), mean, rstd);
      const acc_t gxh = gv * sc1[d];
      l1[k] += gxh;
      l2[k] += gxh * xh;
      ps[d] += gv;
      pk[d] += gv * xh;
    };
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes) {
      for (int k = 0; k < kLanes; ++k) gather(d + k, k);
    }
    for (int k = 0; d < D; ++d, ++k) gather(d, k);
    for (int w = kLanes / 2; w > 0; w /= 2) {
      for (int k = 0; k < w; ++k) {
        l1[k] += l1[k + w];
        l2[k] += l2[k + w];
      }
    }
    const acc_t m1 = l1[0] / D, m2 = l2[0] / D;
    for (int64_t e = 0; e < D; ++e) {
      const acc_t xh = adaln_xhat<acc_t>(cpu::load(x[e]), mean, rstd);
      gx[e] = cpu::store<scalar_t>(adaln_grad_x_elem<acc_t>(cpu::load(g[e]) * sc1[e], xh, rstd, m1, m2));
    }
  }
}

// Rows are grouped into chunks of rows_per_chunk tokens (a function of the shape only, never of
// the thread count); task (b, chunk) writes its own partial column sums, which are then added in
// chunk order, so results are deterministic.
template <typename scalar_t, typename acc_t>
void backward_kernel(const AdalnModulateBackwardParams<scalar_t, acc_t>& p, int64_t rows_per_chunk,
                     scalar_t* grad_shift, scalar_t* grad_scale) {
  const int64_t D = p.dim, T = p.tokens, n_chunks = p.n_partials;
  at::parallel_for(0, p.batch * n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sc1(D);
    int64_t sc1_of = -1;  // the sample whose 1 + scale sc1 holds
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_chunks, t0 = (task % n_chunks) * rows_per_chunk;
      if (b != sc1_of) {
        for (int64_t d = 0; d < D; ++d) sc1[d] = acc_t(1) + cpu::load(p.scale[b * D + d]);
        sc1_of = b;
      }
      backward_rows(p, b, t0, std::min(T, t0 + rows_per_chunk), p.partial_shift + task * D,
                    p.partial_scale + task * D, sc1.data());
    }
  });
  // Column sums over the chunks, chunk by chunk (the order of the sum is that of the chunks),
  // over column blocks in parallel.
  constexpr int64_t kCols = 256;
  const int64_t col_blocks = (D + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, n_chunks * kCols));
  at::parallel_for(0, p.batch * col_blocks, grain, [&](int64_t begin, int64_t end) {
    acc_t s[kCols], k[kCols];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / col_blocks, d0 = (item % col_blocks) * kCols, w = std::min(kCols, D - d0);
      std::fill(s, s + w, acc_t(0));
      std::fill(k, k + w, acc_t(0));
      for (int64_t c = 0; c < n_chunks; ++c) {
        const acc_t* __restrict__ ps = p.partial_shift + (b * n_chunks + c) * D + d0;
        const acc_t* __restrict__ pk = p.partial_scale + (b * n_chunks + c) * D + d0;
        for (int64_t j = 0; j < w; ++j) {
          s[j] += ps[j];
          k[j] += pk[j];
        }
      }
      for (int64_t j = 0; j < w; ++j) {
        grad_shift[b * D + d0 + j] = cpu::store<scalar_t>(s[j]);
        grad_scale[b * D + d0 + j] = cpu::store<scalar_t>(k[j]);
      }
    }
  });
}
