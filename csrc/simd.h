// Shared by the C++ CPU kernels: the AVX2 / AVX-512 clones of the hot loops, and elementwise math written
// branch-free so that `#pragma omp simd` loops calling it vectorise.
//
// Include it after every other header: from here on a·b + c is fused into one FMA (one rounding; ISO C++
// mode turns contraction off), and the vectoriser may if-convert float compares and float→int conversions,
// which it refuses while floating-point traps are assumed observable (PyTorch builds itself with
// -fno-trapping-math too). Only the including file's own code is affected; the helpers avoid std:: calls,
// which were compiled without these options.
#pragma once

#include <cstdint>

#pragma GCC optimize("fp-contract=fast", "no-trapping-math")

namespace mmfast {

// The extension is built for baseline x86-64; the elementwise tile passes are cloned for
// AVX2 and AVX-512 and picked at load time (GCC ifunc), so one binary is fast everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MMF_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMF_SIMD_CLONES
#endif
#define MMF_INLINE inline __attribute__((always_inline))

MMF_INLINE float fmax2(float a, float b) { return a > b ? a : b; }

// exp for x <= 88 (every call here has x <= 0): Cody–Waite reduction to r ∈ [−ln2/2, ln2/2],
// degree-7 Taylor polynomial (truncation < 6e-9; max error 1.7 ulp measured), 2^n from the
// exponent bits. Branch-free so the compiler vectorises it; x < −87.3 (incl. −inf) gives 0.
MMF_INLINE float vexp(float x) {
  const bool under = x < -87.33654f;
  x = x < -87.33654f ? -87.33654f : (x > 88.0f ? 88.0f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return under ? 0.0f : p * __builtin_bit_cast(float, bits);
}

// log1p(u) for u ∈ [0, 1] as 2·atanh(t) with t = u / (2 + u) ∈ [0, 1/3]: no rounding of 1 + u,
// series Σ t^(2k+1)/(2k+1) to k = 8 (truncation < 2e-10 relative), leading term kept apart;
// max error 3 ulp measured.
MMF_INLINE float vlog1p(float u) {
  const float t2x = 2.0f * u / (2.0f + u);  // 2t
  const float t2 = 0.25f * t2x * t2x;
  float q = 1.0f / 17.0f;
  q = q * t2 + 1.0f / 15.0f;
  q = q * t2 + 1.0f / 13.0f;
  q = q * t2 + 1.0f / 11.0f;
  q = q * t2 + 1.0f / 9.0f;
  q = q * t2 + 1.0f / 7.0f;
  q = q * t2 + 1.0f / 5.0f;
  q = q * t2 + 1.0f / 3.0f;
  return t2x + t2x * (t2 * q);
}

// softplus(x) = max(x, 0) + log1p(exp(−|x|))
MMF_INLINE float vsoftplus(float x) { return fmax2(x, 0.0f) + vlog1p(vexp(x > 0.0f ? -x : x)); }

// σ(x) from exp(−|x|) ≤ 1, so it never overflows.
MMF_INLINE float vsigmoid(float x) {
  const float e = vexp(x > 0.0f ? -x : x);
  const float inv = 1.0f / (1.0f + e);
  return x >= 0.0f ? inv : e * inv;
}

}  // namespace mmfast
