// Decode attention over a kv cache on CPU (the ``cpp`` backend of flash_attn_with_kvcache).
//
// Problem (mmfast/ops/attention.py's notation): q (B, Sq, H, D); a cache of keys/values, either rows
// (C, S, Hk, D) picked per batch row by kv_batch_idx (default: row b), or pages (P, page, Hk, D) mapped by
// block_table (B, max_pages). Batch row b uses the cache slots start_b = leftpad[b] (default 0) to
// end_b = seqused[b] (exclusive); key j of the row has rank r = j − start_b among the n_b = end_b − start_b
// keys. Query i sits at qa = i + n_b − Sq (bottom-right alignment) and sees rank r when the band holds
// (qa − wl ≤ r ≤ qa + wr) or when there is no band. Head h reads kv head h / (H / Hk) (GQA).
//   s_r = scale · q·k_r            (softcap > 0: s_r = softcap · tanh(s_r / softcap))
//   out = Σ_r softmax(s)_r · v_r,  lse = log Σ_r exp(s_r);  a row that sees no key: out 0, lse +inf.
//
// Algorithm: one work item per (batch row, kv head); at::parallel_for splits the items over threads.
// Decode in fp32 (one query row per sequence, head dims 16/32/64/128): the item's G = H / Hk query heads walk
// the keys and then the values once together, q and the accumulators in vector registers. Otherwise the
// item walks the visible key range once per query row of its group of H / Hk query heads: scores
// into a per-thread buffer (the range is at most a row's length), max, exp and sum, then the weighted
// sum of values, accumulated in fp32 (fp64 for fp64 inputs). Keys are addressed through the block table
// one page at a time, so nothing is gathered or copied. Slots outside a row's range are never read
// (a cache may hold NaN there). Appending the new k/v is done by the Python caller before this runs.
#include "registry.h"

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"  // last: it sets the optimisation options of this file's code (FMA, if-converted compares)

namespace mmfast {
namespace {

// fp32 inner loops: `omp simd` lets the compiler reassociate the sums (vectorised, 8 or 16 partial sums);
// cloned for AVX2 / AVX-512 and picked at load time (MMF_SIMD_CLONES; the extension targets x86-64-v2).

MMF_SIMD_CLONES float dot_f32(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

MMF_SIMD_CLONES void axpy_f32(float w, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// s[i] = exp(s[i] − m) for s[i] ≤ m, returns Σ s[i] (vexp: ≤ 2 ulp, branch-free, so the loop vectorises).
MMF_INLINE float exp_sum_f32_inl(float* s, int64_t n, float m) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float e = vexp(s[i] - m);
    s[i] = e;
    sum += e;
  }
  return sum;
}

MMF_SIMD_CLONES float exp_sum_f32(float* s, int64_t n, float m) { return exp_sum_f32_inl(s, n, m); }

// fp32 dot products of one query row with keys in vectors of 16 lanes (GCC vector extensions: one zmm
// register under AVX-512, two ymm under AVX2, four xmm otherwise): each key's products accumulate in one
// vector, reduced by halving (a shuffle and an add per level, four keys in flight). `omp simd reduction`
// instead summed each key's 16 partials one scalar add after another (16 dependent adds per key: 3/4 of
// the decode kernel's time at head dim 32).
typedef float v16f __attribute__((vector_size(64), aligned(4)));  // aligned(4): unaligned loads allowed
typedef float v8f __attribute__((vector_size(32), aligned(4)));
typedef float v4f __attribute__((vector_size(16), aligned(4)));
constexpr int64_t kLanes = 16;

inline v16f load16(const float* p) { return *reinterpret_cast<const v16f*>(p); }

inline float lanes_sum(v16f a) {
  const v8f h = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f x = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (x[0] + x[2]) + (x[1] + x[3]);
}

struct KeyWalk {  // the slots j0, j0 + 1, ... of a row, page by page (pages null: a contiguous row)
  const float* base;
  const int32_t* pages;
  int64_t page_stride, slot_stride, page_size, pg, slot;
  const float* ptr() const { return base + (pages ? int64_t(pages[pg]) * page_stride : 0) + slot * slot_stride; }
  void next() {
    if (++slot == page_size) slot = 0, ++pg;
  }
  const float* take() {  // this slot's row, then advance
    const float* p = ptr();
    next();
    return p;
  }
};

// fp32, one query row: s[r] = scale · q·k_r for count keys starting at (page pg, slot) of a cursor (pages
// null: a contiguous row, slot counts from base); returns max s. Whole loops per call, so the cloned
// (AVX2 / AVX-512) code is entered once per query row, not once per key.
MMF_SIMD_CLONES float scores_f32(const float* q, const float* base, const int32_t* pages, int64_t page_stride,
                               int64_t slot_stride, int64_t page_size, int64_t pg, int64_t slot, int64_t count,
                               int64_t D, float scale, float* s) {
  KeyWalk kw{base, pages, page_stride, slot_stride, page_size, pg, slot};
  int64_t r = 0;
  if (D % kLanes == 0) {
    for (; r + 4 <= count; r += 4) {  // four keys in flight
      const float* k0 = kw.take();
      const float* k1 = kw.take();
      const float* k2 = kw.take();
      const float* k3 = kw.take();
      v16f a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
        const v16f qv = load16(q + d0);
        a0 += qv * load16(k0 + d0);
        a1 += qv * load16(k1 + d0);
        a2 += qv * load16(k2 + d0);
        a3 += qv * load16(k3 + d0);
      }
      s[r] = lanes_sum(a0) * scale;
      s[r + 1] = lanes_sum(a1) * scale;
      s[r + 2] = lanes_sum(a2) * scale;
      s[r + 3] = lanes_sum(a3) * scale;
    }
    for (; r < count; ++r, kw.next()) {
      const float* k = kw.ptr();
      v16f a = {};
      for (int64_t d0 = 0; d0 < D; d0 += kLanes) a += load16(q + d0) * load16(k + d0);
      s[r] = lanes_sum(a) * scale;
    }
  } else {
    for (; r < count; ++r, kw.next()) {
      const float* k = kw.ptr();
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
      s[r] = dot * scale;
    }
  }
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < count; ++i) m = s[i] > m ? s[i] : m;
  return m;
}

