// The only translation unit that includes torch. It registers the native kernels as operators of
// the `flashloss_C` library (CPU kernels always, CUDA kernels when built with FLASHLOSS_WITH_CUDA)
// and turns tensors into the raw pointers the kernels take. The Python layer
// (python/flashloss/ops/) validates arguments with user-facing messages before calling these;
// the TORCH_CHECKs here are a second line of defence, never the first.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/contrastive_lse.h"
#include "cpu/row_logsumexp.h"
#include "cpu/sort_network.h"
#include "cpu/token_logprobs.h"
#ifdef FLASHLOSS_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/contrastive_lse.h"
#include "cuda/row_logsumexp.h"
#include "cuda/sort_network.h"
#include "cuda/token_logprobs.h"
#endif

namespace {

using flashloss::core::DType;

DType dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK(false, "flashloss: unsupported dtype ", t.scalar_type(),
                         " (expected float32, float64, bfloat16 or float16)");
  }
}

// Statistics are fp32, or fp64 for fp64 inputs (so gradcheck runs in double end to end).
at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "flashloss: x must be 2-D [N, V], got ", x.sizes());
  TORCH_CHECK(x.size(1) == 0 || x.stride(1) == 1, "flashloss: x must have unit stride along V");
}

void check_stats(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0) && t.is_contiguous(), "flashloss: ", name,
              " must be a contiguous [N] tensor");
  TORCH_CHECK(t.scalar_type() == stat_dtype(x), "flashloss: ", name, " must be ", stat_dtype(x));
  TORCH_CHECK(t.device() == x.device(), "flashloss: ", name, " must be on ", x.device());
}

void check_grad_out(const at::Tensor& x, const at::Tensor& dx) {
  TORCH_CHECK(dx.sizes() == x.sizes() && dx.is_contiguous() && dx.scalar_type() == x.scalar_type() &&
              dx.device() == x.device(), "flashloss: dx must be a contiguous tensor like x");
}

// Outputs are allocated by the Python layer (which poisons them in debug mode, DESIGN.md §6) and
// passed in; the kernels must write every element.
void row_logsumexp_forward_cpu(const at::Tensor& x, const at::Tensor& lse) {
  check_rows(x);
  check_stats(x, lse, "lse");
  flashloss::cpu::row_logsumexp_forward(dtype_code(x), x.data_ptr(), x.size(0), x.size(1),
                                        x.stride(0), lse.data_ptr());
}

void row_logsumexp_backward_cpu(const at::Tensor& x, const at::Tensor& lse, const at::Tensor& grad,
                                const at::Tensor& dx) {
  check_rows(x);
  check_stats(x, lse, "lse");
  check_stats(x, grad, "grad");
  check_grad_out(x, dx);
  flashloss::cpu::row_logsumexp_backward(dtype_code(x), x.data_ptr(), x.size(0), x.size(1),
                                         x.stride(0), lse.data_ptr(), grad.data_ptr(),
                                         dx.data_ptr());
}

#ifdef FLASHLOSS_WITH_CUDA
void check_cuda(int code) {
  TORCH_CHECK(code == 0, "flashloss CUDA kernel failed: ", flashloss::cuda::error_string(code));
}

void row_logsumexp_forward_cuda(const at::Tensor& x, const at::Tensor& lse) {
  check_rows(x);
  check_stats(x, lse, "lse");
  TORCH_CHECK(x.size(0) < (int64_t(1) << 31), "flashloss: at most 2^31 - 1 rows on CUDA");
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(flashloss::cuda::row_logsumexp_forward(dtype_code(x), x.data_ptr(), x.size(0),
                                                    x.size(1), x.stride(0), lse.data_ptr(),
                                                    c10::cuda::getCurrentCUDAStream().stream()));
}

