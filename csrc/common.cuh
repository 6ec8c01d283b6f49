// Numerics shared by the kernels and by their host emulation (host_emulation.cu): element
// conversion, 16-byte packs, the fast exp/tanh, and the online log-sum-exp state.
//
// Functions marked EXGRPO_HD compile for the device and the host. On the device exp is __expf
// (MUFU.EX2 after one multiply by log2 e: ~2 ulp plus |x|·2^-24 in the exponent, ≤ 2e-6 relative for
// the |z − max| < 20 that carry the sum; Triton's tl.exp is the same instruction); the host build
// uses the libm functions, so the emulation checks the algorithm, not the intrinsics.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define EXGRPO_HD __host__ __device__ __forceinline__

namespace exgrpo {

constexpr float kInf = INFINITY;

EXGRPO_HD float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return std::exp(x);
#endif
}

// tanh(x) = 1 − 2/(e^{2x} + 1): one MUFU.EX2 and one MUFU.RCP, saturating to ±1 at ±inf (the
// approximate division returns 0 for a denominator ≥ 2^126). Absolute error ~1e-7, the same
// formula as the Triton epilogue; tanhf's accurate path is several times the instructions.
EXGRPO_HD float fast_tanh(float x) {
#ifdef __CUDA_ARCH__
  return 1.f - __fdividef(2.f, __expf(2.f * x) + 1.f);
#else
  return 1.f - 2.f / (std::exp(2.f * x) + 1.f);
#endif
}

// ---------------------------------------------------------------- element types and 16-byte packs

template <typename T> EXGRPO_HD float to_f32(T v);
template <> EXGRPO_HD float to_f32<float>(float v) { return v; }
template <> EXGRPO_HD float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> EXGRPO_HD float to_f32<__half>(__half v) { return __half2float(v); }

// A 16-byte pack: 8 bf16/fp16 or 4 fp32 values, one LDG.128 / STG.128 per thread.
template <typename T> struct Pack { static constexpr int N = 16 / sizeof(T); };

template <typename T>
EXGRPO_HD void unpack(const uint4& raw, float (&f)[Pack<T>::N]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < Pack<T>::N; ++k) f[k] = to_f32<T>(e[k]);
}

template <typename T> EXGRPO_HD uint4 pack(const float (&f)[Pack<T>::N]);
template <> EXGRPO_HD uint4 pack<float>(const float (&f)[4]) {
  uint4 raw;
  float* e = reinterpret_cast<float*>(&raw);
#pragma unroll
  for (int k = 0; k < 4; ++k) e[k] = f[k];
  return raw;
}
template <> EXGRPO_HD uint4 pack<__nv_bfloat16>(const float (&f)[8]) {
  uint4 raw;
  __nv_bfloat162* e = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int k = 0; k < 4; ++k) e[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);  // round to nearest even
  return raw;
}
template <> EXGRPO_HD uint4 pack<__half>(const float (&f)[8]) {
  uint4 raw;
  __half2* e = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int k = 0; k < 4; ++k) e[k] = __floats2half2_rn(f[2 * k], f[2 * k + 1]);
  return raw;
}

template <typename T> EXGRPO_HD T from_f32(float v);
template <> EXGRPO_HD float from_f32<float>(float v) { return v; }
template <> EXGRPO_HD __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> EXGRPO_HD __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Read-only 16-byte load through the non-coherent (texture) path; the host copies.
EXGRPO_HD uint4 load16_ro(const void* p) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const uint4*>(p));
#else
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
#endif
}

// Elements before the row's first 16-byte boundary. Rows of a [n, V] chunk start misaligned when
// V·sizeof(T) is not a multiple of 16 (V = 1031 bf16: every row but the first); those few elements
// are read one by one so that the body can use 16-byte packs.
template <typename T>
EXGRPO_HD int head_elems(const T* row, int V) {
  const int h = static_cast<int>(((16u - static_cast<unsigned>(reinterpret_cast<uintptr_t>(row) & 15u)) & 15u) /
                                 sizeof(T));
  return h < V ? h : V;
}

// ---------------------------------------------------------------- logits

struct LogitMap {
  float inv_temp;     // 1/T
  float inv_softcap;  // 1/s
  float cap_scale;    // s/T
};

// z = cap(x)/T; with Slope, also ∂z/∂x = (1 − tanh²(x/s))/T (1/T without a cap).
template <bool CAP>
EXGRPO_HD float logit(float x, const LogitMap& mp) {
  if constexpr (CAP) {
    return mp.cap_scale * fast_tanh(x * mp.inv_softcap);
  } else {
    return x * mp.inv_temp;
  }
}

template <bool CAP>
EXGRPO_HD float logit_slope(float x, const LogitMap& mp, float& dzdx) {
  if constexpr (CAP) {
    const float t = fast_tanh(x * mp.inv_softcap);
    dzdx = (1.f - t * t) * mp.inv_temp;
    return mp.cap_scale * t;
  } else {
    dzdx = mp.inv_temp;
    return x * mp.inv_temp;
  }
}

// ---------------------------------------------------------------- online log-sum-exp

// The running state of one row (or one thread's share of it), relative to the running max m:
//   s = Σ e^{z−m},  u = Σ e^{z−m}·(z−m)
// On a new max m' the old terms scale by α = e^{m−m'} and shift by (m − m'):
//   s ← α·s + Σ_new e^{z−m'},   u ← α·(u + s·(m − m')) + Σ_new e^{z−m'}·(z−m')
// and at the end lse = m + log s, H = log s − u/s. H comes from O(1) quantities, so it keeps its
// relative precision when the logits are large (lse − Σ p·z would cancel).
// An empty state has m = −inf, s = 0: the guards below keep 0·(−inf) out of u.
struct LseState {
  float m, s, u;
};

EXGRPO_HD LseState lse_empty() { return LseState{-kInf, 0.f, 0.f}; }

// K new logits at once: one max over the K, one rescale, K exps (K = 8 for a bf16 pack).
template <bool ENT, int K>
EXGRPO_HD void lse_add(LseState& st, const float (&z)[K]) {
  float mx = z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) mx = fmaxf(mx, z[k]);
  const float m_new = fmaxf(st.m, mx);
  const float alpha = fast_exp(st.m - m_new);  // 0 while the state is empty
  float se = 0.f, ue = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = z[k] - m_new;
    const float e = fast_exp(d);
    se += e;
    if constexpr (ENT) ue = fmaf(e, d, ue);
  }
  if constexpr (ENT) st.u = alpha * (st.u + (st.s > 0.f ? st.s * (st.m - m_new) : 0.f)) + ue;
  st.s = fmaf(alpha, st.s, se);
  st.m = m_new;
}

// Merge two states (associative and commutative up to rounding); either may be empty.
template <bool ENT>
EXGRPO_HD LseState lse_merge(const LseState& a, const LseState& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -kInf) return a;  // both empty
  const float ea = fast_exp(a.m - m), eb = fast_exp(b.m - m);
  LseState r;
  r.m = m;
  r.s = ea * a.s + eb * b.s;
  r.u = 0.f;
  if constexpr (ENT) {
    r.u = (a.s > 0.f ? ea * (a.u + a.s * (a.m - m)) : 0.f) + (b.s > 0.f ? eb * (b.u + b.s * (b.m - m)) : 0.f);
  }
  return r;
}

}  // namespace exgrpo
