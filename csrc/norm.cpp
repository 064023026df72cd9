// LayerNorm / RMSNorm with the residual add fused, on CPU (the ``cpp`` backend of mmfast.ops.norm), fp32.
//
// Rows of N, M = numel / N rows, all tensors contiguous fp32 (the Python side converts what is not).
//   forward:  s = x + r (when r is given, written out), mean = Σs/N (LayerNorm; 0 for RMSNorm),
//             rstd = 1/√(Σ(s − mean)²/N + eps), y = (s − mean)·rstd·w + b;  stats (2, M) = (mean, rstd)
//   backward: ŝ = (s − mean)·rstd, g = dy·w, dx = (g − ŝ·Σ(g·ŝ)/N − Σg/N [LayerNorm])·rstd + ds,
//             dw = Σ_rows dy·ŝ, db = Σ_rows dy  (dwb (2, N))
// The row loops are `omp simd` (row sums in vector lanes), cloned for AVX2 / AVX-512. The column sums of the
// backward are made per block of kRows rows and the blocks added in order, so the result does not depend
// on the thread count.
#include "registry.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>

#include "simd.h"  // last: it sets the optimisation options of this file's code

namespace mmfast {
namespace {

constexpr int64_t kRows = 128;  // backward: rows per block of column partial sums

struct FwdArgs {
  const float *x, *r, *w, *b;
  float *y, *s, *stats;
  int64_t M, N;
  float eps;
  bool rms;
};

// Rows [lo, hi) of the forward.
MMF_SIMD_CLONES void norm_fwd_rows(const FwdArgs& a, int64_t lo, int64_t hi) {
  const int64_t N = a.N;
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t row = lo; row < hi; ++row) {
    const float* src = a.x + row * N;
    if (a.r) {
      float* sr = a.s + row * N;
      const float* rr = a.r + row * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) sr[j] = src[j] + rr[j];
      src = sr;
    }
    float mean = 0.0f;
    if (!a.rms) {
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < N; ++j) sum += src[j];
      mean = sum * inv_n;
    }
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < N; ++j) sq += (src[j] - mean) * (src[j] - mean);
    const float rstd = 1.0f / __builtin_sqrtf(sq * inv_n + a.eps);
    float* yr = a.y + row * N;
    if (a.w && a.b) {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) yr[j] = ((src[j] - mean) * rstd) * a.w[j] + a.b[j];
    } else if (a.w) {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) yr[j] = ((src[j] - mean) * rstd) * a.w[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) yr[j] = (src[j] - mean) * rstd + (a.b ? a.b[j] : 0.0f);
    }
    a.stats[row] = mean;
    a.stats[a.M + row] = rstd;
  }
}

struct BwdArgs {
  const float *s, *w, *dy, *ds, *stats;
  float *dx, *part;
  int64_t M, N;
  bool rms;
};

// Block b of kRows rows: dx of its rows, and its column partials dw, db into part[b] (2, N), zeroed.
MMF_SIMD_CLONES void norm_bwd_block(const BwdArgs& a, int64_t b) {
  const int64_t N = a.N;
  const float inv_n = 1.0f / static_cast<float>(N);
  float* dw = a.part + b * 2 * N;
  float* db = dw + N;
  for (int64_t row = b * kRows; row < std::min(a.M, (b + 1) * kRows); ++row) {
    const float* sr = a.s + row * N;
    const float* dyr = a.dy + row * N;
    const float mean = a.stats[row], rstd = a.stats[a.M + row];
    float c1 = 0.0f, c2 = 0.0f;
    if (a.w) {
#pragma omp simd reduction(+ : c1, c2)
      for (int64_t j = 0; j < N; ++j) {
        const float g = dyr[j] * a.w[j];
        c1 += g * ((sr[j] - mean) * rstd);
        c2 += g;
      }
    } else {
#pragma omp simd reduction(+ : c1, c2)
      for (int64_t j = 0; j < N; ++j) {
        c1 += dyr[j] * ((sr[j] - mean) * rstd);
        c2 += dyr[j];
      }
    }
    c1 *= inv_n;
    c2 = a.rms ? 0.0f : c2 * inv_n;
    float* dxr = a.dx + row * N;
    const float* dsr = a.ds ? a.ds + row * N : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const float sh = (sr[j] - mean) * rstd;
      const float g = a.w ? dyr[j] * a.w[j] : dyr[j];
      dxr[j] = (g - sh * c1 - c2) * rstd + (dsr ? dsr[j] : 0.0f);
      dw[j] += dyr[j] * sh;
      db[j] += dyr[j];
    }
  }
}