void row_logsumexp_backward_cuda(const at::Tensor& x, const at::Tensor& lse,
                                 const at::Tensor& grad, const at::Tensor& dx) {
  check_rows(x);
  check_stats(x, lse, "lse");
  check_stats(x, grad, "grad");
  check_grad_out(x, dx);
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(flashloss::cuda::row_logsumexp_backward(
      dtype_code(x), x.data_ptr(), x.size(0), x.size(1), x.stride(0), lse.data_ptr(),
      grad.data_ptr(), dx.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
}
#endif

// ---------------------------------------------------------------------------------------------
// Primitive A on the CPU: row blocks, one GEMM per block for the similarity tile, epilogues in
// csrc/cpu/contrastive_lse.cpp. Inputs in bf16/fp16 are upcast once (O((N+M)D)); fp64 stays fp64.

constexpr int64_t kTileElements = int64_t(1) << 22;  // 16 MB of fp32 per similarity tile

int64_t block_rows(int64_t m_all, int64_t requested) {
  if (requested > 0) return requested;  // tests force small blocks to cross block boundaries
  int64_t rows = kTileElements / std::max<int64_t>(m_all, 1);
  return std::max<int64_t>(8, std::min<int64_t>(256, rows));
}

struct Prepared {
  at::Tensor q, k, scale, margin_rows, targets, valid, labels_q, labels_k, neg_threshold;
  int64_t targets_per_row = 1;
};

// Dense int32 label ids (labels may be any int64 values); extra columns get -1 (never positive).
Prepared prepare(const at::Tensor& q, const at::Tensor& k_all, const at::Tensor& scale,
                 const std::optional<at::Tensor>& margin_rows, const std::optional<at::Tensor>& targets, const std::optional<at::Tensor>& labels_q,
                 const std::optional<at::Tensor>& labels_k, const std::optional<at::Tensor>& neg_threshold,
                 int64_t m_main) {
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Prepared p;
  p.q = q.to(acc).contiguous();
  p.k = k_all.to(acc).contiguous();
  p.scale = scale.to(acc).contiguous();
  if (margin_rows.has_value()) p.margin_rows = margin_rows->to(acc).contiguous();
  const int64_t n = q.size(0), m_all = k_all.size(0);
  auto i32 = q.options().dtype(at::kInt);
  if (neg_threshold.has_value()) p.neg_threshold = neg_threshold->to(acc).contiguous();
  if (targets.has_value()) {
    // [N] (-100 = ignored row) or [N, P] (negative entries = padding); a row is valid (takes part
    // in column statistics) when it lists at least one positive
    const auto& t = *targets;
    TORCH_CHECK(t.dim() == 1 || t.dim() == 2, "flashloss: targets must be [N] or [N, P]");
    p.targets = at::where(t < 0, at::full_like(t, -1), t).to(at::kInt).contiguous();
    p.targets_per_row = t.dim() == 2 ? t.size(1) : 1;
    p.valid = (t.dim() == 2 ? (t >= 0).any(1) : (t != -100)).to(at::kByte).contiguous();
  } else {
    p.valid = at::ones({n}, q.options().dtype(at::kByte));
  }
  if (labels_q.has_value()) {
    auto all = at::cat({*labels_q, *labels_k});
    auto inverse = std::get<1>(at::_unique(all, /*sorted=*/true, /*return_inverse=*/true)).to(at::kInt);
    p.labels_q = inverse.narrow(0, 0, n).contiguous();
    p.labels_k = at::full({m_all + 8}, -1, i32);
    p.labels_k.narrow(0, 0, m_main).copy_(inverse.narrow(0, n, m_main));
  }
  return p;
}

template <typename T>
flashloss::cpu::ContrastiveProblem<T> problem(const Prepared& pr, const std::optional<at::Tensor>& bias,
                                              int64_t m_main, bool exclude_self, bool exclude_positives,
                                              double margin, bool sigmoid) {
  flashloss::cpu::ContrastiveProblem<T> p;
  p.n = pr.q.size(0);
  p.m_all = pr.k.size(0);
  p.m_main = m_main;
  p.scale = pr.scale.data_ptr<T>();
  p.bias = bias.has_value() ? static_cast<T>(bias->item<double>()) : T(0);
  p.margin = static_cast<T>(margin);
  p.margin_rows = pr.margin_rows.defined() ? pr.margin_rows.data_ptr<T>() : nullptr;
  p.targets = pr.targets.defined() ? pr.targets.data_ptr<int32_t>() : nullptr;
  p.targets_per_row = pr.targets_per_row;
  p.neg_threshold = pr.neg_threshold.defined() ? pr.neg_threshold.data_ptr<T>() : nullptr;
  p.valid = pr.valid.data_ptr<uint8_t>();
  p.labels_q = pr.labels_q.defined() ? pr.labels_q.data_ptr<int32_t>() : nullptr;
  p.labels_k = pr.labels_k.defined() ? pr.labels_k.data_ptr<int32_t>() : nullptr;
  p.exclude_self = exclude_self;
  p.exclude_positives = exclude_positives;
  p.sigmoid = sigmoid;
  return p;
}

// Gradient outputs are allocated here (the op returns them); like the Python layer's `empty`
// (python/flashloss/_debug.py, DESIGN.md §6) they start as NaN when FLASHLOSS_POISON=1, so an
// element a kernel forgot to write fails the tests.
at::Tensor empty_grad(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  auto t = at::empty(sizes, opts);
  const char* poison = std::getenv("FLASHLOSS_POISON");
  if (poison != nullptr && poison[0] == '1' && poison[1] == '\0') t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

void check_out(const at::Tensor& t, int64_t size, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.numel() == 0 || (t.dim() == 1 && t.size(0) == size && t.is_contiguous() && t.scalar_type() == dt),
              "flashloss: output ", name, " must be a contiguous [", size, "] ", dt, " tensor or empty");
}

template <typename T>
void contrastive_forward_impl(const Prepared& pr, const flashloss::cpu::ContrastiveProblem<T>& p,
                              const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& pos_sum,
                              const at::Tensor& pos_count, const at::Tensor& col_pos_sum,
                              const at::Tensor& row_sigmoid, int64_t requested_rows) {
  const int64_t n = p.n, m_all = p.m_all;
  const bool want_col = col_lse.numel() > 0;
  at::Tensor col_m, col_s;
  if (want_col) {
    col_m = at::full({p.m_main}, -std::numeric_limits<double>::infinity(), pr.q.options());
    col_s = at::zeros({p.m_main}, pr.q.options());
  }
  if (col_pos_sum.numel() > 0) col_pos_sum.zero_();
  const int64_t br = block_rows(m_all, requested_rows);
  auto tile = at::empty({std::min(br, std::max<int64_t>(n, 1)), m_all}, pr.q.options());
  const auto kt = pr.k.t();
  for (int64_t r0 = 0; r0 < n; r0 += br) {
    const int64_t rows = std::min(br, n - r0);
    auto t = tile.narrow(0, 0, rows);
    at::mm_out(t, pr.q.narrow(0, r0, rows), kt);
    flashloss::cpu::contrastive_forward_tile<T>(p, r0, rows, t.data_ptr<T>(), ptr_or_null<T>(row_lse),
                                                ptr_or_null<T>(pos_sum), ptr_or_null<T>(pos_count),
                                                ptr_or_null<T>(row_sigmoid), ptr_or_null<T>(col_m),
                                                ptr_or_null<T>(col_s), ptr_or_null<T>(col_pos_sum));
  }
  if (want_col) {
    auto shift = at::where(at::isinf(col_m), at::zeros_like(col_m), col_m);
    col_lse.copy_(shift + at::log(col_s));
  }
}

void contrastive_lse_forward_cpu(const at::Tensor& q, const at::Tensor& k_all, const at::Tensor& scale,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& margin_rows,
                                 const std::optional<at::Tensor>& targets,
                                 const std::optional<at::Tensor>& labels_q,
                                 const std::optional<at::Tensor>& labels_k,
                                 const std::optional<at::Tensor>& neg_threshold, int64_t m_main, bool exclude_self,
                                 bool exclude_positives, double margin, bool sigmoid, int64_t want,
                                 const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& pos_sum,
                                 const at::Tensor& pos_count, const at::Tensor& col_pos_sum,
                                 const at::Tensor& row_sigmoid, int64_t block) {
  (void)want;  // which outputs: given by which out tensors are non-empty
  TORCH_CHECK(q.dim() == 2 && k_all.dim() == 2 && q.size(1) == k_all.size(1), "flashloss: q [N,D], k [M,D]");
  TORCH_CHECK(m_main >= 0 && m_main <= k_all.size(0), "flashloss: m_main out of range");
  const auto pr = prepare(q, k_all, scale, margin_rows, targets, labels_q, labels_k, neg_threshold, m_main);
  const auto acc = pr.q.scalar_type();
  const int64_t n = q.size(0);
  check_out(row_lse, n, acc, "row_lse");
  check_out(col_lse, m_main, acc, "col_lse");
  check_out(pos_sum, n, acc, "pos_sum");
  check_out(pos_count, n, acc, "pos_count");
  check_out(col_pos_sum, m_main, acc, "col_pos_sum");
  check_out(row_sigmoid, n, acc, "row_sigmoid");
  if (acc == at::kDouble)
    contrastive_forward_impl<double>(pr, problem<double>(pr, bias, m_main, exclude_self, exclude_positives, margin, sigmoid),
                                     row_lse, col_lse, pos_sum, pos_count, col_pos_sum, row_sigmoid, block);
  else
    contrastive_forward_impl<float>(pr, problem<float>(pr, bias, m_main, exclude_self, exclude_positives, margin, sigmoid),
                                    row_lse, col_lse, pos_sum, pos_count, col_pos_sum, row_sigmoid, block);
}

// Column vectors padded to m_all (+8 for the vector loads): gradient 0, LSE +inf beyond m_main.
at::Tensor pad_columns(const at::Tensor& v, int64_t m_all, double fill) {
  auto out = at::full({m_all + 8}, fill, v.options());
  out.narrow(0, 0, v.size(0)).copy_(v);
  return out;
}

template <typename T>
std::vector<at::Tensor> contrastive_backward_impl(const Prepared& pr, const flashloss::cpu::ContrastiveProblem<T>& p,
                                                  const at::Tensor& row_lse, const at::Tensor& col_lse,
                                                  const at::Tensor& g_row, const at::Tensor& g_col,
                                                  const at::Tensor& g_pos, const at::Tensor& g_colpos,
                                                  const at::Tensor& g_sig, int64_t grad_cols,
                                                  const std::vector<bool>& needs, int64_t requested_rows) {
  const int64_t n = p.n, m_all = p.m_all, d = pr.q.size(1);
  const auto opts = pr.q.options();
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor col_lse_p, g_col_p, g_colpos_p;
  if (col_lse.numel() > 0) {
    col_lse_p = pad_columns(at::where(col_lse == -inf, at::full_like(col_lse, inf), col_lse), m_all, inf);
    g_col_p = pad_columns(g_col, m_all, 0.0);
  }
  if (g_colpos.numel() > 0) g_colpos_p = pad_columns(g_colpos, m_all, 0.0);
  auto dq = at::zeros({n, d}, opts);
  auto dk = at::zeros({grad_cols, d}, opts);
  auto dscale = at::zeros({n}, opts);
  auto dmargin = at::zeros({needs[4] ? n : 0}, opts);
  double dbias = 0;
  const int64_t br = block_rows(m_all, requested_rows);
  auto tile = at::empty({std::min(br, std::max<int64_t>(n, 1)), m_all}, opts);
  const auto kt = pr.k.t();
  for (int64_t r0 = 0; r0 < n; r0 += br) {
    const int64_t rows = std::min(br, n - r0);
    auto t = tile.narrow(0, 0, rows);
    const auto q_blk = pr.q.narrow(0, r0, rows);
    at::mm_out(t, q_blk, kt);
    dbias += flashloss::cpu::contrastive_backward_tile<T>(
        p, r0, rows, t.data_ptr<T>(), ptr_or_null<T>(row_lse), ptr_or_null<T>(col_lse_p), ptr_or_null<T>(g_row),
        ptr_or_null<T>(g_col_p), ptr_or_null<T>(g_pos), ptr_or_null<T>(g_colpos_p), ptr_or_null<T>(g_sig),
        dscale.data_ptr<T>(), ptr_or_null<T>(dmargin));
    if (needs[0]) {
      auto dq_blk = dq.narrow(0, r0, rows);
      at::mm_out(dq_blk, t, pr.k);
    }
    if (needs[1] && grad_cols > 0) dk.addmm_(t.narrow(1, 0, grad_cols).t(), q_blk);
  }
  return {dq, dk, dscale, at::scalar_tensor(dbias, opts), dmargin};
}

std::vector<at::Tensor> contrastive_lse_backward_cpu(
    const at::Tensor& q, const at::Tensor& k_all, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& margin_rows, const std::optional<at::Tensor>& targets,
    const std::optional<at::Tensor>& labels_q,
    const std::optional<at::Tensor>& labels_k, const std::optional<at::Tensor>& neg_threshold,
    const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& g_row, const at::Tensor& g_col, const at::Tensor& g_pos, const at::Tensor& g_colpos,
    const at::Tensor& g_sig, int64_t m_main, int64_t grad_cols, bool exclude_self, bool exclude_positives,
    double margin, bool sigmoid, int64_t want, int64_t needs_bits, int64_t block) {
  (void)want;
  // which gradients are wanted: bit 0 dq, 1 dk, 2 dscale, 3 dbias, 4 dmargin
  const std::vector<bool> needs = {bool(needs_bits & 1), bool(needs_bits & 2), bool(needs_bits & 4),
                                   bool(needs_bits & 8), bool(needs_bits & 16)};
  const auto pr = prepare(q, k_all, scale, margin_rows, targets, labels_q, labels_k, neg_threshold, m_main);
  if (pr.q.scalar_type() == at::kDouble)
    return contrastive_backward_impl<double>(
        pr, problem<double>(pr, bias, m_main, exclude_self, exclude_positives, margin, sigmoid), row_lse, col_lse,
        g_row, g_col, g_pos, g_colpos, g_sig, grad_cols, needs, block);
  return contrastive_backward_impl<float>(
      pr, problem<float>(pr, bias, m_main, exclude_self, exclude_positives, margin, sigmoid), row_lse, col_lse,
      g_row, g_col, g_pos, g_colpos, g_sig, grad_cols, needs, block);
}

#ifdef FLASHLOSS_WITH_CUDA
// ---------------------------------------------------------------------------------------------
// Primitive A on CUDA: fused kernels in csrc/cuda/contrastive_lse.cu read q and k in their own
// dtype (bf16/fp16 on tensor cores, fp32 with exact FMA, fp64 in double); statistics and
// gradients in stat_dtype. block_rows is ignored (the kernels have fixed tiles).

struct CudaContrastive {
  Prepared pr;  // positive structure (int32 ids, valid rows), scale, margins and threshold in acc
  at::Tensor q, k, bias;
  flashloss::cuda::ContrastiveArgs args;
};

void* data_or_null(const at::Tensor& t) { return t.defined() && t.numel() > 0 ? t.data_ptr() : nullptr; }

CudaContrastive cuda_contrastive(const at::Tensor& q, const at::Tensor& k_all, const at::Tensor& scale,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& margin_rows,
                                 const std::optional<at::Tensor>& targets, const std::optional<at::Tensor>& labels_q,
                                 const std::optional<at::Tensor>& labels_k,
                                 const std::optional<at::Tensor>& neg_threshold, int64_t m_main, bool exclude_self,
                                 bool exclude_positives, double margin, bool sigmoid) {
  TORCH_CHECK(q.dim() == 2 && k_all.dim() == 2 && q.size(1) == k_all.size(1), "flashloss: q [N,D], k [M,D]");
  TORCH_CHECK(k_all.scalar_type() == q.scalar_type(), "flashloss: q and k must have the same dtype");
  TORCH_CHECK(q.is_cuda() && k_all.device() == q.device() && scale.device() == q.device(),
              "flashloss: q, k and scale must be on the same CUDA device");
  TORCH_CHECK(m_main >= 0 && m_main <= k_all.size(0), "flashloss: m_main out of range");
  const auto acc = stat_dtype(q);
  const int64_t n = q.size(0);
  CudaContrastive c;
  c.q = q.contiguous();
  c.k = k_all.contiguous();
  // prepare() also converts q and k to acc, which the CUDA kernels do not want (they read the
  // input dtype): zero-width views make that conversion free.
  c.pr = prepare(c.q.narrow(1, 0, 0), c.k.narrow(1, 0, 0), scale, margin_rows, targets, labels_q, labels_k,
                 neg_threshold, m_main);
  TORCH_CHECK(c.pr.scale.numel() == n, "flashloss: scale must have N elements");
  TORCH_CHECK(c.pr.valid.numel() == n, "flashloss: one valid flag per row expected from prepare()");
  if (c.pr.margin_rows.defined())
    TORCH_CHECK(c.pr.margin_rows.numel() == n, "flashloss: margin_rows must have N elements");
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == 1 && bias->device() == q.device(), "flashloss: bias must be one element on ", q.device());
    c.bias = bias->to(acc).contiguous();
  }
  if (c.pr.neg_threshold.defined())
    TORCH_CHECK(c.pr.neg_threshold.numel() == n && c.pr.neg_threshold.device() == q.device(),
                "flashloss: neg_threshold must be a [N] tensor on ", q.device());
  auto& a = c.args;
  a.dtype = dtype_code(q);
  a.q = c.q.data_ptr();
  a.k = c.k.data_ptr();
  a.n = n;
  a.m_all = k_all.size(0);
  a.m_main = m_main;
  a.d = q.size(1);
  a.scale = c.pr.scale.data_ptr();
  a.bias = c.bias.defined() ? c.bias.data_ptr() : nullptr;
  a.margin = margin;
  a.margin_rows = c.pr.margin_rows.defined() ? c.pr.margin_rows.data_ptr() : nullptr;
  a.targets = c.pr.targets.defined() ? c.pr.targets.data_ptr<int32_t>() : nullptr;
  a.targets_per_row = c.pr.targets.defined() ? c.pr.targets_per_row : 0;
  a.valid = c.pr.valid.data_ptr<uint8_t>();
  a.labels_q = c.pr.labels_q.defined() ? c.pr.labels_q.data_ptr<int32_t>() : nullptr;
  a.labels_k = c.pr.labels_k.defined() ? c.pr.labels_k.data_ptr<int32_t>() : nullptr;
  a.neg_threshold = c.pr.neg_threshold.defined() ? c.pr.neg_threshold.data_ptr() : nullptr;
  a.exclude_self = exclude_self;
  a.exclude_positives = exclude_positives;
  a.sigmoid = sigmoid;
  return c;
}

