// Rotary position embedding on CPU (the ``cpp`` backend of mmfast.ops.llama.rotary_embedding).
//
// q (B, HQ, S, D) and k (B, HK, S, D), any strides with a unit last stride; cos/sin (B, S, D), any strides
// with a unit last stride (stride 0 where broadcast). With h = D / 2, x1 = x[:h], x2 = x[h:]:
//   forward:  y = x·cos + rotate_half(x)·sin,  rotate_half(x) = (−x2, x1)
//   backward: dx = dy·cos + rotate_halfᵀ(dy·sin), rotate_halfᵀ(z) = (z2, −z1)
// Outputs may be the inputs themselves (in place: each pair x[j], x[j + h] is read before it is written).
// Every product and sum is rounded as PyTorch's reference composition rounds it (fp-contract off: no FMA), so
// fp32 / fp64 results equal the reference's bit for bit; one pass over q and k, cos/sin read once per
// position.
#include "registry.h"

#include <ATen/Parallel.h>

#include <cstdint>

#pragma GCC optimize("fp-contract=off")

namespace mmfast {
namespace {

template <typename scalar_t>
void rope_rows(const at::Tensor& x, at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3), half = D / 2;
  const int64_t x0 = x.stride(0), x1s = x.stride(1), x2s = x.stride(2);
  const int64_t y0 = y.stride(0), y1s = y.stride(1), y2s = y.stride(2);
  const int64_t c0 = cos.stride(0), c1s = cos.stride(1), n0 = sin.stride(0), n1s = sin.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const scalar_t* cp = cos.data_ptr<scalar_t>();
  const scalar_t* sp = sin.data_ptr<scalar_t>();
  at::parallel_for(0, B * S, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t bs = lo; bs < hi; ++bs) {
      const int64_t b = bs / S, s = bs % S;
      const scalar_t* c = cp + b * c0 + s * c1s;
      const scalar_t* n = sp + b * n0 + s * n1s;
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* xr = xp + b * x0 + h * x1s + s * x2s;
        scalar_t* yr = yp + b * y0 + h * y1s + s * y2s;
        if (!backward) {
          for (int64_t j = 0; j < half; ++j) {
            const scalar_t a = xr[j], e = xr[j + half];
            const scalar_t lo_ = a * c[j] + (-e) * n[j];
            const scalar_t hi_ = e * c[j + half] + a * n[j + half];
            yr[j] = lo_;
            yr[j + half] = hi_;
          }
        } else {
          for (int64_t j = 0; j < half; ++j) {
            const scalar_t a = xr[j], e = xr[j + half];
            const scalar_t lo_ = a * c[j] + e * n[j + half];
            const scalar_t hi_ = e * c[j + half] + (-(a * n[j]));
            yr[j] = lo_;
            yr[j + half] = hi_;
          }
        }
      }
    }
  });
}

void check_rows(const at::Tensor& x, const at::Tensor& y, const at::Tensor& cos, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "rope: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 4 && y.sizes() == x.sizes(), "rope: ", name, " and its output must be (B, H, S, D) of one shape");
  TORCH_CHECK(x.stride(3) == 1 && y.stride(3) == 1, "rope: ", name, " needs a unit last stride");
  TORCH_CHECK(x.size(3) % 2 == 0, "rope: the head dim must be even");
  TORCH_CHECK(x.size(0) == cos.size(0) && x.size(2) == cos.size(1) && x.size(3) == cos.size(2),
              "rope: cos/sin must be (B, S, D) of ", name, "'s B, S and D");
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() && y.scalar_type() == x.scalar_type(),
              "rope: ", name, ", its output and cos/sin must share a dtype");
}

// Writes rope(q) into qo and rope(k) into ko (qo/ko may be q/k).
void rope_fwd(const at::Tensor& q, const at::Tensor& k, at::Tensor qo, at::Tensor ko, const at::Tensor& cos,
              const at::Tensor& sin, bool backward) {
  TORCH_CHECK(cos.dim() == 3 && sin.sizes() == cos.sizes() && cos.stride(2) == 1 && sin.stride(2) == 1,
              "rope: cos and sin must be (B, S, D) of one shape with a unit last stride");
  TORCH_CHECK(cos.device().is_cpu() && sin.device().is_cpu() && sin.scalar_type() == cos.scalar_type(),
              "rope: cos and sin must be CPU tensors of one dtype");
  check_rows(q, qo, cos, "q");
  check_rows(k, ko, cos, "k");
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rope_fwd", [&] {
    rope_rows<scalar_t>(q, qo, cos, sin, backward);
    rope_rows<scalar_t>(k, ko, cos, sin, backward);
  });
}

void register_rotary(pybind11::module_& m) {
  m.def("rope", &rope_fwd, "rotary embedding of q and k (forward, or backward with backward=True), CPU",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("qo"), pybind11::arg("ko"), pybind11::arg("cos"),
        pybind11::arg("sin"), pybind11::arg("backward"));
}
MMFAST_REGISTER(register_rotary);

}  // namespace
}  // namespace mmfast
