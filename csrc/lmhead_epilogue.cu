// The LM-head chunk epilogue: one CTA per row of the [n, V] logits chunk that a cuBLAS GEMM just
// wrote (kernels/_lmhead.py drives the chunks and the GEMMs).
//
//   lmhead_stats_kernel     reads the row once:   lse, z[target], entropy          (fp32)
//   lmhead_backward_kernel  reads + writes it:    x := ∂L/∂x in place              (input dtype)
//
// Bytes, per chunk of n rows at V logits of b bytes (bf16: b = 2): stats reads n·V·b, backward reads
// and writes n·V·b. Gemma-7B, n = 4096, V = 256000, bf16: 2.1 GB + 4.2 GB = 6.3 GB ≈ 1.5 ms at the
// H200's 4.3 TB/s, against the chunk's 3 GEMMs, 6·n·H·V = 19.3 TFLOP ≈ 24 ms at its measured
// ~790 TFLOP/s: at the HBM rate the epilogue is ≈ 6 % of the chunk (issue 6 allows 10 %).
// Work per logit: stats 1 exp (MUFU.EX2) + 1/8 for the per-pack rescale and ~6 FP32 ops; backward 1
// exp and ~8 ops. At 2 B/logit HBM delivers ~2.2·10^12 logits/s to stats (half that to backward),
// against ~3.7·10^12 MUFU and ~3·10^13 FP32 ops/s on 132 SMs: memory-bound. A softcap adds 1 exp +
// 1 rcp per logit, which makes stats MUFU-bound (~1.7× its memory time).
#include <cuda_runtime.h>

#include "block_reduce.cuh"
#include "exgrpo_kernels.h"
#include "lmhead_epilogue.cuh"

namespace exgrpo {
namespace {

constexpr int kMaxThreads = 256;

template <typename T, bool CAP, bool ENT>
__global__ void __launch_bounds__(kMaxThreads)
    lmhead_stats_kernel(const T* __restrict__ x, int V, const int64_t* __restrict__ targets, float* __restrict__ lse,
                        float* __restrict__ zt, float* __restrict__ ent, LogitMap mp) {
  const int64_t r = blockIdx.x;
  const int64_t t = targets[r];
  if (t == kIgnoreIndex) {  // padding: the whole CTA leaves without reading the row
    if (threadIdx.x == 0) {
      lse[r] = 0.f;
      zt[r] = 0.f;
      if constexpr (ENT) ent[r] = 0.f;
    }
    return;
  }
  const T* row = x + r * V;
  LseState st = stats_partial<T, CAP, ENT>(row, V, threadIdx.x, blockDim.x, mp);
  st = block_lse_merge<ENT>(st);
  if (threadIdx.x == 0) {
    const bool ok = 0 <= t && t < V;
    const float log_s = logf(st.s);
    lse[r] = ok ? st.m + log_s : NAN;
    zt[r] = ok ? logit<CAP>(to_f32<T>(row[t]), mp) : NAN;  // one more 2-byte read, from L2
    if constexpr (ENT) ent[r] = log_s - st.u / st.s;
  }
}

template <typename T, bool CAP, bool GENT>
__global__ void __launch_bounds__(kMaxThreads)
    lmhead_backward_kernel(T* __restrict__ x, int V, const int64_t* __restrict__ targets,
                           const float* __restrict__ lse, const float* __restrict__ ent,
                           const float* __restrict__ g_lse, const float* __restrict__ g_zt,
                           const float* __restrict__ g_ent, LogitMap mp) {
  const int64_t r = blockIdx.x;
  const int64_t t = targets[r];
  T* row = x + r * V;
  if (t == kIgnoreIndex) {
    zero_row<T>(row, V, threadIdx.x, blockDim.x);
    return;
  }
  GradRow g;
  g.lse = lse[r];
  g.g_lse = g_lse[r];
  g.g_zt = g_zt[r];
  g.target = (0 <= t && t < V) ? static_cast<int>(t) : -1;
  g.ez = 0.f;
  g.g_ent = 0.f;
  if constexpr (GENT) {
    g.ez = g.lse - ent[r];
    g.g_ent = g_ent[r];
  }
  grad_row<T, CAP, GENT>(row, V, threadIdx.x, blockDim.x, g, mp);
}

// Threads per row: enough 16-byte packs for each thread to have one, in whole warps, at most 256.
template <typename T>
int threads_for(int64_t V) {
  const int64_t packs = (V + Pack<T>::N - 1) / Pack<T>::N;
  const int64_t warps = (packs + 31) / 32;
  return static_cast<int>(warps >= kMaxThreads / 32 ? kMaxThreads : (warps < 1 ? 32 : warps * 32));
}

template <typename T, bool CAP>
cudaError_t stats_typed(const void* x, int64_t n, int64_t V, const int64_t* targets, float* lse, float* zt,
                        float* ent, const LogitMap& mp, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n)), block(threads_for<T>(V));
  const T* xt = static_cast<const T*>(x);
  if (ent != nullptr) {
    lmhead_stats_kernel<T, CAP, true><<<grid, block, 0, stream>>>(xt, static_cast<int>(V), targets, lse, zt, ent, mp);
  } else {
    lmhead_stats_kernel<T, CAP, false><<<grid, block, 0, stream>>>(xt, static_cast<int>(V), targets, lse, zt, ent, mp);
  }
  return cudaGetLastError();
}