void check_out_cuda(const at::Tensor& t, int64_t size, at::ScalarType dt, const at::Device& dev, const char* name) {
  check_out(t, size, dt, name);
  TORCH_CHECK(t.numel() == 0 || t.device() == dev, "flashloss: output ", name, " must be on ", dev);
}

void contrastive_lse_forward_cuda(const at::Tensor& q, const at::Tensor& k_all, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& margin_rows,
                                  const std::optional<at::Tensor>& targets, const std::optional<at::Tensor>& labels_q,
                                  const std::optional<at::Tensor>& labels_k,
                                  const std::optional<at::Tensor>& neg_threshold, int64_t m_main, bool exclude_self,
                                  bool exclude_positives, double margin, bool sigmoid, int64_t want,
                                  const at::Tensor& row_lse, const at::Tensor& col_lse, const at::Tensor& pos_sum,
                                  const at::Tensor& pos_count, const at::Tensor& col_pos_sum,
                                  const at::Tensor& row_sigmoid, int64_t block) {
  (void)want;   // which outputs: given by which out tensors are non-empty
  (void)block;  // fixed tiles on CUDA
  const c10::cuda::CUDAGuard guard(q.device());
  const auto c = cuda_contrastive(q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold,
                                  m_main, exclude_self, exclude_positives, margin, sigmoid);
  const auto acc = stat_dtype(q);
  const int64_t n = q.size(0);
  check_out_cuda(row_lse, n, acc, q.device(), "row_lse");
  check_out_cuda(col_lse, m_main, acc, q.device(), "col_lse");
  check_out_cuda(pos_sum, n, acc, q.device(), "pos_sum");
  check_out_cuda(pos_count, n, acc, q.device(), "pos_count");
  check_out_cuda(col_pos_sum, m_main, acc, q.device(), "col_pos_sum");
  check_out_cuda(row_sigmoid, n, acc, q.device(), "row_sigmoid");
  check_cuda(flashloss::cuda::contrastive_lse_forward(
      c.args, data_or_null(row_lse), data_or_null(col_lse), data_or_null(pos_sum), data_or_null(pos_count),
      data_or_null(col_pos_sum), data_or_null(row_sigmoid), c10::cuda::getCurrentCUDAStream().stream()));
}

// An upstream statistic or gradient: empty (term absent) or a contiguous [size] tensor in acc.
void check_in_cuda(const at::Tensor& t, int64_t size, at::ScalarType dt, const at::Device& dev, const char* name) {
  TORCH_CHECK(t.numel() == 0 || (t.dim() == 1 && t.size(0) == size && t.is_contiguous() && t.scalar_type() == dt &&
                                 t.device() == dev),
              "flashloss: ", name, " must be a contiguous [", size, "] ", dt, " tensor on ", dev, " or empty");
}