template <int NV>
__attribute__((always_inline)) inline void wsum_regs(const float* w, KeyWalk kw, int64_t count, float* acc) {
  v16f a[NV] = {};
  for (int64_t r = 0; r < count; ++r, kw.next()) {
    const float* v = kw.ptr();
    const float x = w[r];
    for (int c = 0; c < NV; ++c) a[c] += x * load16(v + c * kLanes);
  }
  for (int c = 0; c < NV; ++c) *reinterpret_cast<v16f*>(acc + c * kLanes) = a[c];
}

// fp32, one query row: acc = Σ_r w[r] · v_r over the same cursor walk. Head dims 16, 32, 64 and 128 keep
// acc in vector registers over the whole walk; others go four keys per pass over acc,
// so the chain through acc's loads and stores is a quarter as long.
MMF_SIMD_CLONES void wsum_f32(const float* w, const float* base, const int32_t* pages, int64_t page_stride,
                            int64_t slot_stride, int64_t page_size, int64_t pg, int64_t slot, int64_t count,
                            int64_t D, float* acc) {
  KeyWalk kw{base, pages, page_stride, slot_stride, page_size, pg, slot};
  switch (D) {  // the accumulator's vectors as named registers: a fixed count per head dim
    case 16: return wsum_regs<1>(w, kw, count, acc);
    case 32: return wsum_regs<2>(w, kw, count, acc);
    case 64: return wsum_regs<4>(w, kw, count, acc);
    case 128: return wsum_regs<8>(w, kw, count, acc);
    default: break;
  }
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {
    const float* v0 = kw.take();
    const float* v1 = kw.take();
    const float* v2 = kw.take();
    const float* v3 = kw.take();
    const float x0 = w[r], x1 = w[r + 1], x2 = w[r + 2], x3 = w[r + 3];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += (x0 * v0[d] + x1 * v1[d]) + (x2 * v2[d] + x3 * v3[d]);
  }
  for (; r < count; ++r, kw.next()) {
    const float* v = kw.ptr();
    const float x = w[r];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += x * v[d];
  }
}

