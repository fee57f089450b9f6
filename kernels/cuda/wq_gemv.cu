// torch extension `wq_gemv`: batch-1 GEMV of a packed 2/3/4-bit group-wise layer, or of a binary
// (PB-LLM) layer with its salient correction, on a CUDA device.
//
//   wq_gemv(x, qweight, scale, zero, bits, group_size) -> y
//   binary_gemv(x, signs, alpha, mu, group_size, rowptr, col, delta) -> y   (reference.binary_matmul)
//
// Same contract as kernels/reference.py::wq_matmul for one activation row: x [..., K] with one row
// (fp16 / bf16 / fp32), qweight int32 [N, ceil(K/32)·bits] (bit planes along K, format.py), scale
// [N, ceil(K/group_size)] (fp16 / bf16 / fp32), zero uint8 [N, G] or an empty tensor for the symmetric
// grid (zero = 2^(bits-1)); y [..., N] in x's dtype, accumulated in fp32. The kernels live in
// wq_gemv_kernels.cuh (no torch header there, so build.nvcc_check can compile them on their own);
// this file only validates the tensors and launches on the current stream.
//
// Only c10/cuda headers are used (CUDAGuard, CUDAStream), not ATen/cuda/CUDAContext.h, which pulls in
// cuBLAS/cuSPARSE headers that pip's CUDA wheels keep outside the toolkit (kernels.md §5.1).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "wq_gemv_kernels.cuh"

namespace {

int dtype_code(const at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return wq::kF32;
    case at::kHalf: return wq::kF16;
    case at::kBFloat16: return wq::kBF16;
    default: TORCH_CHECK(false, "wq_gemv: ", what, " must be float16, bfloat16 or float32, got ", t);
  }
  return -1;
}

// A 2-D tensor whose last dim is contiguous (row slices such as kernels.parts' column ranges are kept
// as views: the kernel takes row strides); anything else is copied.
at::Tensor rows_with_unit_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

}  // namespace