std::vector<at::Tensor> contrastive_lse_backward_cuda(
    const at::Tensor& q, const at::Tensor& k_all, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& margin_rows, const std::optional<at::Tensor>& targets,
    const std::optional<at::Tensor>& labels_q, const std::optional<at::Tensor>& labels_k,
    const std::optional<at::Tensor>& neg_threshold, const at::Tensor& row_lse, const at::Tensor& col_lse,
    const at::Tensor& g_row, const at::Tensor& g_col, const at::Tensor& g_pos, const at::Tensor& g_colpos,
    const at::Tensor& g_sig, int64_t m_main, int64_t grad_cols, bool exclude_self, bool exclude_positives,
    double margin, bool sigmoid, int64_t want, int64_t needs_bits, int64_t block) {
  (void)want;
  (void)block;
  const c10::cuda::CUDAGuard guard(q.device());
  const auto c = cuda_contrastive(q, k_all, scale, bias, margin_rows, targets, labels_q, labels_k, neg_threshold,
                                  m_main, exclude_self, exclude_positives, margin, sigmoid);
  TORCH_CHECK(grad_cols >= 0 && grad_cols <= k_all.size(0), "flashloss: grad_cols out of range");
  const auto acc = stat_dtype(q);
  const auto dev = q.device();
  const int64_t n = q.size(0), d = q.size(1);
  check_in_cuda(row_lse, n, acc, dev, "row_lse");
  check_in_cuda(g_row, n, acc, dev, "g_row");
  check_in_cuda(col_lse, m_main, acc, dev, "col_lse");
  check_in_cuda(g_col, m_main, acc, dev, "g_col");
  check_in_cuda(g_pos, n, acc, dev, "g_pos");
  check_in_cuda(g_colpos, m_main, acc, dev, "g_colpos");
  check_in_cuda(g_sig, n, acc, dev, "g_sig");
  // which gradients are wanted: bit 0 dq, 1 dk, 2 dscale, 3 dbias, 4 dmargin; the others come
  // back empty (the Python layer returns None for them)
  const auto opts = q.options().dtype(acc);
  auto dq = empty_grad({(needs_bits & 1) ? n : 0, (needs_bits & 1) ? d : 0}, opts);
  auto dk = empty_grad({(needs_bits & 2) ? grad_cols : 0, (needs_bits & 2) ? d : 0}, opts);
  auto dscale = empty_grad({(needs_bits & 4) ? n : 0}, opts);
  auto dbias = (needs_bits & 8) ? empty_grad({}, opts) : empty_grad({0}, opts);
  auto dmargin = empty_grad({(needs_bits & 16) ? n : 0}, opts);
  auto scratch = empty_grad({(needs_bits & 8) ? std::max<int64_t>(n, 1) : 0}, opts);
  check_cuda(flashloss::cuda::contrastive_lse_backward(
      c.args, data_or_null(row_lse), data_or_null(col_lse), data_or_null(g_row), data_or_null(g_col),
      data_or_null(g_pos), data_or_null(g_colpos), data_or_null(g_sig), grad_cols,
      (needs_bits & 1) ? data_or_null(dq) : nullptr, (needs_bits & 2) ? data_or_null(dk) : nullptr,
      (needs_bits & 4) ? data_or_null(dscale) : nullptr, (needs_bits & 8) ? dbias.data_ptr() : nullptr,
      (needs_bits & 16) ? data_or_null(dmargin) : nullptr, data_or_null(scratch),
      c10::cuda::getCurrentCUDAStream().stream()));
  return {dq, dk, dscale, dbias, dmargin};
}
#endif

// ---------------------------------------------------------------------------------------------
// Primitive B (flashloss.ops.token_logprobs) on CPU and CUDA: the logits never exist whole. One
// loop, shared by both devices, walks vocabulary chunks of C columns (outer) x row blocks of R
// rows (inner; by default a single block of all rows), computes each raw-logit tile
// x = hidden_blk W_chunk^T [R, C] with a GEMM into one reused buffer in the accumulation dtype
// (torch's BLAS on the CPU, cuBLAS on CUDA) and hands the tile to the device's fused epilogue
// (csrc/cpu/token_logprobs.cpp, csrc/cuda/token_logprobs.cu; math in csrc/core/token_logprobs.h):
//   forward  per tile: stats epilogue (online max / sum e^(z-m) / entropy and sum-p^2 sums,
//            sum z, target logit) into an [N] row state; at the end the five [N] outputs.
//   backward per tile: recompute x, epilogue turns it into dx = dz dz/dx in place, then
//            dhidden_blk (+)= dx W_chunk, dW_chunk (+)= dx^T hidden_blk (straight into dW's rows:
//            written, not accumulated, when there is one row block), dbias_chunk (+)= column sums.
// FLOPs: forward 2NHV, backward 6NHV (recompute + two GEMMs); the epilogues add O(NV) work.
// Extra memory: the tile (R*C acc elements: 16 MB on the CPU by default), the [N] row state
// (6 acc values per row), and for bf16/fp16 inputs the fp32 operands the GEMMs need (below).
// Saved for backward (by the Python layer): the inputs by reference, lse and (when its gradient
// can be asked for) entropy.
//
// bf16 / fp16 inputs: statistics, tiles and gradients are fp32. The CPU upcasts hidden once
// (N*H fp32, the size of the dhidden it returns anyway) and each weight chunk when it is used
// (C*H fp32). CUDA, with torch >= 2.9, keeps 16-bit operands and asks cuBLAS for fp32 output
// (aten::mm.dtype_out: fp32 accumulation on tensor cores); the backward GEMMs then take dx rounded
// to the input dtype (as flash-attention does with dP), and accumulating GEMMs (dhidden across
// chunks, dW across row blocks) go through an fp32 temporary of the output block's size
// (aten::addmm.dtype requires `self` in the input dtype, so it cannot accumulate into fp32).
// With an older torch CUDA upcasts like the CPU.

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define FLASHLOSS_HAVE_MM_OUT_DTYPE 1
#endif

// CPU tile: 1024 columns x 4096 rows (16 MB). Measured at N=4096, H=1024, V=32768 fp32 on a 2-core
// AVX2 machine (bench/token_logprobs_cpu_target.py): 2048x4096, 2048x2048 and 512x4096 tiles run
// within noise of it (~7-8 s forward+backward, ~95% of the machine's fp32 matmul rate), so the
// smallest memory wins. The epilogues take ~2% of the time; the loop's own overhead is below that.
constexpr int64_t kTlpCpuTileElements = int64_t(1) << 22;  // 16 MB of fp32 per CPU logits tile
constexpr int64_t kTlpCpuVocabChunk = 1024;
// CUDA tile: not measured yet (no GPU here); large enough for cuBLAS to run at full rate.
constexpr int64_t kTlpCudaTileElements = int64_t(1) << 25;  // 128 MB of fp32 per CUDA tile
constexpr int64_t kTlpCudaVocabChunk = 8192;

struct TlpInputs {
  at::Tensor hidden, weight, bias, targets;  // bias: in the accumulation dtype, or undefined
  int64_t n, h, v;
  at::ScalarType acc;
};

TlpInputs tlp_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& targets) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "flashloss: hidden must be a contiguous [N, H] tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == hidden.size(1),
              "flashloss: weight must be a contiguous [V, H] tensor with H = ", hidden.size(1));
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type() && weight.device() == hidden.device(),
              "flashloss: weight must have hidden's dtype and device");
  TORCH_CHECK(weight.size(0) >= 1, "flashloss: the vocabulary must not be empty");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) && targets.is_contiguous() &&
              targets.scalar_type() == at::kLong && targets.device() == hidden.device(),
              "flashloss: targets must be a contiguous int64 [N] tensor on hidden's device");
  dtype_code(hidden);  // rejects anything but fp32 / fp64 / bf16 / fp16
  TlpInputs in;
  in.hidden = hidden;
  in.weight = weight;
  in.targets = targets;
  in.n = hidden.size(0);
  in.h = hidden.size(1);
  in.v = weight.size(0);
  in.acc = stat_dtype(hidden);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == in.v && bias->scalar_type() == hidden.scalar_type() &&
                bias->device() == hidden.device(), "flashloss: bias must be a [V] tensor like weight");
    in.bias = bias->to(in.acc).contiguous();
  }
  return in;
}

struct TlpTiles {
  int64_t rows, cols;
};

// Tests force tiny tiles (ops.token_logprobs.TILE) to cross every boundary; 0 = automatic: C
// vocabulary columns and as many rows as fit the element budget.
TlpTiles tlp_tiles(const TlpInputs& in, int64_t rows, int64_t cols, int64_t elements, int64_t chunk) {
  TORCH_CHECK(rows >= 0 && cols >= 0, "flashloss: tile sizes must be >= 0");
  TlpTiles t;
  t.cols = std::min(in.v, cols > 0 ? cols : chunk);
  t.rows = rows > 0 ? rows : std::max<int64_t>(1, elements / t.cols);
  t.rows = std::max<int64_t>(1, std::min(t.rows, in.n));
  return t;
}

// out = a b, or out += a b. a and b are in out's dtype, or (CUDA) both 16-bit with out fp32.
void tlp_mm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == out.scalar_type()) {
    if (accumulate) out.addmm_(a, b);
    else at::mm_out(out, a, b);
    return;
  }
