// The two small steps of ExGRPO on the device: group advantages with the dialogue-structure bonus
// (one block per question) and the per-token clipped policy loss with its per-block partial sums.
// Both are memory-bound and tiny next to the LM head: the loss reads 4 fp32 + 2 bool per token and
// writes 1 fp32 (≈ 20 B/token: 16384 tokens = 330 KB, a few µs); the advantages touch 5 B per
// trajectory. They are kernels so that one launch replaces a dozen elementwise torch ops and their
// temporaries inside the fused LM-head pass. The arithmetic is in loss.cuh.
#include <cuda_runtime.h>

#include "block_reduce.cuh"
#include "exgrpo_kernels.h"
#include "loss.cuh"

namespace exgrpo {
namespace {

constexpr int kAdvMaxThreads = 1024;

__global__ void __launch_bounds__(kAdvMaxThreads)
    advantages_kernel(const float* __restrict__ outcome, const bool* __restrict__ is_full, int G, AdvArgs p,
                      float* __restrict__ centred, float* __restrict__ scaled, float* __restrict__ total,
                      bool* __restrict__ fired) {
  __shared__ float smem[32 * 4];
  BlockReducer red{smem};
  const int64_t q = blockIdx.x;
  const int64_t off = q * G;
  advantages_question(outcome + off, is_full + off, G, threadIdx.x, blockDim.x, p, centred + off, scaled + off,
                      total + off, fired + q, red);
}

__global__ void __launch_bounds__(kLossThreads) loss_terms_kernel(LossArgs a, float* __restrict__ partial) {
  __shared__ float smem[32 * kLossSums];
  float acc[kLossSums] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  loss_tile_thread(a, blockIdx.x, threadIdx.x, blockDim.x, acc);
  BlockReducer{smem}.sum(acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kLossSums; ++k) partial[static_cast<int64_t>(blockIdx.x) * kLossSums + k] = acc[k];
  }
}

}  // namespace

cudaError_t launch_advantages(const float* outcome, const bool* is_full, int64_t Q, int64_t G, float delta, float nu,
                              float eps, bool by_scenario, float* centred, float* scaled, float* total, bool* fired,
                              cudaStream_t stream) {
  if (Q == 0) return cudaSuccess;
  // One thread per trajectory up to 1024 (G = 16 in the paper's set-up: one warp), whole warps;
  // larger groups loop.
  const int64_t warps = (G + 31) / 32;
  const int threads = static_cast<int>(warps >= kAdvMaxThreads / 32 ? kAdvMaxThreads : (warps < 1 ? 32 : warps * 32));
  AdvArgs p{delta, nu, eps, by_scenario};
  advantages_kernel<<<dim3(static_cast<unsigned>(Q)), dim3(threads), 0, stream>>>(
      outcome, is_full, static_cast<int>(G), p, centred, scaled, total, fired);
  return cudaGetLastError();
}

int64_t loss_terms_blocks(int64_t n) { return (n + kLossTile - 1) / kLossTile; }

cudaError_t launch_loss_terms(const float* logp, const float* adv, const float* scale, const float* aux,
                              const bool* mask, const float* old, const float* ref, const bool* sft, int64_t n,
                              float eps_low, float eps_high, float beta, float* coef, float* partial,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  LossArgs a{logp, adv, scale, aux, mask, old, ref, sft, n, eps_low, eps_high, beta, coef};
  loss_terms_kernel<<<dim3(static_cast<unsigned>(loss_terms_blocks(n))), dim3(kLossThreads), 0, stream>>>(a, partial);
  return cudaGetLastError();
}

}  // namespace exgrpo
