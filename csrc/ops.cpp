// The only translation unit that includes torch. It registers the native kernels as operators of
// the `flashloss_C` library (CPU kernels always, CUDA kernels when built with FLASHLOSS_WITH_CUDA)
// and turns tensors into the raw pointers the kernels take. The Python layer
// (python/flashloss/ops/) validates arguments with user-facing messages before calling these;
// the TORCH_CHECKs here are a second line of defence, never the first.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/contrastive_lse.h"
#include "cpu/row_logsumexp.h"
#ifdef FLASHLOSS_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>

#include "cuda/contrastive_lse.h"
#include "cuda/row_logsumexp.h"
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

// Gradient outputs are allocated here (the op returns them); like the Python layer's `empty`
// (python/flashloss/_debug.py, DESIGN.md §6) they start as NaN when FLASHLOSS_POISON=1, so an
// element a kernel forgot to write fails the tests.
at::Tensor empty_grad(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  auto t = at::empty(sizes, opts);
  const char* poison = std::getenv("FLASHLOSS_POISON");
  if (poison != nullptr && poison[0] == '1' && poison[1] == '\0') t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
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
}

TORCH_LIBRARY_IMPL(flashloss_C, CPU, m) {
  m.impl("row_logsumexp_forward", &row_logsumexp_forward_cpu);
  m.impl("row_logsumexp_backward", &row_logsumexp_backward_cpu);
  m.impl("contrastive_lse_forward", &contrastive_lse_forward_cpu);
  m.impl("contrastive_lse_backward", &contrastive_lse_backward_cpu);
}

#ifdef FLASHLOSS_WITH_CUDA
TORCH_LIBRARY_IMPL(flashloss_C, CUDA, m) {
  m.impl("row_logsumexp_forward", &row_logsumexp_forward_cuda);
  m.impl("row_logsumexp_backward", &row_logsumexp_backward_cuda);
  m.impl("contrastive_lse_forward", &contrastive_lse_forward_cuda);
  m.impl("contrastive_lse_backward", &contrastive_lse_backward_cuda);
}
#endif

// `import flashloss._C` loads this shared object, which runs the registrations above. The module
// itself exposes nothing: every entry point is reached through torch.ops.flashloss_C.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
