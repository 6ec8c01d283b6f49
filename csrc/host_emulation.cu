// Host emulation of the kernels, for CI without a GPU (tests/test_csrc_host.py). Not part of the
// extension: built with `nvcc -shared -Xcompiler -fPIC` and loaded with ctypes.
//
// It runs the kernels' own per-thread functions (lmhead_epilogue.cuh, loss.cuh) for every thread
// of a block in turn, and merges the threads' log-sum-exp states in the order of the device's
// butterflies (block_reduce.cuh). So it checks, on a CPU: the row partition (misaligned heads,
// 16-byte packs, unrolled strides, tails), the online recurrence and its merges, the entropy and
// gradient formulas, ignored rows, the loss terms and the advantages. What it cannot check: the
// intrinsics (__expf, __fdividef: libm here), warp shuffles, barriers, and the launch itself. Those
// are covered by tests/test_csrc_gpu.py on a GPU.
#include <vector>

#include "exgrpo_kernels.h"
#include "lmhead_epilogue.cuh"
#include "loss.cuh"

namespace exgrpo {
namespace {

// block_lse_merge: xor butterflies within each warp, then warp 0 over the warps' results.
template <bool ENT>
LseState merge_like_device(std::vector<LseState> st) {
  const int nt = static_cast<int>(st.size());
  auto butterfly = [](LseState* lane) {
    for (int off = 16; off > 0; off >>= 1) {
      LseState next[32];
      for (int l = 0; l < 32; ++l) next[l] = lse_merge<ENT>(lane[l], lane[l ^ off]);
      for (int l = 0; l < 32; ++l) lane[l] = next[l];
    }
  };
  const int nw = nt / 32;
  LseState warp0[32];
  for (int w = 0; w < nw; ++w) {
    butterfly(&st[w * 32]);
    warp0[w] = st[w * 32];
  }
  for (int l = nw; l < 32; ++l) warp0[l] = lse_empty();
  butterfly(warp0);
  return warp0[0];
}

struct NoReducer {  // one "thread" (nt = 1) already holds the whole question
  template <int K> void sum(float (&)[K]) {}
  template <int K> void max(float (&)[K]) {}
};

template <typename T, bool CAP, bool ENT>
void stats_rows(const void* x, int64_t n, int V, const int64_t* targets, float* lse, float* zt, float* ent,
                const LogitMap& mp, int nt) {
  for (int64_t r = 0; r < n; ++r) {
    const int64_t t = targets[r];
    if (t == kIgnoreIndex) {
      lse[r] = zt[r] = 0.f;
      if (ENT) ent[r] = 0.f;
      continue;
    }
    const T* row = static_cast<const T*>(x) + r * V;
    std::vector<LseState> st(nt);
    for (int tid = 0; tid < nt; ++tid) st[tid] = stats_partial<T, CAP, ENT>(row, V, tid, nt, mp);
    const LseState b = merge_like_device<ENT>(st);
    const bool ok = 0 <= t && t < V;
    const float log_s = logf(b.s);
    lse[r] = ok ? b.m + log_s : NAN;
    zt[r] = ok ? logit<CAP>(to_f32<T>(row[t]), mp) : NAN;
    if (ENT) ent[r] = log_s - b.u / b.s;
  }
}

template <typename T, bool CAP, bool GENT>
void backward_rows(void* x, int64_t n, int V, const int64_t* targets, const float* lse, const float* ent,
                   const float* g_lse, const float* g_zt, const float* g_ent, const LogitMap& mp, int nt) {
  for (int64_t r = 0; r < n; ++r) {
    T* row = static_cast<T*>(x) + r * V;
    const int64_t t = targets[r];
    if (t == kIgnoreIndex) {
      for (int tid = 0; tid < nt; ++tid) zero_row<T>(row, V, tid, nt);
      continue;
    }
    GradRow g{lse[r], GENT ? lse[r] - ent[r] : 0.f, g_lse[r], g_zt[r], GENT ? g_ent[r] : 0.f,
              (0 <= t && t < V) ? static_cast<int>(t) : -1};
    for (int tid = 0; tid < nt; ++tid) grad_row<T, CAP, GENT>(row, V, tid, nt, g, mp);
  }
}

template <typename T>
void stats_dispatch(const void* x, int64_t n, int V, const int64_t* t, float* lse, float* zt, float* ent,
                    const LogitMap& mp, bool cap, int nt) {
  if (cap) {
    ent ? stats_rows<T, true, true>(x, n, V, t, lse, zt, ent, mp, nt)
        : stats_rows<T, true, false>(x, n, V, t, lse, zt, ent, mp, nt);
  } else {
    ent ? stats_rows<T, false, true>(x, n, V, t, lse, zt, ent, mp, nt)
        : stats_rows<T, false, false>(x, n, V, t, lse, zt, ent, mp, nt);
  }
}

template <typename T>
void backward_dispatch(void* x, int64_t n, int V, const int64_t* t, const float* lse, const float* ent,
                       const float* g_lse, const float* g_zt, const float* g_ent, const LogitMap& mp, bool cap,
                       int nt) {
  if (cap) {
    g_ent ? backward_rows<T, true, true>(x, n, V, t, lse, ent, g_lse, g_zt, g_ent, mp, nt)
          : backward_rows<T, true, false>(x, n, V, t, lse, ent, g_lse, g_zt, g_ent, mp, nt);
  } else {
    g_ent ? backward_rows<T, false, true>(x, n, V, t, lse, ent, g_lse, g_zt, g_ent, mp, nt)
          : backward_rows<T, false, false>(x, n, V, t, lse, ent, g_lse, g_zt, g_ent, mp, nt);
  }
}

}  // namespace
}  // namespace exgrpo