#ifdef FLASHLOSS_HAVE_MM_OUT_DTYPE
  if (accumulate) out.add_(at::mm(a, b, out.scalar_type()));
  else at::mm_out(out, a, b, out.scalar_type());
#else
  TORCH_CHECK(false, "flashloss: mixed-dtype GEMM needs torch >= 2.9");
#endif
}

// Which outputs: the non-empty tensors (the Python layer allocates [N] or empty(0) per output).
void check_tlp_out(const at::Tensor& t, const TlpInputs& in, const char* name) {
  check_out(t, in.n, in.acc, name);
  TORCH_CHECK(t.numel() == 0 || t.device() == in.hidden.device(), "flashloss: output ", name, " must be on ",
              in.hidden.device());
}

// An [N] input of the backward (statistic or upstream gradient): empty (absent) or contiguous.
void check_tlp_in(const at::Tensor& t, const TlpInputs& in, const char* name) {
  TORCH_CHECK(t.numel() == 0 || (t.dim() == 1 && t.size(0) == in.n && t.is_contiguous() &&
                                 t.scalar_type() == in.acc && t.device() == in.hidden.device()),
              "flashloss: ", name, " must be a contiguous [", in.n, "] ", in.acc, " tensor on ",
              in.hidden.device(), " or empty");
}

// The forward's five outputs, and the backward's saved statistics and upstream gradients (both
// devices check the same contract).
void check_tlp_outputs(const TlpInputs& in, const at::Tensor& logp, const at::Tensor& lse, const at::Tensor& entropy,
                       const at::Tensor& z_sum, const at::Tensor& log_sum_p2) {
  check_tlp_out(logp, in, "logp");
  check_tlp_out(lse, in, "lse");
  check_tlp_out(entropy, in, "entropy");
  check_tlp_out(z_sum, in, "z_sum");
  check_tlp_out(log_sum_p2, in, "log_sum_p2");
}

void check_tlp_backward_inputs(const TlpInputs& in, const at::Tensor& lse, const at::Tensor& entropy,
                               const at::Tensor& g_logp, const at::Tensor& g_lse, const at::Tensor& g_entropy,
                               const at::Tensor& g_zsum) {
  check_tlp_in(lse, in, "lse");
  check_tlp_in(entropy, in, "entropy");
  check_tlp_in(g_logp, in, "g_logp");
  check_tlp_in(g_lse, in, "g_lse");
  check_tlp_in(g_entropy, in, "g_entropy");
  check_tlp_in(g_zsum, in, "g_zsum");
  TORCH_CHECK(in.n == 0 || lse.numel() == in.n, "flashloss: the backward needs the forward's lse");
  TORCH_CHECK(g_entropy.numel() == 0 || entropy.numel() == in.n,
              "flashloss: an entropy gradient needs the forward's entropy");
}

// The device-independent loops. `K` supplies the epilogues and the GEMM operand dtype:
//   at::Tensor operand(const at::Tensor&)       hidden / weight chunk as the GEMMs take them
//   void forward(r0, rows, c0, cols, tile)      stats epilogue
//   at::Tensor backward(r0, rows, c0, cols, tile)   dx epilogue; returns dx as the GEMMs take it
template <class K>
void tlp_forward_loop(const TlpInputs& in, const TlpTiles& tl, K& k) {
  if (in.n == 0) return;
  const auto hid = k.operand(in.hidden);
  auto buf = at::empty({tl.rows * tl.cols}, in.hidden.options().dtype(in.acc));
  for (int64_t c0 = 0; c0 < in.v; c0 += tl.cols) {
    const int64_t cw = std::min(tl.cols, in.v - c0);
    const auto w_t = k.operand(in.weight.narrow(0, c0, cw)).t();
    for (int64_t r0 = 0; r0 < in.n; r0 += tl.rows) {
      const int64_t rw = std::min(tl.rows, in.n - r0);
      auto tile = buf.narrow(0, 0, rw * cw).view({rw, cw});
      tlp_mm(tile, hid.narrow(0, r0, rw), w_t, false);
      k.forward(r0, rw, c0, cw, tile);
    }
  }
}

template <class K>
std::vector<at::Tensor> tlp_backward_loop(const TlpInputs& in, const TlpTiles& tl, K& k, int64_t needs) {
  const bool need_dh = needs & 1, need_dw = needs & 2, need_db = (needs & 4) && in.bias.defined();
  const auto opts = in.hidden.options().dtype(in.acc);
  auto dh = need_dh ? empty_grad({in.n, in.h}, opts) : at::empty({0}, opts);
  auto dw = need_dw ? empty_grad({in.v, in.h}, opts) : at::empty({0}, opts);
  auto db = need_db ? empty_grad({in.v}, opts) : at::empty({0}, opts);
  if (in.n == 0) {  // no rows: dW and dbias are 0, dhidden is empty
    dw.zero_();
    db.zero_();
    return {dh, dw, db};
  }
  const auto hid = k.operand(in.hidden);
  auto buf = at::empty({tl.rows * tl.cols}, opts);
  for (int64_t c0 = 0; c0 < in.v; c0 += tl.cols) {
    const int64_t cw = std::min(tl.cols, in.v - c0);
    const auto w_c = k.operand(in.weight.narrow(0, c0, cw));
    for (int64_t r0 = 0; r0 < in.n; r0 += tl.rows) {
      const int64_t rw = std::min(tl.rows, in.n - r0);
      const auto h_blk = hid.narrow(0, r0, rw);
      auto tile = buf.narrow(0, 0, rw * cw).view({rw, cw});
      tlp_mm(tile, h_blk, w_c.t(), false);
      const auto dx = k.backward(r0, rw, c0, cw, tile, need_db);
      if (need_dh) tlp_mm(dh.narrow(0, r0, rw), dx, w_c, c0 > 0);
      if (need_dw) tlp_mm(dw.narrow(0, c0, cw), dx.t(), h_blk, r0 > 0);
      if (need_db) {
        auto db_c = db.narrow(0, c0, cw);
        const int64_t rows_dim[] = {0};
        if (r0 == 0) at::sum_out(db_c, tile, at::IntArrayRef(rows_dim));
        else db_c.add_(tile.sum(0));
      }
    }
  }
  return {dh, dw, db};
}

// Targets in [0, V) or ignore_index (checked in Python first; O(N), CPU only: on CUDA it would
// synchronise, and the kernels only compare targets with column ranges, never index by them).
void check_cpu_targets(const TlpInputs& in, int64_t ignore_index) {
  const auto& t = in.targets;
  TORCH_CHECK(((t == ignore_index) | ((t >= 0) & (t < in.v))).all().item<bool>(),
              "flashloss: targets must be in [0, ", in.v, ") or ignore_index=", ignore_index);
}

// CPU epilogues (csrc/cpu/token_logprobs.cpp). 16-bit inputs are multiplied in fp32 (upcast).
template <typename T>
struct CpuTlp {
  const TlpInputs& in;
  flashloss::cpu::TokenProblem<T> p;
  flashloss::core::RowState<T>* state = nullptr;
  bool entropy = false, sum_p2 = false;
  const T *lse = nullptr, *ent = nullptr, *g = nullptr, *l = nullptr, *h = nullptr, *s = nullptr;

  CpuTlp(const TlpInputs& inputs, int64_t ignore_index, double inv_t, double a, double c) : in(inputs) {
    p.n = in.n;
    p.v = in.v;
    p.bias = in.bias.defined() ? in.bias.template data_ptr<T>() : nullptr;
    p.targets = in.targets.template data_ptr<int64_t>();
    p.ignore_index = ignore_index;
    p.map = flashloss::core::make_logit_map<T>(inv_t, a, c);
  }
  at::Tensor operand(const at::Tensor& x) const { return x.to(in.acc); }  // no copy for fp32 / fp64
  void forward(int64_t r0, int64_t rows, int64_t c0, int64_t cols, at::Tensor& tile) {
    flashloss::cpu::token_forward_tile<T>(p, r0, rows, c0, cols, tile.data_ptr<T>(), state, entropy, sum_p2);
  }
  at::Tensor backward(int64_t r0, int64_t rows, int64_t c0, int64_t cols, at::Tensor& tile, bool) {
    flashloss::cpu::token_backward_tile<T>(p, r0, rows, c0, cols, tile.data_ptr<T>(), lse, ent, g, l, h, s);
    return tile;
  }
};

