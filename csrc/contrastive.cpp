// Fused CLIP (InfoNCE) and SigLIP losses on CPU that never store the M×K logits.
//
// Problem: a (M, d), b (K, d), z_ij = s · a_i·b_j + β, positive of row i at column i + off.
// The backend contract (sums, not means) is documented in mmfast/ops/contrastive.py.
//
// Algorithm (the same tiling a fused GPU kernel uses). Rows are cut into blocks of kBM; OpenMP
// threads take whole row blocks (static round robin, so results are deterministic for a given
// thread count). A thread sweeps its row block over column tiles of kBN: the tile of raw dots
// S = A_blk · B_tileᵀ comes from a blocked GEMM (at::mm_out → MKL/OpenBLAS, single-threaded
// inside our parallel region), then one vectorised elementwise pass (fp32) consumes it:
//   forward   online row (max, Σexp) → lse_row; per-thread column (max, Σexp) partials of
//             length K merged at the end → lse_col; Σ_j z_ij and z_i,i+off for the loss.
//   backward  recompute S, form G = ∂loss/∂z in place (P_row + P_col − smoothing − one-hot),
//             dA_blk += s·G · B_tile, dB_thread += s·Gᵀ · A_blk, dscale += Σ G·S.
//             dB lives in one fp32 (K, d) buffer per thread (thread 0 writes the output
//             buffer), summed in thread order at the end.
// FLOPs: forward 2·M·K·d, backward 6·M·K·d (S is recomputed), plus O(M·K) exp/log.
// Extra memory: fp32 copies of a, b for fp16/bf16 inputs (4·(M+K)·d bytes), fp32 gradient
//   buffers for fp16/bf16 outputs, (T−1)·K·d·4 bytes of dB partials in backward, T·kBM·kBN·4
//   bytes of tiles, T·K·12 bytes of column statistics (fp32 max, fp64 Σexp) in the symmetric
//   forward, 8·(M + K) bytes of fp64 lse (T = threads). Never M·K.
#include "registry.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"  // last: it sets the optimisation options of this file's code

