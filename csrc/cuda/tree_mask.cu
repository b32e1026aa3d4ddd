// CUDA implementation of anytime_kernels::tree_attention_mask (semantics in csrc/tree_pack.cpp):
// the dense boolean tree mask of one packed row, built on the device that holds the layout so
// the SDPA fallback never round-trips [L, L] masks through the host.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace anytime_kernels {
namespace {

__global__ void tree_mask_kernel(const int64_t* __restrict__ prefix_end, const int64_t* __restrict__ branch_start,
                                 int64_t row_start, int64_t len, bool* __restrict__ out) {
  const int64_t q = blockIdx.y;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= len || k >= len) return;
  const int64_t prefix = prefix_end[q] - row_start;
  const int64_t branch = branch_start[q] - row_start;
  out[q * len + k] = k <= q && (k >= branch || k < prefix);
}

at::Tensor tree_attention_mask_cuda(const at::Tensor& prefix_end_in, const at::Tensor& branch_start_in,
                                    int64_t row_start) {
  TORCH_CHECK_VALUE(prefix_end_in.dim() == 1 && prefix_end_in.sizes() == branch_start_in.sizes(),
                    "prefix_end and branch_start must be 1-D of equal length, got ", prefix_end_in.sizes(),
                    " and ", branch_start_in.sizes());
  const c10::cuda::CUDAGuard guard(prefix_end_in.device());
  const at::Tensor prefix_end = prefix_end_in.to(at::kLong).contiguous();
  const at::Tensor branch_start = branch_start_in.to(at::kLong).contiguous();
  const int64_t len = prefix_end.numel();
  at::Tensor mask = at::empty({len, len}, prefix_end.options().dtype(at::kBool));
  if (len == 0) return mask;
  TORCH_CHECK_VALUE(len <= 65535, "tree_attention_mask on CUDA supports rows up to 65535 tokens, got ", len);
  const int threads = 256;
  const dim3 grid(static_cast<unsigned>((len + threads - 1) / threads), static_cast<unsigned>(len));
  tree_mask_kernel<<<grid, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      prefix_end.data_ptr<int64_t>(), branch_start.data_ptr<int64_t>(), row_start, len, mask.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(anytime_kernels, CUDA, m) {
  m.impl("tree_attention_mask", &tree_attention_mask_cuda);
}

}  // namespace anytime_kernels