void token_logprobs_forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                int64_t ignore_index, double inv_temperature, double logit_scale, double softcap,
                                const at::Tensor& logp, const at::Tensor& lse, const at::Tensor& entropy,
                                const at::Tensor& z_sum, const at::Tensor& log_sum_p2, int64_t tile_rows,
                                int64_t tile_cols) {
  const auto in = tlp_inputs(hidden, weight, bias, targets);
  check_cpu_targets(in, ignore_index);
  check_tlp_outputs(in, logp, lse, entropy, z_sum, log_sum_p2);
  const auto tl = tlp_tiles(in, tile_rows, tile_cols, kTlpCpuTileElements, kTlpCpuVocabChunk);
  auto state = at::empty({in.n, 6}, hidden.options().dtype(in.acc));
  auto run = [&](auto zero) {
    using T = decltype(zero);
    CpuTlp<T> k(in, ignore_index, inv_temperature, logit_scale, softcap);
    k.state = reinterpret_cast<flashloss::core::RowState<T>*>(state.data_ptr<T>());
    k.entropy = entropy.numel() > 0;
    k.sum_p2 = log_sum_p2.numel() > 0;
    flashloss::cpu::token_state_init<T>(in.n, k.state);
    tlp_forward_loop(in, tl, k);
    flashloss::cpu::token_forward_finish<T>(k.p, k.state, ptr_or_null<T>(logp), ptr_or_null<T>(lse),
                                            ptr_or_null<T>(entropy), ptr_or_null<T>(z_sum),
                                            ptr_or_null<T>(log_sum_p2));
  };
  static_assert(sizeof(flashloss::core::RowState<float>) == 6 * sizeof(float), "RowState layout");
  static_assert(sizeof(flashloss::core::RowState<double>) == 6 * sizeof(double), "RowState layout");
  if (in.acc == at::kDouble) run(double(0));
  else run(float(0));
}

// needs: bit 0 dhidden, 1 dweight, 2 dbias; returns [dhidden, dweight, dbias] in the
// accumulation dtype, empty where not needed.
std::vector<at::Tensor> token_logprobs_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& g_logp,
    const at::Tensor& g_lse, const at::Tensor& g_entropy, const at::Tensor& g_zsum, int64_t ignore_index,
    double inv_temperature, double logit_scale, double softcap, int64_t needs, int64_t tile_rows,
    int64_t tile_cols) {
  const auto in = tlp_inputs(hidden, weight, bias, targets);
  check_cpu_targets(in, ignore_index);
  check_tlp_backward_inputs(in, lse, entropy, g_logp, g_lse, g_entropy, g_zsum);
  const auto tl = tlp_tiles(in, tile_rows, tile_cols, kTlpCpuTileElements, kTlpCpuVocabChunk);
  auto run = [&](auto zero) {
    using T = decltype(zero);
    CpuTlp<T> k(in, ignore_index, inv_temperature, logit_scale, softcap);
    k.lse = ptr_or_null<T>(lse);
    k.ent = ptr_or_null<T>(entropy);
    k.g = ptr_or_null<T>(g_logp);
    k.l = ptr_or_null<T>(g_lse);
    k.h = ptr_or_null<T>(g_entropy);
    k.s = ptr_or_null<T>(g_zsum);
    return tlp_backward_loop(in, tl, k, needs);
  };
  return in.acc == at::kDouble ? run(double(0)) : run(float(0));
}


// Primitive C (flashloss.ops.sort_network) on CPU: csrc/cpu/sort_network.cpp. Every tensor is in the
// accumulation dtype (fp32, fp64 for fp64 inputs) and contiguous; the Python layer converts x and
// allocates the (poisoned) outputs; absent outputs / upstreams are empty tensors.
struct SortArgs {
  flashloss::cpu::SortSchedule sched;
  int64_t B, Bw = 1, g = 0;
  at::ScalarType acc;
};

SortArgs sort_args(const at::Tensor& x, const at::Tensor& pairs, const at::Tensor& layer_ptr,
                   const at::Tensor& out_slot, const std::optional<at::Tensor>& W) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "flashloss: sort_network x must be a contiguous [B, n] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "flashloss: sort_network x must be float32 or float64 here (the Python layer upcasts)");
  const int64_t n = x.size(1);
  TORCH_CHECK(pairs.dim() == 2 && pairs.size(1) == 2 && pairs.scalar_type() == at::kInt && pairs.is_contiguous(),
              "flashloss: sort_network pairs must be a contiguous int32 [C, 2] tensor");
  TORCH_CHECK(out_slot.dim() == 1 && out_slot.size(0) == n && out_slot.scalar_type() == at::kInt &&
                  out_slot.is_contiguous(),
              "flashloss: sort_network out_slot must be a contiguous int32 [n] tensor");
  // value checks of the schedule on the host only (on a GPU they would synchronise every call)
  TORCH_CHECK(!pairs.is_cpu() || pairs.numel() == 0 || (pairs.min().item<int>() >= 0 && pairs.max().item<int>() < n),
              "flashloss: sort_network pairs must index slots in [0, ", n, ")");
  TORCH_CHECK(layer_ptr.dim() == 1 && layer_ptr.size(0) >= 1 && layer_ptr.scalar_type() == at::kInt &&
                  layer_ptr.is_contiguous() &&
                  (!layer_ptr.is_cpu() || (layer_ptr[0].item<int>() == 0 && layer_ptr[-1].item<int64_t>() == pairs.size(0))),
              "flashloss: sort_network layer_ptr must be a contiguous int32 [L + 1] tensor from 0 to C");
  SortArgs a{{n, pairs.size(0), pairs.data_ptr<int32_t>(), layer_ptr.size(0) - 1, layer_ptr.data_ptr<int32_t>(),
              out_slot.data_ptr<int32_t>()},
             x.size(0), 1, 0, x.scalar_type()};
  if (W.has_value()) {
    TORCH_CHECK(W->dim() == 3 && W->size(1) == n && (W->size(0) == 1 || W->size(0) == a.B) && W->is_contiguous() &&
                    W->scalar_type() == a.acc,
                "flashloss: sort_network W must be a contiguous [1 or B, n, g] tensor of x's dtype");
    a.Bw = W->size(0);
    a.g = W->size(2);
  }
  return a;
}

void check_sort_tensor(const SortArgs& a, const at::Tensor& t, std::vector<int64_t> shape, const char* name) {
  if (t.dim() == 1 && t.size(0) == 0 && shape.size() != 1) return;  // absent (an empty [0] tensor)
  TORCH_CHECK(t.sizes().vec() == shape && t.is_contiguous() && t.scalar_type() == a.acc, "flashloss: sort_network ",
              name, " must be a contiguous ", at::IntArrayRef(shape), " tensor of dtype ", a.acc, ", got ",
              t.sizes(), " ", t.scalar_type());
}

template <typename T>
flashloss::core::RelaxParams<T> relax_params(int64_t relax, double steepness, double art_lambda) {
  TORCH_CHECK(relax >= 0 && relax <= 5, "flashloss: sort_network relaxation code must be in [0, 5], got ", relax);
  return {static_cast<flashloss::core::Relax>(relax), T(steepness), T(art_lambda)};
}

void sort_network_forward_cpu(const at::Tensor& x, const at::Tensor& pairs, const at::Tensor& layer_ptr,
                              const at::Tensor& out_slot,
                              int64_t relax, double steepness, double art_lambda, const std::optional<at::Tensor>& W,
                              const at::Tensor& sorted, const at::Tensor& alpha, const at::Tensor& P,
                              const at::Tensor& PW) {
  const auto a = sort_args(x, pairs, layer_ptr, out_slot, W);
  const int64_t n = a.sched.n;
  check_sort_tensor(a, sorted, {a.B, n}, "sorted");
  check_sort_tensor(a, alpha, {a.B, a.sched.num_comparators}, "alpha");
  check_sort_tensor(a, P, {a.B, n, n}, "P");
  check_sort_tensor(a, PW, {a.B, n, a.g}, "PW");
  TORCH_CHECK(PW.numel() == 0 || W.has_value(), "flashloss: sort_network PW needs W");
  auto run = [&](auto zero) {
    using T = decltype(zero);
    flashloss::cpu::sort_network_forward<T>(a.sched, relax_params<T>(relax, steepness, art_lambda), a.B,
                                            x.data_ptr<T>(), sorted.data_ptr<T>(), ptr_or_null<T>(alpha),
                                            P.numel() ? P.data_ptr<T>() : nullptr,
                                            W.has_value() ? W->data_ptr<T>() : nullptr, a.Bw, a.g,
                                            PW.numel() ? PW.data_ptr<T>() : nullptr);
  };
  if (a.B == 0) return;
  if (a.acc == at::kDouble) run(double(0));
  else run(float(0));
}