// fp32 decode (one query row per sequence), the G query heads that share a kv head together: each key and
// value is read once for the group (the per-head walk read them G times), q and the accumulators stay in
// vector registers (G·D/16 of each, at most 16). s holds G rows of count scores; o the G output rows and l
// the G lse values, both contiguous (heads h = hk·G + g are adjacent).
template <int G, int NV>
__attribute__((always_inline)) inline void decode_group_regs(const float* q, KeyWalk kw, KeyWalk vw, int64_t count,
                                                            float scale, float* s, float* o, float* l) {
  constexpr int64_t D = NV * kLanes;
  v16f qv[G][NV];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < NV; ++c) qv[g][c] = load16(q + g * D + c * kLanes);
  float m[G];
  for (int g = 0; g < G; ++g) m[g] = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < count; ++r, kw.next()) {
    const float* k = kw.ptr();
    v16f kv[NV];
    for (int c = 0; c < NV; ++c) kv[c] = load16(k + c * kLanes);
    for (int g = 0; g < G; ++g) {
      v16f a = qv[g][0] * kv[0];
      for (int c = 1; c < NV; ++c) a += qv[g][c] * kv[c];
      const float x = lanes_sum(a) * scale;
      s[g * count + r] = x;
      m[g] = x > m[g] ? x : m[g];
    }
  }
  float sum[G];
  for (int g = 0; g < G; ++g) sum[g] = exp_sum_f32_inl(s + g * count, count, m[g]);
  v16f acc[G][NV] = {};
  for (int64_t r = 0; r < count; ++r, vw.next()) {
    const float* v = vw.ptr();
    v16f vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = load16(v + c * kLanes);
    for (int g = 0; g < G; ++g) {
      const float x = s[g * count + r];
      for (int c = 0; c < NV; ++c) acc[g][c] += x * vv[c];
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = 1.0f / sum[g];
    for (int c = 0; c < NV; ++c) *reinterpret_cast<v16f*>(o + g * D + c * kLanes) = acc[g][c] * inv;
    l[g] = m[g] + std::log(sum[g]);
  }
}

// Runs decode_group_regs for (G, D) when an instance exists (G in 1, 2, 4, 8; D in 16, 32, 64, 128; G·D/16 ≤ 16);
// false otherwise (the caller walks head by head).
MMF_SIMD_CLONES bool decode_group_f32(int64_t G, int64_t D, const float* q, KeyWalk kw, KeyWalk vw, int64_t count,
                                    float scale, float* s, float* o, float* l) {
#define MMF_GROUP_CASE(g, nv) \
  if (G == g && D == nv * kLanes) return decode_group_regs<g, nv>(q, kw, vw, count, scale, s, o, l), true;
  MMF_GROUP_CASE(1, 1) MMF_GROUP_CASE(1, 2) MMF_GROUP_CASE(1, 4) MMF_GROUP_CASE(1, 8)
  MMF_GROUP_CASE(2, 1) MMF_GROUP_CASE(2, 2) MMF_GROUP_CASE(2, 4) MMF_GROUP_CASE(2, 8)
  MMF_GROUP_CASE(4, 1) MMF_GROUP_CASE(4, 2) MMF_GROUP_CASE(4, 4)
  MMF_GROUP_CASE(8, 1) MMF_GROUP_CASE(8, 2)
#undef MMF_GROUP_CASE
  return false;
}

template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* q, const scalar_t* k, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, float>) {
    return dot_f32(q, k, n);
  } else {
    acc_t s = 0;
    for (int64_t d = 0; d < n; ++d) s += q[d] * static_cast<acc_t>(k[d]);
    return s;
  }
}

template <typename acc_t, typename scalar_t>
inline void axpy(acc_t w, const scalar_t* x, acc_t* y, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, float>) {
    axpy_f32(w, x, y, n);
  } else {
    for (int64_t d = 0; d < n; ++d) y[d] += w * static_cast<acc_t>(x[d]);
  }
}

