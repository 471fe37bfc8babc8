// The only translation unit that includes torch. It registers the native kernels as operators of
// the `flashloss_C` library (CPU kernels always, CUDA kernels when built with FLASHLOSS_WITH_CUDA)
// and turns tensors into the raw pointers the kernels take. The Python layer
// (python/flashloss/ops/) validates arguments with user-facing messages before calling these;
// the TORCH_CHECKs here are a second line of defence, never the first.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/row_logsumexp.h"
#ifdef FLASHLOSS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

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
                                                    at::cuda::getCurrentCUDAStream().stream()));
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
      grad.data_ptr(), dx.data_ptr(), at::cuda::getCurrentCUDAStream().stream()));
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
}

TORCH_LIBRARY_IMPL(flashloss_C, CPU, m) {
  m.impl("row_logsumexp_forward", &row_logsumexp_forward_cpu);
  m.impl("row_logsumexp_backward", &row_logsumexp_backward_cpu);
}

#ifdef FLASHLOSS_WITH_CUDA
TORCH_LIBRARY_IMPL(flashloss_C, CUDA, m) {
  m.impl("row_logsumexp_forward", &row_logsumexp_forward_cuda);
  m.impl("row_logsumexp_backward", &row_logsumexp_backward_cuda);
}
#endif

// `import flashloss._C` loads this shared object, which runs the registrations above. The module
// itself exposes nothing: every entry point is reached through torch.ops.flashloss_C.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