void sort_network_backward_cpu(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& pairs,
                               const at::Tensor& layer_ptr, const at::Tensor& out_slot, int64_t relax, double steepness, double art_lambda,
                               const at::Tensor& g_sorted, const at::Tensor& g_P, const at::Tensor& g_PW,
                               const std::optional<at::Tensor>& W, const at::Tensor& g_x, const at::Tensor& g_W) {
  const auto a = sort_args(x, pairs, layer_ptr, out_slot, W);
  const int64_t n = a.sched.n;
  check_sort_tensor(a, alpha, {a.B, a.sched.num_comparators}, "alpha");
  check_sort_tensor(a, g_sorted, {a.B, n}, "g_sorted");
  check_sort_tensor(a, g_P, {a.B, n, n}, "g_P");
  check_sort_tensor(a, g_PW, {a.B, n, a.g}, "g_PW");
  check_sort_tensor(a, g_x, {a.B, n}, "g_x");
  check_sort_tensor(a, g_W, {a.Bw, n, a.g}, "g_W");
  TORCH_CHECK(g_PW.numel() == 0 || W.has_value(), "flashloss: sort_network g_PW needs W");
  TORCH_CHECK(g_W.numel() == 0 || g_PW.numel() > 0, "flashloss: sort_network g_W needs g_PW");
  auto run = [&](auto zero) {
    using T = decltype(zero);
    flashloss::cpu::sort_network_backward<T>(
        a.sched, relax_params<T>(relax, steepness, art_lambda), a.B, x.data_ptr<T>(), ptr_or_null<T>(alpha),
        ptr_or_null<T>(g_sorted), ptr_or_null<T>(g_P), ptr_or_null<T>(g_PW),
        W.has_value() ? W->data_ptr<T>() : nullptr, a.Bw, a.g, g_x.data_ptr<T>(), ptr_or_null<T>(g_W));
  };
  if (a.B == 0) {
    if (g_W.numel()) g_W.zero_();
    return;
  }
  if (a.acc == at::kDouble) run(double(0));
  else run(float(0));
}

#ifdef FLASHLOSS_WITH_CUDA

// Primitive C on CUDA (csrc/cuda/sort_network.cu), same tensors as the CPU wrappers.
flashloss::cuda::SortLaunch sort_launch(const SortArgs& a, int64_t relax, double steepness, double art_lambda) {
  TORCH_CHECK(relax >= 0 && relax <= 5, "flashloss: sort_network relaxation code must be in [0, 5], got ", relax);
  return {a.sched.n, a.sched.num_comparators, a.sched.num_layers, a.B, a.Bw, a.g, a.sched.pairs, a.sched.layer_ptr,
          a.sched.out_slot, int(relax), steepness, art_lambda, a.acc == at::kDouble};
}

void check_sort_cuda_n(const SortArgs& a, bool with_P) {
  const int64_t limit = flashloss::cuda::sort_network_max_n(with_P, a.acc == at::kDouble);
  TORCH_CHECK(a.sched.n <= limit, "flashloss: the cuda backend of sort_network takes n <= ", limit,
              with_P ? " with P" : "", " (shared memory per warp), got n = ", a.sched.n,
              "; use backend='triton' or backend='torch'");
}

void sort_network_forward_cuda(const at::Tensor& x, const at::Tensor& pairs, const at::Tensor& layer_ptr,
                               const at::Tensor& out_slot, int64_t relax, double steepness, double art_lambda,
                               const std::optional<at::Tensor>& W, const at::Tensor& sorted, const at::Tensor& alpha,
                               const at::Tensor& P, const at::Tensor& PW) {
  // the schedule is read on the host for its checks, then passed to the kernels as device pointers
  const auto a = sort_args(x, pairs, layer_ptr, out_slot, W);
  const int64_t n = a.sched.n;
  check_sort_tensor(a, sorted, {a.B, n}, "sorted");
  check_sort_tensor(a, alpha, {a.B, a.sched.num_comparators}, "alpha");
  check_sort_tensor(a, P, {a.B, n, n}, "P");
  check_sort_tensor(a, PW, {a.B, n, a.g}, "PW");
  check_sort_cuda_n(a, P.numel() > 0);
  TORCH_CHECK(a.B < (int64_t(1) << 31), "flashloss: at most 2^31 - 1 rows on CUDA");
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(flashloss::cuda::sort_network_forward(
      sort_launch(a, relax, steepness, art_lambda), x.data_ptr(), sorted.data_ptr(), alpha.data_ptr(),
      P.numel() ? P.data_ptr() : nullptr, W.has_value() ? W->data_ptr() : nullptr,
      PW.numel() ? PW.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream()));
}

void sort_network_backward_cuda(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& pairs,
                                const at::Tensor& layer_ptr, const at::Tensor& out_slot, int64_t relax,
                                double steepness, double art_lambda, const at::Tensor& g_sorted, const at::Tensor& g_P,
                                const at::Tensor& g_PW, const std::optional<at::Tensor>& W, const at::Tensor& g_x,
                                const at::Tensor& g_W) {
  const auto a = sort_args(x, pairs, layer_ptr, out_slot, W);
  const int64_t n = a.sched.n;
  check_sort_tensor(a, alpha, {a.B, a.sched.num_comparators}, "alpha");
  check_sort_tensor(a, g_sorted, {a.B, n}, "g_sorted");
  check_sort_tensor(a, g_P, {a.B, n, n}, "g_P");
  check_sort_tensor(a, g_PW, {a.B, n, a.g}, "g_PW");
  check_sort_tensor(a, g_x, {a.B, n}, "g_x");
  check_sort_tensor(a, g_W, {a.Bw, n, a.g}, "g_W");
  TORCH_CHECK(g_W.numel() == 0 || g_PW.numel() > 0, "flashloss: sort_network g_W needs g_PW");
  check_sort_cuda_n(a, g_P.numel() > 0);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto launch = sort_launch(a, relax, steepness, art_lambda);
  auto scratch = at::empty({flashloss::cuda::sort_network_backward_scratch(launch, g_P.numel() > 0, g_PW.numel() > 0)},
                           x.options());
  // dL/dW per row; summed over rows here when W is shared (torch's sum: deterministic)
  at::Tensor w_rows = g_W;
  if (g_W.numel() && a.Bw == 1 && a.B > 1) w_rows = at::empty({a.B, n, a.g}, x.options());
  check_cuda(flashloss::cuda::sort_network_backward(
      launch, x.data_ptr(), alpha.data_ptr(), g_sorted.numel() ? g_sorted.data_ptr() : nullptr,
      g_P.numel() ? g_P.data_ptr() : nullptr, g_PW.numel() ? g_PW.data_ptr() : nullptr,
      W.has_value() ? W->data_ptr() : nullptr, g_x.data_ptr(), g_W.numel() ? w_rows.data_ptr() : nullptr,
      scratch.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  if (g_W.numel() && a.B == 0) g_W.zero_();
  if (w_rows.data_ptr() != g_W.data_ptr() && g_W.numel()) g_W.copy_(w_rows.sum(0, true));
}

#endif

#ifdef FLASHLOSS_WITH_CUDA
// CUDA epilogues (csrc/cuda/token_logprobs.cu) on the current stream; GEMMs through cuBLAS.
struct CudaTlp {
  const TlpInputs& in;
  flashloss::cuda::TokenTileArgs a{};
  void* state = nullptr;
  bool entropy = false, sum_p2 = false;
  const void *lse = nullptr, *ent = nullptr, *g = nullptr, *l = nullptr, *h = nullptr, *s = nullptr;
  bool lowp_gemm = false;  // 16-bit operands straight to cuBLAS (fp32 output)
  at::Tensor dx_lp;        // dx rounded to the input dtype for those GEMMs
  void* stream = nullptr;

  CudaTlp(const TlpInputs& inputs, int64_t ignore_index, double inv_t, double logit_scale, double softcap)
      : in(inputs) {
    a.acc = in.acc == at::kDouble ? DType::f64 : DType::f32;
    a.bias = in.bias.defined() ? in.bias.data_ptr() : nullptr;
    a.targets = in.targets.data_ptr<int64_t>();
    a.ignore_index = ignore_index;
    a.inv_temperature = inv_t;
    a.logit_scale = logit_scale;
    a.softcap = softcap;
#ifdef FLASHLOSS_HAVE_MM_OUT_DTYPE
    lowp_gemm = in.hidden.scalar_type() == at::kBFloat16 || in.hidden.scalar_type() == at::kHalf;
#endif
    stream = c10::cuda::getCurrentCUDAStream().stream();
  }
  void set_tile(int64_t r0, int64_t rows, int64_t c0, int64_t cols) {
    a.r0 = r0;
    a.rows = rows;
    a.c0 = c0;
    a.cols = cols;
  }
  at::Tensor operand(const at::Tensor& x) const { return lowp_gemm ? x : x.to(in.acc); }
  void forward(int64_t r0, int64_t rows, int64_t c0, int64_t cols, at::Tensor& tile) {
    set_tile(r0, rows, c0, cols);
    check_cuda(flashloss::cuda::token_forward_tile(a, tile.data_ptr(), state, entropy, sum_p2, stream));
  }
  at::Tensor backward(int64_t r0, int64_t rows, int64_t c0, int64_t cols, at::Tensor& tile, bool need_db) {
    set_tile(r0, rows, c0, cols);
    at::Tensor dx = tile;
    if (lowp_gemm) {
      if (!dx_lp.defined() || dx_lp.numel() < rows * cols) dx_lp = at::empty({rows * cols}, in.hidden.options());
      dx = dx_lp.narrow(0, 0, rows * cols).view({rows, cols});
    }
    // the fp32 dx stays in the tile where the GEMMs read it, or where dbias sums it
    check_cuda(flashloss::cuda::token_backward_tile(a, tile.data_ptr(), dtype_code(in.hidden),
                                                    lowp_gemm ? dx.data_ptr() : nullptr, !lowp_gemm || need_db,
                                                    lse, ent, g, l, h, s, stream));
    return dx;
  }
};

void token_logprobs_forward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                 int64_t ignore_index, double inv_temperature, double logit_scale, double softcap,
                                 const at::Tensor& logp, const at::Tensor& lse, const at::Tensor& entropy,
                                 const at::Tensor& z_sum, const at::Tensor& log_sum_p2, int64_t tile_rows,
                                 int64_t tile_cols) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto in = tlp_inputs(hidden, weight, bias, targets);
  TORCH_CHECK(hidden.is_cuda(), "flashloss: hidden must be a CUDA tensor");
  TORCH_CHECK(in.n < (int64_t(1) << 31), "flashloss: at most 2^31 - 1 rows on CUDA");
  check_tlp_outputs(in, logp, lse, entropy, z_sum, log_sum_p2);
  const auto tl = tlp_tiles(in, tile_rows, tile_cols, kTlpCudaTileElements, kTlpCudaVocabChunk);
  auto state = at::empty({in.n, 6}, hidden.options().dtype(in.acc));
  CudaTlp k(in, ignore_index, inv_temperature, logit_scale, softcap);
  k.state = state.data_ptr();
  k.entropy = entropy.numel() > 0;
  k.sum_p2 = log_sum_p2.numel() > 0;
  check_cuda(flashloss::cuda::token_state_init(k.a.acc, in.n, k.state, k.stream));
  tlp_forward_loop(in, tl, k);
  check_cuda(flashloss::cuda::token_forward_finish(k.a, in.n, k.state, data_or_null(logp), data_or_null(lse),
                                                   data_or_null(entropy), data_or_null(z_sum),
                                                   data_or_null(log_sum_p2), k.stream));
}