template <typename scalar_t>
void kvcache_attention_kernel(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                              const int32_t* ends, const int32_t* starts, const int32_t* rows,
                              const int32_t* table, int64_t table_stride, int64_t page_size, double scale,
                              int64_t wl, int64_t wr, bool band, double softcap, at::Tensor& out, at::Tensor& lse,
                              const int32_t* cu_q = nullptr, const int32_t* koff = nullptr, int64_t n_seqs = 0) {
  // cu_q (varlen): q is packed (T, H, D), sequence b its rows cu_q[b]..cu_q[b+1]; k/v packed (Tk, Hk, D),
  // sequence b's keys from row koff[b]; lse is (H, T).
  using acc_t = at::opmath_type<scalar_t>;
  const bool varlen = cu_q != nullptr;
  const int64_t B = varlen ? n_seqs : q.size(0), Sq = varlen ? 0 : q.size(1), T = varlen ? q.size(0) : 0;
  const int64_t H = q.size(-2), D = q.size(-1);
  const int64_t Hk = kc.size(-2), G = H / Hk;
  const bool paged = table != nullptr;
  // cache strides in elements: (page or row, slot, head, dim = 1); packed k/v: (slot, head, dim)
  const int64_t s0 = varlen ? 0 : kc.stride(0), s1 = kc.stride(-3), s2 = kc.stride(-2);
  const int64_t v0 = varlen ? 0 : vc.stride(0), v1 = vc.stride(-3), v2 = vc.stride(-2);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = kc.data_ptr<scalar_t>();
  const scalar_t* vp = vc.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();
  const acc_t sc = static_cast<acc_t>(scale);
  const acc_t cap = static_cast<acc_t>(softcap);
  const acc_t inv_cap = softcap > 0 ? acc_t(1) / cap : acc_t(0);
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) longest = std::max<int64_t>(longest, int64_t(ends[b]) - (starts ? starts[b] : 0));

  at::parallel_for(0, B * Hk, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> s(static_cast<size_t>(longest * G));
    std::vector<acc_t> qf(static_cast<size_t>(D)), acc(static_cast<size_t>(D));
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t b = item / Hk, hk = item % Hk;
      const int64_t start = starts ? starts[b] : 0, end = ends[b];
      const int64_t n = end - start;
      const int64_t row = rows ? rows[b] : b;
      const int64_t k_first = koff ? koff[b] : 0;  // packed k/v: the sequence's first key row
      const int64_t q_first = varlen ? cu_q[b] : b * Sq, sq_b = varlen ? cu_q[b + 1] - cu_q[b] : Sq;
      const int32_t* pages = paged ? table + b * table_stride : nullptr;
      // Walks slots j0, j0 + 1, ... of the row: the page and slot advance without a division per key.
      struct Cursor {
        const scalar_t* base;
        int64_t page_stride, slot_stride;
        const int32_t* pages;
        int64_t page_size, pg, slot;
        const scalar_t* ptr() const {
          return base + (pages ? int64_t(pages[pg]) * page_stride : 0) + slot * slot_stride;
        }
        void next() {
          if (++slot == page_size) slot = 0, ++pg;
        }
      };
      auto cursor = [&](const scalar_t* base, int64_t st0, int64_t st1, int64_t st2, int64_t j0) {
        if (paged) return Cursor{base + hk * st2, st0, st1, pages, page_size, j0 / page_size, j0 % page_size};
        return Cursor{base + row * st0 + k_first * st1 + hk * st2, 0, st1, nullptr, std::numeric_limits<int64_t>::max(), 0, j0};
      };
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (!varlen && sq_b == 1 && softcap == 0) {  // decode: the group of query heads in one walk
          int64_t r0 = 0, r1 = n;
          if (band) {
            r0 = std::max<int64_t>(r0, n - 1 - wl);
            r1 = std::min<int64_t>(r1, n + wr);
          }
          if (r1 > r0) {
            const Cursor kc0 = cursor(kp, s0, s1, s2, start + r0), vc0 = cursor(vp, v0, v1, v2, start + r0);
            const KeyWalk kw{kc0.base, kc0.pages, kc0.page_stride, kc0.slot_stride, kc0.page_size, kc0.pg, kc0.slot};
            const KeyWalk vw{vc0.base, vc0.pages, vc0.page_stride, vc0.slot_stride, vc0.page_size, vc0.pg, vc0.slot};
            if (decode_group_f32(G, D, qp + (q_first * H + hk * G) * D, kw, vw, r1 - r0, sc, s.data(),
                                 op + (q_first * H + hk * G) * D, lp + b * H + hk * G))
              continue;
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        for (int64_t i = 0; i < sq_b; ++i) {
          scalar_t* o = op + ((q_first + i) * H + h) * D;
          float* l = varlen ? lp + h * T + q_first + i : lp + (b * H + h) * Sq + i;
          // visible ranks [r0, r1)
          int64_t r0 = 0, r1 = n;
          if (band) {
            const int64_t qa = i + n - sq_b;
            r0 = std::max<int64_t>(r0, qa - wl);
            r1 = std::min<int64_t>(r1, qa + wr + 1);
          }
          if (r1 <= r0) {
            for (int64_t d = 0; d < D; ++d) o[d] = scalar_t(0);
            *l = std::numeric_limits<float>::infinity();
            continue;
          }
          const scalar_t* qrow = qp + ((q_first + i) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<acc_t>(qrow[d]);
          acc_t m = -std::numeric_limits<acc_t>::infinity();
          Cursor kcur = cursor(kp, s0, s1, s2, start + r0);
          constexpr bool f32 = std::is_same_v<scalar_t, float>;
          if constexpr (f32) {
            if (softcap == 0) {
              m = scores_f32(qf.data(), kcur.base, kcur.pages, kcur.page_stride, kcur.slot_stride, kcur.page_size,
                             kcur.pg, kcur.slot, r1 - r0, D, sc, s.data());
              kcur.pg = -1;  // consumed
            }
          }
          for (int64_t r = r0; r < r1 && kcur.pg >= 0; ++r, kcur.next()) {
            const scalar_t* k = kcur.ptr();
            acc_t x = dot<acc_t, scalar_t>(qf.data(), k, D) * sc;
            if (softcap > 0) x = cap * std::tanh(x * inv_cap);
            s[r - r0] = x;
            m = std::max(m, x);
          }
          acc_t sum = 0;
          if constexpr (std::is_same_v<acc_t, float>) {
            sum = exp_sum_f32(s.data(), r1 - r0, m);
          } else {
            for (int64_t r = 0; r < r1 - r0; ++r) {
              const acc_t e = std::exp(s[r] - m);
              s[r] = e;
              sum += e;
            }
          }
          Cursor vcur = cursor(vp, v0, v1, v2, start + r0);
          if constexpr (f32) {
            wsum_f32(s.data(), vcur.base, vcur.pages, vcur.page_stride, vcur.slot_stride, vcur.page_size, vcur.pg,
                     vcur.slot, r1 - r0, D, acc.data());
            vcur.pg = -1;
          } else {
            std::fill(acc.begin(), acc.end(), acc_t(0));
          }
          for (int64_t r = r0; r < r1 && vcur.pg >= 0; ++r, vcur.next()) {
            const scalar_t* v = vcur.ptr();
            axpy<acc_t, scalar_t>(s[r - r0], v, acc.data(), D);
          }
          const acc_t inv = acc_t(1) / sum;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d] * inv);
          *l = static_cast<float>(m + std::log(sum));
        }
      }
    }
  });
}