namespace mmfast {
namespace {

constexpr int64_t kBM = 256;  // rows per block: one thread's unit of work
constexpr int64_t kBN = 256;  // columns per tile: a kBM×kBN fp32 tile (256 KiB) stays in L2

// ----------------------------------------------------------------------------- tile passes
// Every pass reads a row-major tile `z` (bm, bn) of raw dots S and, for row r, the positive at
// column `pos0 + r` (outside [0, bn) when the tile holds no positive of that row).

// CLIP forward, rows: logits in place; online (max, Σexp) per row; Σ_j z and the positive.
MMF_SIMD_CLONES void clip_fwd_rows(float* z, int64_t bm, int64_t bn, float s, float beta, int64_t pos0,
                                   float* rmax, double* rsum, double* rz, double* zpos) {
  for (int64_t r = 0; r < bm; ++r) {
    float* zr = z + r * bn;
    float m = -std::numeric_limits<float>::infinity();
    double tot = 0.0;
#pragma omp simd reduction(max : m) reduction(+ : tot)
    for (int64_t j = 0; j < bn; ++j) {
      const float v = s * zr[j] + beta;
      zr[j] = v;
      m = fmax2(m, v);
      tot += v;
    }
    const int64_t c = pos0 + r;
    if (c >= 0 && c < bn) zpos[r] = zr[c];
    rz[r] += tot;
    const float mnew = fmax2(rmax[r], m);
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < bn; ++j) acc += vexp(zr[j] - mnew);
    rsum[r] = (mnew == rmax[r] ? rsum[r] : rsum[r] * std::exp(double(rmax[r]) - mnew)) + acc;
    rmax[r] = mnew;
  }
}

// CLIP forward, columns: this thread's online (max, Σexp) of each column (z holds logits).
MMF_SIMD_CLONES void clip_fwd_cols(const float* z, int64_t bm, int64_t bn, float* cmax, double* csum,
                                   float* scratch) {
#pragma omp simd
  for (int64_t j = 0; j < bn; ++j) scratch[j] = cmax[j];
  for (int64_t r = 0; r < bm; ++r) {
    const float* zr = z + r * bn;
#pragma omp simd
    for (int64_t j = 0; j < bn; ++j) scratch[j] = fmax2(scratch[j], zr[j]);
  }
  for (int64_t j = 0; j < bn; ++j) {  // rescale only where the max moved (rare after a few blocks)
    if (scratch[j] != cmax[j]) csum[j] *= std::exp(double(cmax[j]) - scratch[j]);
    cmax[j] = scratch[j];
  }
  for (int64_t r = 0; r < bm; ++r) {
    const float* zr = z + r * bn;
#pragma omp simd
    for (int64_t j = 0; j < bn; ++j) csum[j] += vexp(zr[j] - scratch[j]);
  }
}

// CLIP backward: z ← s·G with G = g·(P_row + [sym] P_col − ε/K − [sym] ε/M − (1−ε)(1+[sym]) δ).
// Returns Σ G·S (this tile's share of dscale).
// The fp64 lse arrive split as hi + lo (two fp32 arrays): z − hi is exact for the logits near the
// max, so exp((z − hi) − lo) keeps PyTorch's fp32 log-softmax accuracy however large |lse| is
// (a per-row rounding of lse would bias every P_ij of the row the same way).
MMF_SIMD_CLONES double clip_bwd_tile(float* z, int64_t bm, int64_t bn, float s, float beta, float g,
                                     const float* hrow, const float* lrow, const float* hcol, const float* lcol,
                                     float smooth, float onehot, int64_t pos0) {
  double dscale = 0.0;
  for (int64_t r = 0; r < bm; ++r) {
    float* zr = z + r * bn;
    const float hr = hrow[r], lr = lrow[r];
    const int64_t c = pos0 + r;
    double acc = 0.0;
    if (hcol != nullptr) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < bn; ++j) {
        const float dot = zr[j];
        const float v = s * dot + beta;
        const float p = vexp((v - hr) - lr) + vexp((v - hcol[j]) - lcol[j]);
        const float gv = g * p - smooth - (j == c ? onehot : 0.0f);
        acc += gv * dot;
        zr[j] = s * gv;
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < bn; ++j) {
        const float dot = zr[j];
        const float gv = g * vexp((s * dot + beta - hr) - lr) - smooth - (j == c ? onehot : 0.0f);
        acc += gv * dot;
        zr[j] = s * gv;
      }
    }
    dscale += acc;
  }
  return dscale;
}

// SigLIP forward: Σ softplus(−y z), y = +1 at the positive and −1 elsewhere.
MMF_SIMD_CLONES double siglip_fwd_tile(const float* z, int64_t bm, int64_t bn, float s, float beta,
                                       int64_t pos0) {
  double loss = 0.0;
  for (int64_t r = 0; r < bm; ++r) {
    const float* zr = z + r * bn;
    const int64_t c = pos0 + r;
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < bn; ++j) {
      const float v = s * zr[j] + beta;
      acc += vsoftplus(j == c ? -v : v);
    }
    loss += acc;
  }
  return loss;
}

// SigLIP backward: z ← s·G with G = −g·y·σ(−y z); returns (Σ G·S, Σ G).
MMF_SIMD_CLONES void siglip_bwd_tile(float* z, int64_t bm, int64_t bn, float s, float beta, float g,
                                     int64_t pos0, double* dscale, double* dbias) {
  for (int64_t r = 0; r < bm; ++r) {
    float* zr = z + r * bn;
    const int64_t c = pos0 + r;
    double as = 0.0, ab = 0.0;
#pragma omp simd reduction(+ : as, ab)
    for (int64_t j = 0; j < bn; ++j) {
      const float dot = zr[j];
      const float v = s * dot + beta;
      const float gv = j == c ? -g * vsigmoid(-v) : g * vsigmoid(v);
      as += gv * dot;
      ab += gv;
      zr[j] = s * gv;
    }
    *dscale += as;
    *dbias += ab;
  }
}

