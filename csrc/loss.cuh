// The per-token policy-loss terms and the per-question advantages, written once for the device
// kernels (loss.cu) and their host emulation (host_emulation.cu). The arithmetic is the one written
// out in kernels/_loss.py; the float64 spec is kernels/reference.py.
#pragma once

#include "common.cuh"

namespace exgrpo {

// ---------------------------------------------------------------- per-token loss terms
//
// Token i, lp = log π_θ, ρ = exp(lp − old), d = ref − lp:
//   pg  = −min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)·A)     ∂pg/∂lp = −ρA, or 0 where the clipped branch is the min
//   kl  = e^d − d − 1                              ∂kl/∂lp = 1 − e^d
//   coef_i = scale_i·(∂pg + β·∂kl) − aux_i         = ∂loss/∂lp_i
// and the token's share of the sums (loss, clip_low, clip_high, kl, ratio, aux_nll).
// Positions outside mask ∪ sft may hold anything (padding): lp is replaced by 0 there, and old/ref
// are read only under the mask, so a NaN there cannot reach coef or the sums.
struct LossArgs {
  const float* logp;
  const float* adv;
  const float* scale;
  const float* aux;
  const bool* mask;
  const float* old;  // nullptr: on-policy (ρ ≡ 1, gradient intact)
  const float* ref;  // nullptr: no KL
  const bool* sft;   // nullptr: no SFT mask
  int64_t n;
  float eps_low, eps_high, beta;
  float* coef;
};

EXGRPO_HD void loss_token(const LossArgs& a, int64_t i, float (&acc)[6]) {
  const bool m = a.mask[i];
  const bool s = a.sft != nullptr && a.sft[i];
  const float lp = (m || s) ? a.logp[i] : 0.f;
  const float old = (a.old != nullptr && m) ? a.old[i] : lp;
  const float ratio = expf(lp - old);  // accurate expf: a handful of ops per token, nothing to save
  const float adv = a.adv[i];
  const float unclipped = ratio * adv;
  const float clipped = fminf(fmaxf(ratio, 1.f - a.eps_low), 1.f + a.eps_high) * adv;
  const float pg = -fminf(unclipped, clipped);
  const float dpg = clipped < unclipped ? 0.f : -unclipped;
  float kl = 0.f, dkl = 0.f;
  if (a.ref != nullptr) {
    const float d = m ? a.ref[i] - lp : 0.f;
    const float ed = expf(d);
    kl = ed - d - 1.f;
    dkl = 1.f - ed;
  }
  const float scale = a.scale[i], aux = a.aux[i];
  a.coef[i] = scale * (dpg + a.beta * dkl) - aux;
  const float mf = m ? 1.f : 0.f;
  acc[0] += scale * (pg + a.beta * kl) - aux * lp;
  acc[1] += (m && ratio < 1.f - a.eps_low && adv < 0.f) ? 1.f : 0.f;
  acc[2] += (m && ratio > 1.f + a.eps_high && adv > 0.f) ? 1.f : 0.f;
  acc[3] += mf * kl;
  acc[4] += mf * ratio;
  acc[5] += s ? -lp : 0.f;
}

// 256 threads × 4 tokens: each block owns a tile of 1024 consecutive tokens (thread tid takes
// tokens tid, tid + 256, ...: coalesced) and writes one row of partial sums.
constexpr int kLossThreads = 256;
constexpr int kLossTile = 1024;

EXGRPO_HD void loss_tile_thread(const LossArgs& a, int64_t tile, int tid, int nt, float (&acc)[6]) {
  const int64_t base = tile * kLossTile;
  for (int k = tid; k < kLossTile; k += nt) {
    const int64_t i = base + k;
    if (i < a.n) loss_token(a, i, acc);
  }
}

// ---------------------------------------------------------------- per-question advantages
//
// docs/method.md Stage 3 steps 4-5 for one question's G trajectories. correct := outcome ≥ 1.
//   P_full, P_part = mean outcome over each scenario (0 for an empty scenario)
//   fired = (#full > 0) and P_full > ν·P_part;  total = outcome + δ on correct full trajectories if fired
//   per group (the whole question, or each scenario): c = total − mean, a = c / (Bessel std + eps),
//   both 0 for a group of one or a group whose totals are all equal.
// Four passes over the G values (re-read from global memory; G floats are nothing), each closed by
// a block reduction: `red` is the device's BlockReducer, or a no-op on the host with nt = 1.
struct AdvArgs {
  float delta, nu, eps;
  bool by_scenario;
};

EXGRPO_HD float adv_total(float r, bool full, bool fired, float delta) {
  return r + ((fired && full && r >= 1.f) ? delta : 0.f);
}

#pragma nv_exec_check_disable
template <class Reducer>
EXGRPO_HD void advantages_question(const float* r, const bool* full, int G, int tid, int nt, const AdvArgs& p,
                                   float* centred, float* scaled, float* total, bool* fired, Reducer& red) {
  // Every array index below is a compile-time constant (the group is a select, not an index), so
  // the arrays stay in registers: a runtime index would put them in local memory.
  float a[4] = {0.f, 0.f, 0.f, 0.f};  // #full, #partial, Σ outcome full, Σ outcome partial
  for (int g = tid; g < G; g += nt) {
    const bool f = full[g];
    a[0] += f ? 1.f : 0.f;
    a[1] += f ? 0.f : 1.f;
    a[2] += f ? r[g] : 0.f;
    a[3] += f ? 0.f : r[g];
  }
  red.sum(a);
  const float p_full = a[2] / fmaxf(a[0], 1.f), p_part = a[3] / fmaxf(a[1], 1.f);
  const bool fire = a[0] > 0.f && p_full > p.nu * p_part;

  // group 0 = the question (or its full trajectories), group 1 = its partial ones (by_scenario only)
  float s[4] = {0.f, 0.f, 0.f, 0.f};          // n_0, Σ_0, n_1, Σ_1
  float mx[4] = {-kInf, -kInf, -kInf, -kInf};  // max_0, −min_0, max_1, −min_1
  for (int g = tid; g < G; g += nt) {
    const float t = adv_total(r[g], full[g], fire, p.delta);
    const bool g1 = p.by_scenario && !full[g];
    s[0] += g1 ? 0.f : 1.f;
    s[1] += g1 ? 0.f : t;
    s[2] += g1 ? 1.f : 0.f;
    s[3] += g1 ? t : 0.f;
    if (g1) {
      mx[2] = fmaxf(mx[2], t);
      mx[3] = fmaxf(mx[3], -t);
    } else {
      mx[0] = fmaxf(mx[0], t);
      mx[1] = fmaxf(mx[1], -t);
    }
  }
  red.sum(s);
  red.max(mx);
  const float mean0 = s[1] / fmaxf(s[0], 1.f), mean1 = s[3] / fmaxf(s[2], 1.f);

  float ss[2] = {0.f, 0.f};  // Σ (total − mean)² per group
  for (int g = tid; g < G; g += nt) {
    const float t = adv_total(r[g], full[g], fire, p.delta);
    const bool g1 = p.by_scenario && !full[g];
    const float c = t - (g1 ? mean1 : mean0);
    ss[0] += g1 ? 0.f : c * c;
    ss[1] += g1 ? c * c : 0.f;
  }
  red.sum(ss);

  // a group of one, or one whose max equals its min, is flat: 0 (its std + eps may be 0)
  const bool flat0 = s[0] < 2.f || mx[0] == -mx[1], flat1 = s[2] < 2.f || mx[2] == -mx[3];
  const float den0 = sqrtf(ss[0] / fmaxf(s[0] - 1.f, 1.f)) + p.eps;
  const float den1 = sqrtf(ss[1] / fmaxf(s[2] - 1.f, 1.f)) + p.eps;
  for (int g = tid; g < G; g += nt) {
    const float t = adv_total(r[g], full[g], fire, p.delta);
    const bool g1 = p.by_scenario && !full[g];
    const float c = (g1 ? flat1 : flat0) ? 0.f : t - (g1 ? mean1 : mean0);
    total[g] = t;
    centred[g] = c;
    scaled[g] = c == 0.f ? 0.f : c / (g1 ? den1 : den0);
  }
  if (tid == 0) *fired = fire;
}

}  // namespace exgrpo