std::vector<at::Tensor> token_logprobs_backward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& entropy, const at::Tensor& g_logp,
    const at::Tensor& g_lse, const at::Tensor& g_entropy, const at::Tensor& g_zsum, int64_t ignore_index,
    double inv_temperature, double logit_scale, double softcap, int64_t needs, int64_t tile_rows,
    int64_t tile_cols) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto in = tlp_inputs(hidden, weight, bias, targets);
  TORCH_CHECK(hidden.is_cuda(), "flashloss: hidden must be a CUDA tensor");
  TORCH_CHECK(in.n < (int64_t(1) << 31), "flashloss: at most 2^31 - 1 rows on CUDA");
  check_tlp_backward_inputs(in, lse, entropy, g_logp, g_lse, g_entropy, g_zsum);
  const auto tl = tlp_tiles(in, tile_rows, tile_cols, kTlpCudaTileElements, kTlpCudaVocabChunk);
  CudaTlp k(in, ignore_index, inv_temperature, logit_scale, softcap);
  k.lse = data_or_null(lse);
  k.ent = data_or_null(entropy);
  k.g = data_or_null(g_logp);
  k.l = data_or_null(g_lse);
  k.h = data_or_null(g_entropy);
  k.s = data_or_null(g_zsum);
  return tlp_backward_loop(in, tl, k, needs);
}
#endif

bool compiled_with_cuda() {
#ifdef FLASHLOSS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(flashloss_C, m) {
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
  m.def("row_logsumexp_forward(Tensor x, Tensor(a!) lse) -> ()");
  m.def("row_logsumexp_backward(Tensor x, Tensor lse, Tensor grad, Tensor(a!) dx) -> ()");
  m.def("contrastive_lse_forward(Tensor q, Tensor k_all, Tensor scale, Tensor? bias, Tensor? margin_rows, Tensor? targets, "
        "Tensor? labels_q, Tensor? labels_k, Tensor? neg_threshold, int m_main, bool exclude_self, bool exclude_positives, "
        "float margin, bool sigmoid, int want, Tensor(a!) row_lse, Tensor(b!) col_lse, Tensor(c!) pos_sum, "
        "Tensor(d!) pos_count, Tensor(e!) col_pos_sum, Tensor(f!) row_sigmoid, int block_rows) -> ()");
  m.def("contrastive_lse_backward(Tensor q, Tensor k_all, Tensor scale, Tensor? bias, Tensor? margin_rows, Tensor? targets, "
        "Tensor? labels_q, Tensor? labels_k, Tensor? neg_threshold, Tensor row_lse, Tensor col_lse, Tensor g_row, Tensor g_col, "
        "Tensor g_pos, Tensor g_colpos, Tensor g_sig, int m_main, int grad_cols, bool exclude_self, "
        "bool exclude_positives, float margin, bool sigmoid, int want, int needs, int block_rows) -> Tensor[]");
  m.def("token_logprobs_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int ignore_index, "
        "float inv_temperature, float logit_scale, float softcap, Tensor(a!) logp, Tensor(b!) lse, "
        "Tensor(c!) entropy, Tensor(d!) z_sum, Tensor(e!) log_sum_p2, int tile_rows, int tile_cols) -> ()");
  m.def("token_logprobs_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, "
        "Tensor entropy, Tensor g_logp, Tensor g_lse, Tensor g_entropy, Tensor g_zsum, int ignore_index, "
        "float inv_temperature, float logit_scale, float softcap, int needs, int tile_rows, int tile_cols) -> Tensor[]");
  m.def("sort_network_forward(Tensor x, Tensor pairs, Tensor layer_ptr, Tensor out_slot, int relax, float steepness, float art_lambda, "
        "Tensor? W, Tensor(a!) sorted, Tensor(b!) alpha, Tensor(c!) P, Tensor(d!) PW) -> ()");
  m.def("sort_network_backward(Tensor x, Tensor alpha, Tensor pairs, Tensor layer_ptr, Tensor out_slot, int relax, float steepness, "
        "float art_lambda, Tensor g_sorted, Tensor g_P, Tensor g_PW, Tensor? W, Tensor(a!) g_x, Tensor(b!) g_W) -> ()");
}

TORCH_LIBRARY_IMPL(flashloss_C, CPU, m) {
  m.impl("row_logsumexp_forward", &row_logsumexp_forward_cpu);
  m.impl("row_logsumexp_backward", &row_logsumexp_backward_cpu);
  m.impl("contrastive_lse_forward", &contrastive_lse_forward_cpu);
  m.impl("contrastive_lse_backward", &contrastive_lse_backward_cpu);
  m.impl("token_logprobs_forward", &token_logprobs_forward_cpu);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cpu);
  m.impl("sort_network_forward", &sort_network_forward_cpu);
  m.impl("sort_network_backward", &sort_network_backward_cpu);
}

#ifdef FLASHLOSS_WITH_CUDA
TORCH_LIBRARY_IMPL(flashloss_C, CUDA, m) {
  m.impl("row_logsumexp_forward", &row_logsumexp_forward_cuda);
  m.impl("row_logsumexp_backward", &row_logsumexp_backward_cuda);
  m.impl("contrastive_lse_forward", &contrastive_lse_forward_cuda);
  m.impl("contrastive_lse_backward", &contrastive_lse_backward_cuda);
  m.impl("token_logprobs_forward", &token_logprobs_forward_cuda);
  m.impl("token_logprobs_backward", &token_logprobs_backward_cuda);
  m.impl("sort_network_forward", &sort_network_forward_cuda);
  m.impl("sort_network_backward", &sort_network_backward_cuda);
}
#endif

// `import flashloss._C` loads this shared object, which runs the registrations above. The module
// itself exposes nothing: every entry point is reached through torch.ops.flashloss_C.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