const float* ptr_or_null(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

void check(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "norm: ", name, " must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(t.numel() == numel, "norm: ", name, " has ", t.numel(), " elements, expected ", numel);
}

std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor> norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool is_rms) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "norm: x must have a non-empty last dimension");
  const int64_t N = x.size(-1), M = x.numel() / N;
  check(x, "x", x.numel());
  if (residual) check(*residual, "residual", x.numel());
  if (weight) check(*weight, "weight", N);
  if (bias) check(*bias, "bias", N);
  at::Tensor y = at::empty_like(x);
  std::optional<at::Tensor> s;
  if (residual) s = at::empty_like(x);
  at::Tensor stats = at::empty({2, M}, x.options());
  const FwdArgs a{x.data_ptr<float>(), ptr_or_null(residual), ptr_or_null(weight), ptr_or_null(bias),
                  y.data_ptr<float>(), s ? s->data_ptr<float>() : nullptr, stats.data_ptr<float>(), M, N,
                  static_cast<float>(eps), is_rms};
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t lo, int64_t hi) { norm_fwd_rows(a, lo, hi); });
  return {y, s, stats};
}

std::tuple<at::Tensor, at::Tensor> norm_bwd(const at::Tensor& s, const std::optional<at::Tensor>& weight,
                                            const at::Tensor& dy, const std::optional<at::Tensor>& ds,
                                            const at::Tensor& stats, bool is_rms) {
  TORCH_CHECK(s.dim() >= 1 && s.size(-1) > 0, "norm: s must have a non-empty last dimension");
  const int64_t N = s.size(-1), M = s.numel() / N;
  check(s, "s", s.numel());
  check(dy, "dy", s.numel());
  if (ds) check(*ds, "ds", s.numel());
  if (weight) check(*weight, "weight", N);
  check(stats, "stats", 2 * M);
  at::Tensor dx = at::empty_like(s);
  const int64_t blocks = (M + kRows - 1) / kRows;
  at::Tensor part = at::zeros({std::max<int64_t>(blocks, 1), 2, N}, s.options());
  const BwdArgs a{s.data_ptr<float>(), ptr_or_null(weight), dy.data_ptr<float>(), ptr_or_null(ds),
                  stats.data_ptr<float>(), dx.data_ptr<float>(), part.data_ptr<float>(), M, N, is_rms};
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) norm_bwd_block(a, b);
  });
  if (blocks <= 1) return {dx, part[0]};
  at::Tensor dwb = at::empty({2, N}, s.options());  // the blocks' partials added in block order
  float* out = dwb.data_ptr<float>();
  const float* pp = part.data_ptr<float>();
  std::memcpy(out, pp, sizeof(float) * 2 * N);
  for (int64_t b = 1; b < blocks; ++b)
    for (int64_t j = 0; j < 2 * N; ++j) out[j] += pp[b * 2 * N + j];
  return {dx, dwb};
}

void register_norm(pybind11::module_& m) {
  m.def("norm_fwd", &norm_fwd, "LayerNorm / RMSNorm forward with the residual add fused (fp32, CPU)",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("eps"), pybind11::arg("is_rms"));
  m.def("norm_bwd", &norm_bwd, "LayerNorm / RMSNorm backward: (dx, dwb (2, N)) (fp32, CPU)", pybind11::arg("s"),
        pybind11::arg("weight"), pybind11::arg("dy"), pybind11::arg("ds"), pybind11::arg("stats"),
        pybind11::arg("is_rms"));
}
MMFAST_REGISTER(register_norm);

}  // namespace
}  // namespace mmfast