at::Tensor wq_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                   int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "wq_gemv: bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(x.is_cuda(), "wq_gemv: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "wq_gemv: x must be [..., K] with K > 0");
  const int64_t K = x.size(-1);
  TORCH_CHECK(x.numel() == K, "wq_gemv is a batch-1 GEMV: x must hold one row of K = ", K, " values, got shape ",
              x.sizes());
  TORCH_CHECK(qweight.device() == x.device() && scale.device() == x.device(),
              "wq_gemv: x, qweight and scale must be on the same device");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2, "wq_gemv: qweight must be int32 [N, words]");
  const int64_t N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == (K + 31) / 32 * bits, "wq_gemv: qweight has ", qweight.size(1),
              " words per row; K = ", K, " at ", bits, " bits needs ", (K + 31) / 32 * bits);
  TORCH_CHECK(group_size > 0, "wq_gemv: group_size must be positive");
  const int64_t G = (K + group_size - 1) / group_size;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G, "wq_gemv: scale must be [", N, ", ", G,
              "], got ", scale.sizes());
  const bool symmetric = zero.numel() == 0;
  if (!symmetric) {
    TORCH_CHECK(zero.device() == x.device(), "wq_gemv: zero must be on x's device");
    TORCH_CHECK(zero.scalar_type() == at::kByte && zero.dim() == 2 && zero.size(0) == N && zero.size(1) == G,
                "wq_gemv: zero must be uint8 [", N, ", ", G, "] or empty (symmetric)");
  }
  TORCH_CHECK(K < (int64_t(1) << 31) - 32 && N < (int64_t(1) << 31), "wq_gemv: N and K must fit in int32");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 != 0) xc = xc.clone();  // the kernel reads 16-byte vectors
  const at::Tensor qw = rows_with_unit_stride(qweight), sc = rows_with_unit_stride(scale);
  const at::Tensor zp = symmetric ? zero : rows_with_unit_stride(zero);

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (N == 0) return y;

  const cudaError_t err = wq::gemv_launch(
      xc.data_ptr(), dtype_code(xc.scalar_type(), "x"), qw.data_ptr<int32_t>(), qw.stride(0), sc.data_ptr(),
      dtype_code(sc.scalar_type(), "scale"), sc.stride(0), symmetric ? nullptr : zp.data_ptr<uint8_t>(),
      symmetric ? 0 : zp.stride(0), y.data_ptr(), static_cast<int>(N), static_cast<int>(K),
      static_cast<int>(group_size < K ? group_size : K), static_cast<int>(bits), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "wq_gemv: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

at::Tensor binary_gemv(const at::Tensor& x, const at::Tensor& signs, const at::Tensor& alpha, const at::Tensor& mu,
                       int64_t group_size, const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& delta) {
  TORCH_CHECK(x.is_cuda(), "binary_gemv: x must be a CUDA tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "binary_gemv: x must be [..., K] with K > 0");
  const int64_t K = x.size(-1);
  TORCH_CHECK(x.numel() == K, "binary_gemv is a batch-1 GEMV: x must hold one row of K = ", K, " values, got shape ",
              x.sizes());
  for (const at::Tensor* t : {&signs, &alpha, &mu, &rowptr, &col, &delta})
    TORCH_CHECK(t->device() == x.device(), "binary_gemv: every tensor must be on x's device");
  TORCH_CHECK(signs.scalar_type() == at::kInt && signs.dim() == 2 && signs.size(1) == (K + 31) / 32,
              "binary_gemv: signs must be int32 [N, ", (K + 31) / 32, "], got ", signs.sizes());
  const int64_t N = signs.size(0);
  TORCH_CHECK(group_size > 0, "binary_gemv: group_size must be positive");
  const int64_t G = (K + group_size - 1) / group_size;
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(0) == N && alpha.size(1) == G && mu.sizes() == alpha.sizes() &&
                  mu.scalar_type() == alpha.scalar_type(),
              "binary_gemv: alpha and mu must both be [", N, ", ", G, "] of one dtype, got ", alpha.sizes(), " ",
              alpha.scalar_type(), " and ", mu.sizes(), " ", mu.scalar_type());
  TORCH_CHECK(rowptr.scalar_type() == at::kInt && rowptr.numel() == N + 1 && col.scalar_type() == at::kInt &&
                  delta.scalar_type() == at::kFloat && col.numel() == delta.numel(),
              "binary_gemv: the salient correction must be rowptr int32 [N + 1], col int32 [nnz], delta fp32 [nnz]");
  TORCH_CHECK(K < (int64_t(1) << 31) - 32 && N < (int64_t(1) << 31), "binary_gemv: N and K must fit in int32");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 != 0) xc = xc.clone();
  const at::Tensor sg = rows_with_unit_stride(signs), a = alpha.contiguous(), m = mu.contiguous();
  const at::Tensor rp = rowptr.contiguous(), cl = col.contiguous(), dl = delta.contiguous();
  const bool salient = cl.numel() > 0;

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (N == 0) return y;

  const cudaError_t err = wq::binary_gemv_launch(
      xc.data_ptr(), dtype_code(xc.scalar_type(), "x"), sg.data_ptr<int32_t>(), sg.stride(0), a.data_ptr(),
      m.data_ptr(), dtype_code(a.scalar_type(), "alpha"), a.stride(0), salient ? rp.data_ptr<int32_t>() : nullptr,
      salient ? cl.data_ptr<int32_t>() : nullptr, salient ? dl.data_ptr<float>() : nullptr, y.data_ptr(),
      static_cast<int>(N), static_cast<int>(K), static_cast<int>(group_size < K ? group_size : K),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "binary_gemv: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wq_gemv", &wq_gemv, "y = x @ W_hat.T for one activation row and a packed 2/3/4-bit group-wise W",
        pybind11::arg("x"), pybind11::arg("qweight"), pybind11::arg("scale"), pybind11::arg("zero"),
        pybind11::arg("bits"), pybind11::arg("group_size"));
  m.def("binary_gemv", &binary_gemv,
        "y = x @ W_hat.T for one activation row and a binary (PB-LLM) W with its salient CSR correction",
        pybind11::arg("x"), pybind11::arg("signs"), pybind11::arg("alpha"), pybind11::arg("mu"),
        pybind11::arg("group_size"), pybind11::arg("rowptr"), pybind11::arg("col"), pybind11::arg("delta"));
}