const int32_t* int_ptr(const std::optional<at::Tensor>& t, int64_t numel, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device().is_cpu(), name,
              " must be a contiguous int32 CPU tensor");
  TORCH_CHECK(numel < 0 || t->numel() == numel, name, " must hold ", numel, " entries, got ", t->numel());
  return t->data_ptr<int32_t>();
}

// -> (out (B, Sq, H, D) like q, lse (B, H, Sq) fp32)
std::tuple<at::Tensor, at::Tensor> kvcache_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& seqused,
    const std::optional<at::Tensor>& leftpad, const std::optional<at::Tensor>& kv_batch_idx,
    const std::optional<at::Tensor>& block_table, double scale, int64_t window_left, int64_t window_right,
    bool band, double softcap) {
  TORCH_CHECK(q_in.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "kvcache attention: the C++ kernel runs on CPU tensors");
  TORCH_CHECK(q_in.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, "q, k_cache, v_cache must be 4-D");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache shapes differ");
  TORCH_CHECK(q_in.scalar_type() == k_cache.scalar_type() && q_in.scalar_type() == v_cache.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "k_cache/v_cache need a contiguous last dim");
  const at::Tensor q = q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3), Hk = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "head dims differ");
  TORCH_CHECK(Hk > 0 && H % Hk == 0, "k/v heads must divide q heads");
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0");
  const int32_t* ends = int_ptr(seqused, B, "seqused");
  const int32_t* starts = int_ptr(leftpad, B, "leftpad");
  const int32_t* rows = int_ptr(kv_batch_idx, B, "kv_batch_idx");
  const int32_t* table = nullptr;
  int64_t table_stride = 0, page_size = 0;
  if (block_table.has_value()) {
    TORCH_CHECK(!rows, "kv_batch_idx cannot be combined with block_table");
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == B, "block_table must be (B, max_pages)");
    table = int_ptr(block_table, -1, "block_table");
    table_stride = block_table->size(1);
    page_size = k_cache.size(1);
  }
  // Every range is checked here, once, so the kernel never reads outside the cache.
  const int64_t capacity = table ? table_stride * page_size : k_cache.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t st = starts ? starts[b] : 0;
    TORCH_CHECK(st >= 0 && st <= ends[b] && ends[b] <= capacity, "row ", b, ": keys ", st, "..", ends[b],
                " outside the cache capacity ", capacity);
    if (rows) TORCH_CHECK(rows[b] >= 0 && rows[b] < k_cache.size(0), "kv_batch_idx[", b, "] out of range");
    if (!table && !rows) TORCH_CHECK(b < k_cache.size(0), "cache has fewer rows than the batch");
    if (table) {
      for (int64_t p = st / page_size; p * page_size < ends[b]; ++p) {
        const int32_t page = table[b * table_stride + p];
        TORCH_CHECK(page >= 0 && page < k_cache.size(0), "block_table[", b, ", ", p, "] = ", page,
                    " is not a page index");
      }
    }
  }
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({B, H, q.size(1)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kvcache_attention_fwd", [&] {
    kvcache_attention_kernel<scalar_t>(q, k_cache, v_cache, ends, starts, rows, table, table_stride, page_size,
                                       scale, window_left, window_right, band, softcap, out, lse);
  });
  return {out, lse};
}