template <typename T, bool CAP>
cudaError_t backward_typed(void* x, int64_t n, int64_t V, const int64_t* targets, const float* lse, const float* ent,
                           const float* g_lse, const float* g_zt, const float* g_ent, const LogitMap& mp,
                           cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(n)), block(threads_for<T>(V));
  T* xt = static_cast<T*>(x);
  if (g_ent != nullptr) {
    lmhead_backward_kernel<T, CAP, true>
        <<<grid, block, 0, stream>>>(xt, static_cast<int>(V), targets, lse, ent, g_lse, g_zt, g_ent, mp);
  } else {
    lmhead_backward_kernel<T, CAP, false>
        <<<grid, block, 0, stream>>>(xt, static_cast<int>(V), targets, lse, ent, g_lse, g_zt, g_ent, mp);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_lmhead_stats(DType dt, const void* x, int64_t n, int64_t V, const int64_t* targets, float* lse,
                                float* zt, float* ent, LogitArgs la, cudaStream_t stream) {
  if (n == 0 || V == 0) return cudaSuccess;
  const LogitMap mp = make_logit_map(la.inv_temp, la.softcap);
  const bool cap = la.softcap > 0.f;
  switch (dt) {
    case DType::kFloat32:
      return cap ? stats_typed<float, true>(x, n, V, targets, lse, zt, ent, mp, stream)
                 : stats_typed<float, false>(x, n, V, targets, lse, zt, ent, mp, stream);
    case DType::kBFloat16:
      return cap ? stats_typed<__nv_bfloat16, true>(x, n, V, targets, lse, zt, ent, mp, stream)
                 : stats_typed<__nv_bfloat16, false>(x, n, V, targets, lse, zt, ent, mp, stream);
    case DType::kFloat16:
      return cap ? stats_typed<__half, true>(x, n, V, targets, lse, zt, ent, mp, stream)
                 : stats_typed<__half, false>(x, n, V, targets, lse, zt, ent, mp, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_lmhead_stats_backward(DType dt, void* x, int64_t n, int64_t V, const int64_t* targets,
                                         const float* lse, const float* ent, const float* g_lse, const float* g_zt,
                                         const float* g_ent, LogitArgs la, cudaStream_t stream) {
  if (n == 0 || V == 0) return cudaSuccess;
  const LogitMap mp = make_logit_map(la.inv_temp, la.softcap);
  const bool cap = la.softcap > 0.f;
  switch (dt) {
    case DType::kFloat32:
      return cap ? backward_typed<float, true>(x, n, V, targets, lse, ent, g_lse, g_zt, g_ent, mp, stream)
                 : backward_typed<float, false>(x, n, V, targets, lse, ent, g_lse, g_zt, g_ent, mp, stream);
    case DType::kBFloat16:
      return cap ? backward_typed<__nv_bfloat16, true>(x, n, V, targets, lse, ent, g_lse, g_zt, g_ent, mp, stream)
                 : backward_typed<__nv_bfloat16, false>(x, n, V, targets, lse, ent, g_lse, g_zt, g_ent, mp, stream);
    case DType::kFloat16:
      return cap ? backward_typed<__half, true>(x, n, V, targets, lse, ent, g_lse, g_zt, g_ent, mp, stream)
                 : backward_typed<__half, false>(x, n, V, targets, lse, ent, g_lse, g_zt, g_ent, mp, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace exgrpo