// ----------------------------------------------------------------------------- driver
struct Problem {
  at::Tensor a, b;  // fp32, contiguous: (M, d), (K, d)
  int64_t M, K, d, off;
  float s, beta;
};

int num_threads_for(int64_t blocks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks)));
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Calls body(t, i0, bm, j0, bn, tile) for every (row block, column tile) with t the thread
// index; row blocks go round robin to `nt` threads. `tile` holds S = A_blk·B_tileᵀ (bm, bn).
template <typename Body, typename RowStart, typename RowEnd>
void sweep(const Problem& p, int nt, RowStart row_start, Body body, RowEnd row_end) {
  const int64_t nblocks = (p.M + kBM - 1) / kBM;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
#endif
  {
    const int t = thread_id();
    at::Tensor buf = at::empty({kBM * kBN}, p.a.options());
    for (int64_t blk = t; blk < nblocks; blk += nt) {
      const int64_t i0 = blk * kBM, bm = std::min(kBM, p.M - i0);
      const at::Tensor a_blk = p.a.narrow(0, i0, bm);  // (bm, d)
      row_start(t, i0, bm);
      for (int64_t j0 = 0; j0 < p.K; j0 += kBN) {
        const int64_t bn = std::min(kBN, p.K - j0);
        at::Tensor tile = buf.narrow(0, 0, bm * bn).view({bm, bn});
        at::Tensor b_tile = p.b.narrow(0, j0, bn);  // (bn, d)
        at::mm_out(tile, a_blk, b_tile.t());
        body(t, i0, bm, j0, bn, tile, a_blk, b_tile);
      }
      row_end(t, i0, bm);
    }
  }
}

void check_features(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "mmfast._C contrastive: a and b must be CPU tensors, got ",
              a.device(), " and ", b.device());
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "mmfast._C contrastive: a and b must be 2-D (rows, dim), got shapes ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), "mmfast._C contrastive: a has dim ", a.size(1), " but b has dim ", b.size(1));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "mmfast._C contrastive: a is ", a.scalar_type(), " but b is ",
              b.scalar_type());
  const auto dt = a.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "mmfast._C contrastive: features must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(),
              "mmfast._C contrastive: a and b must be contiguous (call .contiguous() first)");
  TORCH_CHECK(a.size(0) > 0 && b.size(0) > 0, "mmfast._C contrastive: a and b need at least one row");
}

float scalar_arg(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.numel() == 1 && x.scalar_type() == at::kFloat,
              "mmfast._C contrastive: ", name, " must be a one-element float32 CPU tensor, got ", x.scalar_type(),
              " of shape ", x.sizes(), " on ", x.device());
  return x.item<float>();
}

Problem make_problem(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias, int64_t offset) {
  check_features(a, b);
  TORCH_CHECK(offset >= 0 && offset + a.size(0) <= b.size(0), "mmfast._C contrastive: offset ", offset, " with ",
              a.size(0), " rows does not fit ", b.size(0), " columns");
  Problem p;
  p.a = a.detach().to(at::kFloat);  // no copy for fp32
  p.b = b.detach().to(at::kFloat);
  p.M = a.size(0);
  p.K = b.size(0);
  p.d = a.size(1);
  p.off = offset;
  p.s = scalar_arg(scale, "scale");
  p.beta = bias.has_value() ? scalar_arg(*bias, "bias") : 0.0f;
  return p;
}

at::Tensor scalar_out(double v) { return at::scalar_tensor(v, at::TensorOptions().dtype(at::kFloat)); }

