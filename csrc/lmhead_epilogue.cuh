// One thread's share of the LM-head epilogue over one row of the logits chunk. The kernels in
// lmhead_epilogue.cu run these with (tid, nt) = (threadIdx.x, blockDim.x); host_emulation.cu runs
// the very same functions for every tid in turn to check the partition and the arithmetic on a CPU.
//
// A row of V logits is walked as [head | 16-byte packs | tail]: head = elements before the first
// 16-byte boundary, then thread tid takes packs tid, tid + nt, ... (consecutive threads read
// consecutive 16 B: fully coalesced 512 B per warp), kUnroll packs in flight per thread, then the
// < 16 B tail element by element. Every element is visited by exactly one thread.
#pragma once

#include "common.cuh"

namespace exgrpo {

// 4 packs per thread per iteration = 64 B in flight per thread, 16 KB per 256-thread block: with
// 4+ resident blocks per SM that is well above the ~15 KB/SM that Little's law asks for to stream
// HBM3 (3.35 TB/s × ~600 ns latency / 132 SMs).
constexpr int kUnroll = 4;

// ---------------------------------------------------------------- statistics (read only)

template <typename T, bool CAP, bool ENT>
EXGRPO_HD LseState stats_partial(const T* row, int V, int tid, int nt, const LogitMap& mp) {
  constexpr int N = Pack<T>::N;
  LseState st = lse_empty();
  const int head = head_elems(row, V);
  for (int j = tid; j < head; j += nt) {
    const float z[1] = {logit<CAP>(to_f32<T>(row[j]), mp)};
    lse_add<ENT>(st, z);
  }
  const T* body = row + head;
  const int npack = (V - head) / N;
  for (int i0 = tid; i0 < npack; i0 += kUnroll * nt) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // issue every load before the first exp
      const int i = i0 + u * nt;
      if (i < npack) raw[u] = load16_ro(body + static_cast<int64_t>(i) * N);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u * nt < npack) {
        float z[N];
        unpack<T>(raw[u], z);
#pragma unroll
        for (int k = 0; k < N; ++k) z[k] = logit<CAP>(z[k], mp);
        lse_add<ENT>(st, z);
      }
    }
  }
  for (int j = head + npack * N + tid; j < V; j += nt) {
    const float z[1] = {logit<CAP>(to_f32<T>(row[j]), mp)};
    lse_add<ENT>(st, z);
  }
  return st;
}

// ---------------------------------------------------------------- gradient (read + write in place)

struct GradRow {
  float lse;    // log Σ e^z
  float ez;     // E_p[z] = lse − H (entropy term only)
  float g_lse;  // upstream ∂L/∂lse
  float g_zt;   // upstream ∂L/∂z_target
  float g_ent;  // upstream ∂L/∂H (entropy term only)
  int target;   // −1 when the target is outside [0, V): no element matches
};

// ∂L/∂x_j = [g_zt·1[j = t] + g_lse·p_j + g_ent·p_j·(Ez − z_j)] · ∂z_j/∂x_j, with ∂H/∂z_j = p_j(Ez − z_j).
template <bool CAP, bool GENT>
EXGRPO_HD float dlogit(float x, int j, const GradRow& g, const LogitMap& mp) {
  float dzdx;
  const float z = logit_slope<CAP>(x, mp, dzdx);
  const float p = fast_exp(z - g.lse);
  float dz = g.g_lse * p;
  if constexpr (GENT) dz = fmaf(g.g_ent * p, g.ez - z, dz);
  if (j == g.target) dz += g.g_zt;
  return dz * dzdx;
}

template <typename T, bool CAP, bool GENT>
EXGRPO_HD void grad_row(T* row, int V, int tid, int nt, const GradRow& g, const LogitMap& mp) {
  constexpr int N = Pack<T>::N;
  const int head = head_elems(row, V);
  for (int j = tid; j < head; j += nt) row[j] = from_f32<T>(dlogit<CAP, GENT>(to_f32<T>(row[j]), j, g, mp));
  T* body = row + head;
  const int npack = (V - head) / N;
  for (int i0 = tid; i0 < npack; i0 += kUnroll * nt) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // plain loads: this kernel writes the same addresses
      const int i = i0 + u * nt;
      if (i < npack) raw[u] = *reinterpret_cast<const uint4*>(body + static_cast<int64_t>(i) * N);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * nt;
      if (i < npack) {
        float f[N];
        unpack<T>(raw[u], f);
        const int j0 = head + i * N;
#pragma unroll
        for (int k = 0; k < N; ++k) f[k] = dlogit<CAP, GENT>(f[k], j0 + k, g, mp);
        *reinterpret_cast<uint4*>(body + static_cast<int64_t>(i) * N) = pack<T>(f);
      }
    }
  }
  for (int j = head + npack * N + tid; j < V; j += nt) {
    row[j] = from_f32<T>(dlogit<CAP, GENT>(to_f32<T>(row[j]), j, g, mp));
  }
}

// Ignored rows: exact zeros without reading x (a NaN in a padding row must not leak into dW).
template <typename T>
EXGRPO_HD void zero_row(T* row, int V, int tid, int nt) {
  constexpr int N = Pack<T>::N;
  const int head = head_elems(row, V);
  const T zero = from_f32<T>(0.f);
  for (int j = tid; j < head; j += nt) row[j] = zero;
  T* body = row + head;
  const int npack = (V - head) / N;
  const uint4 z4 = make_uint4(0u, 0u, 0u, 0u);  // +0.0 is all-zero bits in fp32, bf16 and fp16
  for (int i = tid; i < npack; i += nt) *reinterpret_cast<uint4*>(body + static_cast<int64_t>(i) * N) = z4;
  for (int j = head + npack * N + tid; j < V; j += nt) row[j] = zero;
}

EXGRPO_HD LogitMap make_logit_map(float inv_temp, float softcap) {
  LogitMap mp;
  mp.inv_temp = inv_temp;
  mp.inv_softcap = softcap > 0.f ? 1.f / softcap : 1.f;
  mp.cap_scale = softcap > 0.f ? softcap * inv_temp : inv_temp;
  return mp;
}

}  // namespace exgrpo
