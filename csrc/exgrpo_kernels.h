// Launchers of exgrpo's CUDA C++ kernels: the only interface between the kernel translation units
// (lmhead_epilogue.cu, loss.cu; plain CUDA C++, no torch headers, so CI can compile them with nvcc
// alone) and the torch binding (bindings.cpp, which owns checks, allocation, streams and NVTX).
//
// Every pointer is a device pointer to a contiguous buffer; every launcher is asynchronous on
// `stream` and returns cudaGetLastError() after its launch. Shapes are validated by the caller.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace exgrpo {

constexpr int64_t kIgnoreIndex = -100;  // a target that takes no part (padding, prompt tokens)
constexpr int kLossSums = 6;            // loss, clip_low, clip_high, kl, ratio, aux_nll (_loss.SUM_NAMES)

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// z = cap(x) / T, cap(x) = softcap·tanh(x / softcap); softcap <= 0 means no cap.
struct LogitArgs {
  float inv_temp;
  float softcap;
};

// ---------------------------------------------------------------- LM-head chunk epilogue

// One read of the chunk x [n, V] (row-major, dtype dt). Per row r, in fp32:
//   lse[r] = log Σ_j e^{z_rj},  zt[r] = z_r,target,  ent[r] = −Σ_j p_rj log p_rj  (if ent != nullptr)
// Rows whose target is kIgnoreIndex get 0 in all three and are not read; a target outside [0, V)
// gives NaN (never an out-of-bounds read).
cudaError_t launch_lmhead_stats(DType dt, const void* x, int64_t n, int64_t V, const int64_t* targets,
                                float* lse, float* zt, float* ent, LogitArgs la, cudaStream_t stream);

// The vector-Jacobian product of lmhead_stats, written over x in place:
//   x_rj := [g_zt[r]·1[j = t_r] + g_lse[r]·p_rj + g_ent[r]·p_rj·(E_r z − z_rj)] · cap'(x_rj) / T
// with p = e^{z − lse} and E_r z = lse[r] − ent[r]. g_ent == nullptr drops the entropy term (ent is
// then not read). Rows whose target is kIgnoreIndex are overwritten with zeros.
cudaError_t launch_lmhead_stats_backward(DType dt, void* x, int64_t n, int64_t V, const int64_t* targets,
                                         const float* lse, const float* ent, const float* g_lse,
                                         const float* g_zt, const float* g_ent, LogitArgs la,
                                         cudaStream_t stream);

// ---------------------------------------------------------------- advantages and loss terms

// One block per question q of the [Q, G] outcome / is_full (docs/method.md Stage 3, steps 4-5):
// fired[q], total [Q, G], centred [Q, G] and scaled = centred / (Bessel std + eps) [Q, G].
cudaError_t launch_advantages(const float* outcome, const bool* is_full, int64_t Q, int64_t G, float delta,
                              float nu, float eps, bool by_scenario, float* centred, float* scaled, float* total,
                              bool* fired, cudaStream_t stream);

// Number of blocks (rows of `partial`) that launch_loss_terms writes for n tokens.
int64_t loss_terms_blocks(int64_t n);

// Per token: coef[i] = ∂loss/∂logp_i; per block b: partial[b, 0..kLossSums) = the block's share of
// the sums in _loss.SUM_NAMES order (no atomics: the caller reduces the rows in a fixed order).
// old, ref, sft may be nullptr (on-policy; no KL; no SFT mask).
cudaError_t launch_loss_terms(const float* logp, const float* adv, const float* scale, const float* aux,
                              const bool* mask, const float* old, const float* ref, const bool* sft, int64_t n,
                              float eps_low, float eps_high, float beta, float* coef, float* partial,
                              cudaStream_t stream);

}  // namespace exgrpo