// ----------------------------------------------------------------------------- CLIP
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> clip_fwd(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    double label_smoothing, int64_t offset, bool symmetric) {
  Problem p = make_problem(a, b, scale, bias, offset);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing < 1.0,
              "mmfast._C clip_fwd: label_smoothing must be in [0, 1), got ", label_smoothing);
  TORCH_CHECK(!symmetric || (p.M == p.K && p.off == 0),
              "mmfast._C clip_fwd: symmetric=True needs a square problem with offset 0, got M=", p.M, " K=", p.K,
              " offset=", p.off);
  const int nt = num_threads_for((p.M + kBM - 1) / kBM);
  auto f32 = p.a.options();
  // lse in fp64 (m + log Σ): the backward splits it into fp32 hi + lo, see clip_bwd_tile.
  at::Tensor lse_row = at::empty({p.M}, f32.dtype(at::kDouble));
  std::vector<float> rmax(p.M);
  std::vector<double> rsum(p.M);  // Σexp in fp64: the max term (1) must not swallow the small ones
  std::vector<double> rz(p.M, 0.0), zpos(p.M, 0.0);
  // Per-thread column statistics (max, Σexp), merged below in thread order.
  std::vector<float> cmax(symmetric ? nt * p.K : 0, -std::numeric_limits<float>::infinity());
  std::vector<double> csum(symmetric ? nt * p.K : 0, 0.0);
  std::vector<float> scratch(nt * kBN);
  sweep(
      p, nt,
      [&](int, int64_t i0, int64_t bm) {
        std::fill(rmax.begin() + i0, rmax.begin() + i0 + bm, -std::numeric_limits<float>::infinity());
        std::fill(rsum.begin() + i0, rsum.begin() + i0 + bm, 0.0);
      },
      [&](int t, int64_t i0, int64_t bm, int64_t j0, int64_t bn, at::Tensor& tile, const at::Tensor&,
          const at::Tensor&) {
        float* z = tile.data_ptr<float>();
        clip_fwd_rows(z, bm, bn, p.s, p.beta, i0 + p.off - j0, rmax.data() + i0, rsum.data() + i0, rz.data() + i0,
                      zpos.data() + i0);
        if (symmetric)
          clip_fwd_cols(z, bm, bn, cmax.data() + t * p.K + j0, csum.data() + t * p.K + j0,
                        scratch.data() + t * kBN);
      },
      [&](int, int64_t i0, int64_t bm) {
        double* out = lse_row.data_ptr<double>();
        for (int64_t i = i0; i < i0 + bm; ++i) out[i] = rmax[i] + std::log(rsum[i]);
      });

  const double eps = label_smoothing;
  const double* lr = lse_row.data_ptr<double>();
  double lse_sum = 0.0, pos_sum = 0.0, z_sum = 0.0;
  for (int64_t i = 0; i < p.M; ++i) {
    lse_sum += lr[i];
    pos_sum += zpos[i];
    z_sum += rz[i];
  }
  double loss = lse_sum - (1.0 - eps) * pos_sum - eps / p.K * z_sum;
  std::optional<at::Tensor> lse_col;
  if (symmetric) {
    at::Tensor lc = at::empty({p.K}, f32.dtype(at::kDouble));
    double* out = lc.data_ptr<double>();
    double col_sum = 0.0;
    for (int64_t j = 0; j < p.K; ++j) {
      float m = -std::numeric_limits<float>::infinity();
      for (int t = 0; t < nt; ++t) m = std::max(m, cmax[t * p.K + j]);
      double acc = 0.0;
      for (int t = 0; t < nt; ++t) acc += csum[t * p.K + j] * std::exp(double(cmax[t * p.K + j]) - m);
      out[j] = m + std::log(acc);
      col_sum += out[j];
    }
    // Columns: Σ_j lse_col − (1−ε) Σ positives − (ε/M) Σ_ij z  (the positives are the same set).
    loss += col_sum - (1.0 - eps) * pos_sum - eps / p.M * z_sum;
    lse_col = lc;
  }
  return {scalar_out(loss), lse_row, lse_col};
}

