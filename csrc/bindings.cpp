// exgrpo._C: the torch side of the CUDA C++ kernels. Op schemas (TORCH_LIBRARY), CUDA
// implementations that check their inputs and launch on the current stream, and NVTX ranges. The
// fake (meta) and autograd registrations live in Python (kernels/cuda_backend.py,
// torch.library.register_fake / register_autograd), next to the code that uses the ops.
//
// This is the only translation unit that includes torch; the kernels (*.cu) see raw pointers
// through exgrpo_kernels.h, which is what lets CI compile them with plain nvcc.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <nvtx3/nvtx3.hpp>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "exgrpo_kernels.h"

// `import exgrpo._C` loads this library, which runs the TORCH_LIBRARY static initialisers below.
// The module itself is empty (no pybind11: the ops are reached through torch.ops.exgrpo).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "exgrpo CUDA C++ ops (torch.ops.exgrpo)", -1, nullptr, nullptr, nullptr, nullptr,
      nullptr};
  return PyModule_Create(&module_def);
}

namespace exgrpo {
namespace {

using at::Tensor;

// ---------------------------------------------------------------- input checks
// ValueError for shape/device/layout/values, TypeError for dtypes; the message names op and argument.

void need_cuda(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), "exgrpo::", op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

void need_same_device(const char* op, const char* name, const Tensor& t, const Tensor& ref, const char* ref_name) {
  need_cuda(op, name, t);
  TORCH_CHECK_VALUE(t.device() == ref.device(), "exgrpo::", op, ": ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

void need_dtype(const char* op, const char* name, const Tensor& t, at::ScalarType dt) {
  TORCH_CHECK_TYPE(t.scalar_type() == dt, "exgrpo::", op, ": ", name, " must be ", dt, ", got ", t.scalar_type());
}

void need_contiguous(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "exgrpo::", op, ": ", name, " must be contiguous (strides ", t.strides(),
                    " for shape ", t.sizes(), ")");
}

void need_vector(const char* op, const char* name, const Tensor& t, int64_t n, const Tensor& ref,
                 const char* ref_name, at::ScalarType dt) {
  need_same_device(op, name, t, ref, ref_name);
  need_dtype(op, name, t, dt);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "exgrpo::", op, ": ", name, " must have shape [", n, "], got ",
                    t.sizes());
  need_contiguous(op, name, t);
}

void need_finite_positive(const char* op, const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v > 0, "exgrpo::", op, ": ", name, " must be a finite number > 0, got ", v);
}

DType logits_dtype(const char* op, const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "exgrpo::", op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
}

// x [n, V] logits chunk, targets [n] int64. Returns the LogitArgs.
LogitArgs check_chunk(const char* op, const Tensor& x, const Tensor& targets, double inv_temp,
                      const std::optional<double>& softcap) {
  need_cuda(op, "x", x);
  logits_dtype(op, x);
  TORCH_CHECK_VALUE(x.dim() == 2, "exgrpo::", op, ": x must be a [n, V] logits chunk, got shape ", x.sizes());
  need_contiguous(op, "x", x);
  TORCH_CHECK_VALUE(x.size(1) <= std::numeric_limits<int>::max(), "exgrpo::", op, ": V = ", x.size(1),
                    " does not fit the kernels' int32 column index");
  TORCH_CHECK_VALUE(x.size(0) <= std::numeric_limits<int>::max(), "exgrpo::", op, ": n = ", x.size(0),
                    " rows exceed the grid limit; split the chunk");
  need_vector(op, "targets", targets, x.size(0), x, "x", at::kLong);
  need_finite_positive(op, "inv_temp", inv_temp);
  if (softcap.has_value()) need_finite_positive(op, "softcap", *softcap);
  return LogitArgs{static_cast<float>(inv_temp), softcap.has_value() ? static_cast<float>(*softcap) : 0.f};
}

cudaStream_t stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

template <typename T>
T* ptr_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------- ops

std::tuple<Tensor, Tensor, Tensor> lmhead_stats(const Tensor& x, const Tensor& targets, double inv_temp,
                                                std::optional<double> softcap, bool want_entropy) {
  constexpr const char* op = "lmhead_stats";
  const LogitArgs la = check_chunk(op, x, targets, inv_temp, softcap);
  const c10::cuda::CUDAGuard guard(x.device());
  nvtx3::scoped_range range{"exgrpo.lmhead_stats"};
  const int64_t n = x.size(0);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor lse = at::empty({n}, f32), zt = at::empty({n}, f32), ent = at::empty({want_entropy ? n : 0}, f32);
  C10_CUDA_CHECK(launch_lmhead_stats(logits_dtype(op, x), x.data_ptr(), n, x.size(1), targets.data_ptr<int64_t>(),
                                     lse.data_ptr<float>(), zt.data_ptr<float>(),
                                     want_entropy ? ent.data_ptr<float>() : nullptr, la, stream_of(x)));
  return {lse, zt, ent};
}

void lmhead_stats_backward_inplace(const Tensor& x, const Tensor& targets, const Tensor& lse,
                                   const std::optional<Tensor>& ent, const Tensor& g_lse, const Tensor& g_zt,
                                   const std::optional<Tensor>& g_ent, double inv_temp, std::optional<double> softcap) {
  constexpr const char* op = "lmhead_stats_backward_inplace";
  const LogitArgs la = check_chunk(op, x, targets, inv_temp, softcap);
  const int64_t n = x.size(0);
  need_vector(op, "lse", lse, n, x, "x", at::kFloat);
  need_vector(op, "g_lse", g_lse, n, x, "x", at::kFloat);
  need_vector(op, "g_zt", g_zt, n, x, "x", at::kFloat);
  if (g_ent.has_value()) {
    TORCH_CHECK_VALUE(ent.has_value(), "exgrpo::", op, ": g_ent needs ent (the entropy term uses E[z] = lse - ent)");
    need_vector(op, "g_ent", *g_ent, n, x, "x", at::kFloat);
    need_vector(op, "ent", *ent, n, x, "x", at::kFloat);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  nvtx3::scoped_range range{"exgrpo.lmhead_stats_backward"};
  C10_CUDA_CHECK(launch_lmhead_stats_backward(
      logits_dtype(op, x), x.data_ptr(), n, x.size(1), targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
      g_ent.has_value() ? ent->data_ptr<float>() : nullptr, g_lse.data_ptr<float>(), g_zt.data_ptr<float>(),
      ptr_or_null<float>(g_ent), la, stream_of(x)));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> advantages(const Tensor& outcome, const Tensor& is_full, double delta,
                                                      double nu, double eps, bool by_scenario) {
  constexpr const char* op = "advantages";
  need_cuda(op, "outcome", outcome);
  need_dtype(op, "outcome", outcome, at::kFloat);
  TORCH_CHECK_VALUE(outcome.dim() == 2, "exgrpo::", op, ": outcome must be [Q, G], got shape ", outcome.sizes());
  need_contiguous(op, "outcome", outcome);
  need_same_device(op, "is_full", is_full, outcome, "outcome");
  need_dtype(op, "is_full", is_full, at::kBool);
  TORCH_CHECK_VALUE(is_full.sizes() == outcome.sizes(), "exgrpo::", op, ": is_full shape ", is_full.sizes(),
                    " must equal outcome shape ", outcome.sizes());
  need_contiguous(op, "is_full", is_full);
  TORCH_CHECK_VALUE(outcome.size(1) <= std::numeric_limits<int>::max(), "exgrpo::", op, ": G = ", outcome.size(1),
                    " is too large");
  TORCH_CHECK_VALUE(std::isfinite(delta) && std::isfinite(nu) && std::isfinite(eps) && eps >= 0, "exgrpo::", op,
                    ": delta, nu must be finite and eps finite and >= 0, got ", delta, ", ", nu, ", ", eps);
  const c10::cuda::CUDAGuard guard(outcome.device());
  nvtx3::scoped_range range{"exgrpo.advantages"};
  const int64_t Q = outcome.size(0), G = outcome.size(1);
  Tensor centred = at::empty_like(outcome), scaled = at::empty_like(outcome), total = at::empty_like(outcome);
  Tensor fired = at::empty({Q}, outcome.options().dtype(at::kBool));
  C10_CUDA_CHECK(launch_advantages(outcome.data_ptr<float>(), is_full.data_ptr<bool>(), Q, G,
                                   static_cast<float>(delta), static_cast<float>(nu), static_cast<float>(eps),
                                   by_scenario, centred.data_ptr<float>(), scaled.data_ptr<float>(),
                                   total.data_ptr<float>(), fired.data_ptr<bool>(), stream_of(outcome)));
  return {centred, scaled, total, fired};
}

// Returns coef [n] (∂loss/∂logp), loss [] (Σ of the per-token loss) and metrics [5] (clip_low,
// clip_high, kl, ratio, aux_nll sums). The per-block partial sums are reduced here by at::sum,
// which reduces in a fixed order for a given shape: deterministic, unlike float atomics.
std::tuple<Tensor, Tensor, Tensor> loss_terms(const Tensor& logp, const Tensor& adv, const Tensor& scale,
                                              const Tensor& aux, const Tensor& mask, const std::optional<Tensor>& old,
                                              const std::optional<Tensor>& ref, const std::optional<Tensor>& sft,
                                              double eps_low, double eps_high, double beta) {
  constexpr const char* op = "loss_terms";
  need_cuda(op, "logp", logp);
  need_dtype(op, "logp", logp, at::kFloat);
  TORCH_CHECK_VALUE(logp.dim() == 1, "exgrpo::", op, ": logp must be [n] (flattened tokens), got shape ",
                    logp.sizes());
  need_contiguous(op, "logp", logp);
  const int64_t n = logp.size(0);
  need_vector(op, "adv", adv, n, logp, "logp", at::kFloat);
  need_vector(op, "scale", scale, n, logp, "logp", at::kFloat);
  need_vector(op, "aux", aux, n, logp, "logp", at::kFloat);
  need_vector(op, "mask", mask, n, logp, "logp", at::kBool);
  if (old.has_value()) need_vector(op, "old", *old, n, logp, "logp", at::kFloat);
  if (ref.has_value()) need_vector(op, "ref", *ref, n, logp, "logp", at::kFloat);
  if (sft.has_value()) need_vector(op, "sft", *sft, n, logp, "logp", at::kBool);
  TORCH_CHECK_VALUE(std::isfinite(eps_low) && std::isfinite(eps_high) && std::isfinite(beta) && eps_low >= 0 &&
                        eps_low < 1 && eps_high >= 0 && beta >= 0,
                    "exgrpo::", op, ": need 0 <= eps_low < 1, eps_high >= 0, beta >= 0 (finite), got ", eps_low,
                    ", ", eps_high, ", ", beta);
  const c10::cuda::CUDAGuard guard(logp.device());
  nvtx3::scoped_range range{"exgrpo.loss_terms"};
  Tensor coef = at::empty_like(logp);
  const int64_t blocks = loss_terms_blocks(n);
  // every row is written by its block; n = 0 launches nothing and sums zeros
  Tensor partial = blocks > 0 ? at::empty({blocks, kLossSums}, logp.options()) : at::zeros({1, kLossSums}, logp.options());
  C10_CUDA_CHECK(launch_loss_terms(logp.data_ptr<float>(), adv.data_ptr<float>(), scale.data_ptr<float>(),
                                   aux.data_ptr<float>(), mask.data_ptr<bool>(), ptr_or_null<float>(old),
                                   ptr_or_null<float>(ref), ptr_or_null<bool>(sft), n, static_cast<float>(eps_low),
                                   static_cast<float>(eps_high), static_cast<float>(beta), coef.data_ptr<float>(),
                                   partial.data_ptr<float>(), stream_of(logp)));
  return {coef, partial.select(1, 0).sum(), partial.narrow(1, 1, kLossSums - 1).sum(0)};
}

}  // namespace
}  // namespace exgrpo

TORCH_LIBRARY(exgrpo, m) {
  m.def(
      "lmhead_stats(Tensor x, Tensor targets, float inv_temp, float? softcap, bool want_entropy)"
      " -> (Tensor lse, Tensor zt, Tensor ent)");
  m.def(
      "lmhead_stats_backward_inplace(Tensor(a!) x, Tensor targets, Tensor lse, Tensor? ent, Tensor g_lse,"
      " Tensor g_zt, Tensor? g_ent, float inv_temp, float? softcap) -> ()");
  m.def(
      "advantages(Tensor outcome, Tensor is_full, float delta, float nu, float eps, bool by_scenario)"
      " -> (Tensor centred, Tensor scaled, Tensor total, Tensor fired)");
  m.def(
      "loss_terms(Tensor logp, Tensor adv, Tensor scale, Tensor aux, Tensor mask, Tensor? old, Tensor? ref,"
      " Tensor? sft, float eps_low, float eps_high, float beta) -> (Tensor coef, Tensor loss, Tensor metrics)");
}

TORCH_LIBRARY_IMPL(exgrpo, CUDA, m) {
  m.impl("lmhead_stats", &exgrpo::lmhead_stats);
  m.impl("lmhead_stats_backward_inplace", &exgrpo::lmhead_stats_backward_inplace);
  m.impl("advantages", &exgrpo::advantages);
  m.impl("loss_terms", &exgrpo::loss_terms);
}