using namespace exgrpo;

// dtype: 0 fp32, 1 bf16, 2 fp16 (DType). nt: threads per block to emulate (a multiple of 32, ≤ 1024).
extern "C" int emu_lmhead_stats(int dtype, const void* x, int64_t n, int64_t V, const int64_t* targets, float* lse,
                                float* zt, float* ent, float inv_temp, float softcap, int nt) {
  if (nt <= 0 || nt % 32 != 0 || nt > 1024) return 1;
  const LogitMap mp = make_logit_map(inv_temp, softcap);
  const bool cap = softcap > 0.f;
  const int v = static_cast<int>(V);
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: stats_dispatch<float>(x, n, v, targets, lse, zt, ent, mp, cap, nt); return 0;
    case DType::kBFloat16: stats_dispatch<__nv_bfloat16>(x, n, v, targets, lse, zt, ent, mp, cap, nt); return 0;
    case DType::kFloat16: stats_dispatch<__half>(x, n, v, targets, lse, zt, ent, mp, cap, nt); return 0;
  }
  return 2;
}

extern "C" int emu_lmhead_stats_backward(int dtype, void* x, int64_t n, int64_t V, const int64_t* targets,
                                         const float* lse, const float* ent, const float* g_lse, const float* g_zt,
                                         const float* g_ent, float inv_temp, float softcap, int nt) {
  if (nt <= 0 || nt % 32 != 0 || nt > 1024) return 1;
  const LogitMap mp = make_logit_map(inv_temp, softcap);
  const bool cap = softcap > 0.f;
  const int v = static_cast<int>(V);
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32:
      backward_dispatch<float>(x, n, v, targets, lse, ent, g_lse, g_zt, g_ent, mp, cap, nt);
      return 0;
    case DType::kBFloat16:
      backward_dispatch<__nv_bfloat16>(x, n, v, targets, lse, ent, g_lse, g_zt, g_ent, mp, cap, nt);
      return 0;
    case DType::kFloat16:
      backward_dispatch<__half>(x, n, v, targets, lse, ent, g_lse, g_zt, g_ent, mp, cap, nt);
      return 0;
  }
  return 2;
}

extern "C" int emu_advantages(const float* outcome, const bool* is_full, int64_t Q, int64_t G, float delta, float nu,
                              float eps, int by_scenario, float* centred, float* scaled, float* total, bool* fired) {
  const AdvArgs p{delta, nu, eps, by_scenario != 0};
  NoReducer red;
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t off = q * G;
    advantages_question(outcome + off, is_full + off, static_cast<int>(G), 0, 1, p, centred + off, scaled + off,
                        total + off, fired + q, red);
  }
  return 0;
}

// partial: [loss_terms_blocks(n), kLossSums], as the device writes it.
extern "C" int emu_loss_terms(const float* logp, const float* adv, const float* scale, const float* aux,
                              const bool* mask, const float* old, const float* ref, const bool* sft, int64_t n,
                              float eps_low, float eps_high, float beta, float* coef, float* partial) {
  const LossArgs a{logp, adv, scale, aux, mask, old, ref, sft, n, eps_low, eps_high, beta, coef};
  const int64_t blocks = (n + kLossTile - 1) / kLossTile;
  for (int64_t b = 0; b < blocks; ++b) {
    float block_acc[kLossSums] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int tid = 0; tid < kLossThreads; ++tid) {
      float acc[kLossSums] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      loss_tile_thread(a, b, tid, kLossThreads, acc);
      for (int k = 0; k < kLossSums; ++k) block_acc[k] += acc[k];
    }
    for (int k = 0; k < kLossSums; ++k) partial[b * kLossSums + k] = block_acc[k];
  }
  return 0;
}

extern "C" int64_t emu_loss_terms_blocks(int64_t n) { return (n + kLossTile - 1) / kLossTile; }