// Shared backward sweep: `tile_grad` turns a tile of S into s·G in place and accumulates
// (dscale, dbias) into its two doubles; dA and dB follow with two GEMMs per tile.
template <typename TileGrad>
std::tuple<at::Tensor, at::Tensor, double, double> backward_sweep(const Problem& p, const at::Tensor& a,
                                                                  TileGrad tile_grad) {
  const int nt = num_threads_for((p.M + kBM - 1) / kBM);
  // fp32 outputs are written in place; fp16/bf16 go through fp32 buffers.
  at::Tensor da = at::zeros({p.M, p.d}, p.a.options());
  std::vector<at::Tensor> db(nt);
  for (int t = 0; t < nt; ++t) db[t] = at::zeros({p.K, p.d}, p.a.options());
  std::vector<double> dscale(nt, 0.0), dbias(nt, 0.0);
  sweep(
      p, nt, [](int, int64_t, int64_t) {},
      [&](int t, int64_t i0, int64_t bm, int64_t j0, int64_t bn, at::Tensor& tile, const at::Tensor& a_blk,
          const at::Tensor& b_tile) {
        tile_grad(tile.data_ptr<float>(), i0, bm, j0, bn, &dscale[t], &dbias[t]);
        da.narrow(0, i0, bm).addmm_(tile, b_tile);        // (bm, d) += (bm, bn) · (bn, d)
        db[t].narrow(0, j0, bn).addmm_(tile.t(), a_blk);  // (bn, d) += (bn, bm) · (bm, d)
      },
      [](int, int64_t, int64_t) {});
  // Sum the dB partials in thread order (deterministic), rows split across threads.
  if (nt > 1) {
    at::parallel_for(0, p.K, 64, [&](int64_t k0, int64_t k1) {
      at::Tensor acc = db[0].narrow(0, k0, k1 - k0);
      for (int t = 1; t < nt; ++t) acc.add_(db[t].narrow(0, k0, k1 - k0));
    });
  }
  double ds = 0.0, dbi = 0.0;
  for (int t = 0; t < nt; ++t) {
    ds += dscale[t];
    dbi += dbias[t];
  }
  return {da.to(a.scalar_type()), db[0].to(a.scalar_type()), ds, dbi};
}

float grad_arg(const at::Tensor& grad) { return scalar_arg(grad, "grad"); }

