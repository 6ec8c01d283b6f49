// Block-wide reductions: warp butterflies (__shfl_xor_sync) then one shared-memory round across the
// ≤ 32 warps. Deterministic: the combination order depends only on blockDim, never on timing.
#pragma once

#include "common.cuh"

namespace exgrpo {

constexpr unsigned kFullMask = 0xffffffffu;

// Log-sum-exp states of all threads -> the block's state, valid in warp 0 (thread 0 writes it).
template <bool ENT>
__device__ __forceinline__ LseState block_lse_merge(LseState st) {
  __shared__ LseState warp_state[32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LseState o;
    o.m = __shfl_xor_sync(kFullMask, st.m, off);
    o.s = __shfl_xor_sync(kFullMask, st.s, off);
    o.u = ENT ? __shfl_xor_sync(kFullMask, st.u, off) : 0.f;
    st = lse_merge<ENT>(st, o);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_state[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < static_cast<int>(blockDim.x >> 5) ? warp_state[lane] : lse_empty();
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      LseState o;
      o.m = __shfl_xor_sync(kFullMask, st.m, off);
      o.s = __shfl_xor_sync(kFullMask, st.s, off);
      o.u = ENT ? __shfl_xor_sync(kFullMask, st.u, off) : 0.f;
      st = lse_merge<ENT>(st, o);
    }
  }
  return st;
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// K values per thread -> the block's K totals, in every thread. `smem` holds 32·K floats.
// blockDim.x must be a multiple of 32. Ends with a barrier, so `smem` may be reused at once.
template <int K, class Op>
__device__ __forceinline__ void block_allreduce(float (&v)[K], Op op, float* smem) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] = op(v[k], __shfl_xor_sync(kFullMask, v[k], off));
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[warp * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {  // every thread folds the ≤ 32 warp totals in the same order
    float acc = smem[k];
    for (int w = 1; w < nw; ++w) acc = op(acc, smem[w * K + k]);
    v[k] = acc;
  }
  __syncthreads();
}

// The reducer that the shared per-question / per-token code (loss.cuh) calls on the device.
struct BlockReducer {
  float* smem;  // 32 · kMaxK floats
  template <int K>
  __device__ __forceinline__ void sum(float (&v)[K]) { block_allreduce<K>(v, SumOp{}, smem); }
  template <int K>
  __device__ __forceinline__ void max(float (&v)[K]) { block_allreduce<K>(v, MaxOp{}, smem); }
};

}  // namespace exgrpo
