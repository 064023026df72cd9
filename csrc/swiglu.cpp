// SwiGLU activation on CPU (the ``cpp`` backend of mmfast.ops.llama.swiglu / swiglu_down), fp32.
//
// g, u, da and the outputs: contiguous fp32 of one shape. With σ = 1 / (1 + e^−g) (simd.h's vsigmoid: e^−|g|,
// never overflows) and silu(g) = g·σ:
//   forward:  a = silu(g)·u
//   backward: du = da·silu(g), dg = da·u·σ·(1 + g·(1 − σ)), and a again when asked
// dg may be da itself (each element of da is read before dg's is written). One vectorised pass each way,
// cloned for AVX2 / AVX-512.
#include "registry.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <optional>

#include "simd.h"  // last: it sets the optimisation options of this file's code

namespace mmfast {
namespace {

constexpr int64_t kGrain = 16384;

MMF_SIMD_CLONES void swiglu_fwd_range(const float* g, const float* u, float* a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) a[i] = (g[i] * vsigmoid(g[i])) * u[i];
}

// One element of the backward (dg written after da is read); returns a = silu(g)·u.
MMF_INLINE float swiglu_bwd_at(const float* g, const float* u, const float* da, float* dg, float* du, int64_t i) {
  const float x = g[i], d = da[i], v = u[i];
  const float sig = vsigmoid(x), si = x * sig;
  du[i] = d * si;
  dg[i] = (d * v) * (sig * (1.0f + x * (1.0f - sig)));
  return si * v;
}

MMF_SIMD_CLONES void swiglu_bwd_range(const float* g, const float* u, const float* da, float* dg, float* du,
                                      float* a, int64_t n) {
  if (a) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) a[i] = swiglu_bwd_at(g, u, da, dg, du, i);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) swiglu_bwd_at(g, u, da, dg, du, i);
  }
}

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "swiglu: ", name, " must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(t.sizes() == like.sizes(), "swiglu: ", name, " must have gate's shape");
}

void swiglu_fwd(const at::Tensor& g, const at::Tensor& u, at::Tensor a) {
  check(g, g, "gate");
  check(u, g, "up");
  check(a, g, "a");
  const float* gp = g.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  at::parallel_for(0, g.numel(), kGrain,
                   [&](int64_t lo, int64_t hi) { swiglu_fwd_range(gp + lo, up + lo, ap + lo, hi - lo); });
}

void swiglu_bwd(const at::Tensor& g, const at::Tensor& u, const at::Tensor& da, at::Tensor dg, at::Tensor du,
                const std::optional<at::Tensor>& a) {
  check(g, g, "gate");
  check(u, g, "up");
  check(da, g, "da");
  check(dg, g, "dg");
  check(du, g, "du");
  if (a) check(*a, g, "a");
  const float* gp = g.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const float* dap = da.data_ptr<float>();
  float* dgp = dg.data_ptr<float>();
  float* dup = du.data_ptr<float>();
  float* ap = a ? a->data_ptr<float>() : nullptr;
  at::parallel_for(0, g.numel(), kGrain, [&](int64_t lo, int64_t hi) {
    swiglu_bwd_range(gp + lo, up + lo, dap + lo, dgp + lo, dup + lo, ap ? ap + lo : nullptr, hi - lo);
  });
}

void register_swiglu(pybind11::module_& m) {
  m.def("swiglu_fwd", &swiglu_fwd, "a = silu(g)·u (fp32, CPU)", pybind11::arg("g"), pybind11::arg("u"),
        pybind11::arg("a"));
  m.def("swiglu_bwd", &swiglu_bwd, "SwiGLU backward into dg (may be da), du and, when given, a (fp32, CPU)",
        pybind11::arg("g"), pybind11::arg("u"), pybind11::arg("da"), pybind11::arg("dg"), pybind11::arg("du"),
        pybind11::arg("a"));
}
MMFAST_REGISTER(register_swiglu);

}  // namespace
}  // namespace mmfast