void split_lse(const at::Tensor& lse, std::vector<float>& hi, std::vector<float>& lo) {
  const double* x = lse.data_ptr<double>();
  for (size_t i = 0; i < hi.size(); ++i) {
    hi[i] = static_cast<float>(x[i]);
    lo[i] = static_cast<float>(x[i] - hi[i]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> clip_bwd(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    double label_smoothing, int64_t offset, bool symmetric, const at::Tensor& lse_row,
    const std::optional<at::Tensor>& lse_col, const at::Tensor& grad) {
  Problem p = make_problem(a, b, scale, bias, offset);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing < 1.0,
              "mmfast._C clip_bwd: label_smoothing must be in [0, 1), got ", label_smoothing);
  TORCH_CHECK(!symmetric || (p.M == p.K && p.off == 0),
              "mmfast._C clip_bwd: symmetric=True needs a square problem with offset 0");
  TORCH_CHECK(lse_row.scalar_type() == at::kDouble && lse_row.dim() == 1 && lse_row.size(0) == p.M &&
                  lse_row.is_contiguous() && lse_row.device().is_cpu(),
              "mmfast._C clip_bwd: lse_row must be a contiguous float64 CPU tensor of shape (", p.M, "), got ",
              lse_row.scalar_type(), " ", lse_row.sizes());
  if (symmetric) {
    TORCH_CHECK(lse_col.has_value(), "mmfast._C clip_bwd: symmetric=True needs lse_col");
    const at::Tensor& lc = *lse_col;
    TORCH_CHECK(lc.scalar_type() == at::kDouble && lc.dim() == 1 && lc.size(0) == p.K && lc.is_contiguous() &&
                    lc.device().is_cpu(),
                "mmfast._C clip_bwd: lse_col must be a contiguous float64 CPU tensor of shape (", p.K, "), got ",
                lc.scalar_type(), " ", lc.sizes());
  }
  const float g = grad_arg(grad);
  const float eps = static_cast<float>(label_smoothing);
  const float smooth = g * (eps / p.K + (symmetric ? eps / p.M : 0.0f));
  const float onehot = g * (1.0f - eps) * (symmetric ? 2.0f : 1.0f);
  // lse = hi + lo per row / column (O(M + K) floats), see clip_bwd_tile.
  std::vector<float> hrow(p.M), lrow(p.M), hcol(symmetric ? p.K : 0), lcol(symmetric ? p.K : 0);
  split_lse(lse_row, hrow, lrow);
  if (symmetric) split_lse(*lse_col, hcol, lcol);
  auto [da, db, ds, dbi] =
      backward_sweep(p, a, [&](float* z, int64_t i0, int64_t bm, int64_t j0, int64_t bn, double* dsc, double*) {
        *dsc += clip_bwd_tile(z, bm, bn, p.s, p.beta, g, hrow.data() + i0, lrow.data() + i0,
                              symmetric ? hcol.data() + j0 : nullptr, symmetric ? lcol.data() + j0 : nullptr,
                              smooth, onehot, i0 + p.off - j0);
      });
  // The loss does not depend on β (each softmax is shift invariant): dbias is exactly 0.
  std::optional<at::Tensor> dbias;
  if (bias.has_value()) dbias = scalar_out(0.0);
  return {da, db, scalar_out(ds), dbias};
}

// ----------------------------------------------------------------------------- SigLIP
at::Tensor siglip_fwd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale, const at::Tensor& bias,
                      int64_t offset) {
  Problem p = make_problem(a, b, scale, bias, offset);
  const int nt = num_threads_for((p.M + kBM - 1) / kBM);
  std::vector<double> loss(nt, 0.0);
  sweep(
      p, nt, [](int, int64_t, int64_t) {},
      [&](int t, int64_t i0, int64_t bm, int64_t j0, int64_t bn, at::Tensor& tile, const at::Tensor&,
          const at::Tensor&) {
        loss[t] += siglip_fwd_tile(tile.data_ptr<float>(), bm, bn, p.s, p.beta, i0 + p.off - j0);
      },
      [](int, int64_t, int64_t) {});
  double total = 0.0;
  for (double v : loss) total += v;
  return scalar_out(total);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_bwd(const at::Tensor& a, const at::Tensor& b,
                                                                      const at::Tensor& scale, const at::Tensor& bias,
                                                                      int64_t offset, const at::Tensor& grad) {
  Problem p = make_problem(a, b, scale, bias, offset);
  const float g = grad_arg(grad);
  auto [da, db, ds, dbi] =
      backward_sweep(p, a, [&](float* z, int64_t i0, int64_t bm, int64_t j0, int64_t bn, double* dsc, double* dbb) {
        siglip_bwd_tile(z, bm, bn, p.s, p.beta, g, i0 + p.off - j0, dsc, dbb);
      });
  return {da, db, scalar_out(ds), scalar_out(dbi)};
}

void register_contrastive(pybind11::module_& m) {
  namespace py = pybind11;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("contrastive_clip_fwd", &clip_fwd, nogil, py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("bias"),
        py::arg("label_smoothing"), py::arg("offset"), py::arg("symmetric"),
        "Fused CLIP cross-entropy sum -> (loss_sum, lse_row, lse_col or None); see csrc/contrastive.cpp");
  m.def("contrastive_clip_bwd", &clip_bwd, nogil, py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("bias"),
        py::arg("label_smoothing"), py::arg("offset"), py::arg("symmetric"), py::arg("lse_row"), py::arg("lse_col"),
        py::arg("grad"), "Backward of contrastive_clip_fwd -> (da, db, dscale, dbias or None)");
  m.def("contrastive_siglip_fwd", &siglip_fwd, nogil, py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("bias"),
        py::arg("offset"), "Fused SigLIP sum of softplus(-y z)");
  m.def("contrastive_siglip_bwd", &siglip_bwd, nogil, py::arg("a"), py::arg("b"), py::arg("scale"), py::arg("bias"),
        py::arg("offset"), py::arg("grad"), "Backward of contrastive_siglip_fwd -> (da, db, dscale, dbias)");
  m.attr("contrastive_tile") = py::make_tuple(kBM, kBN);
}

}  // namespace

MMFAST_REGISTER(register_contrastive);

}  // namespace mmfast