// Packed sequences without a cache (flash_attn_varlen_func's non-paged form, forward):
// q (T, H, D), k/v (Tk, Hk, D), cu_seqlens_q/k (B + 1) int32 -> (out (T, H, D), lse (H, T) fp32).
std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
    double scale, int64_t window_left, int64_t window_right, bool band, double softcap) {
  TORCH_CHECK(q_in.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "varlen attention: the C++ kernel runs on CPU tensors");
  TORCH_CHECK(q_in.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be 3-D (total, heads, head dim)");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v shapes differ");
  TORCH_CHECK(q_in.scalar_type() == k.scalar_type() && q_in.scalar_type() == v.scalar_type(),
              "q, k and v must share a dtype");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "k/v need a contiguous last dim");
  const at::Tensor q = q_in.contiguous();
  const int64_t H = q.size(1), D = q.size(2), Hk = k.size(1);
  TORCH_CHECK(k.size(2) == D && Hk > 0 && H % Hk == 0, "head dims differ or k/v heads do not divide q heads");
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0");
  const int32_t* cq = int_ptr(cu_q, -1, "cu_seqlens_q");
  const int32_t* ck = int_ptr(cu_k, cu_q.numel(), "cu_seqlens_k");
  const int64_t B = cu_q.numel() - 1;
  TORCH_CHECK(B >= 1, "cu_seqlens must hold at least 2 offsets");
  TORCH_CHECK(cq[0] == 0 && ck[0] == 0 && cq[B] == q.size(0) && ck[B] <= k.size(0), "cu_seqlens must rise from 0 to "
              "the packed lengths");
  std::vector<int32_t> ends(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cq[b + 1] >= cq[b] && ck[b + 1] >= ck[b], "cu_seqlens must not decrease");
    ends[b] = ck[b + 1] - ck[b];
  }
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({H, q.size(0)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_fwd", [&] {
    kvcache_attention_kernel<scalar_t>(q, k, v, ends.data(), nullptr, nullptr, nullptr, 0, 0, scale, window_left,
                                       window_right, band, softcap, out, lse, cq, ck, B);
  });
  return {out, lse};
}

void register_kvcache(pybind11::module_& m) {
  m.def("varlen_attention_fwd", &varlen_attention_fwd, "attention over packed sequences (forward), CPU",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cu_seqlens_q"),
        pybind11::arg("cu_seqlens_k"), pybind11::arg("scale"), pybind11::arg("window_left"),
        pybind11::arg("window_right"), pybind11::arg("band"), pybind11::arg("softcap"));
  m.def("kvcache_attention_fwd", &kvcache_attention_fwd, "decode attention over a (paged) kv cache, CPU",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("seqused"),
        pybind11::arg("leftpad"), pybind11::arg("kv_batch_idx"), pybind11::arg("block_table"),
        pybind11::arg("scale"), pybind11::arg("window_left"), pybind11::arg("window_right"),
        pybind11::arg("band"), pybind11::arg("softcap"));
}
MMFAST_REGISTER(register_kvcache);

}  // namespace
}  // namespace mmfast
