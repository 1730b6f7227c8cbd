// CUDA implementation of mmkernels::plora_tile_flags: one warp per row group.
#include "ops.h"

#include <algorithm>

#include <cuda_runtime.h>

#include "cuda/stream.h"

namespace mmkernels {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;

__global__ void plora_tile_flags_kernel(const bool* __restrict__ mask, int64_t stride, int64_t m,
                                        int64_t group_rows, int64_t num_groups,
                                        int32_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
       g < num_groups; g += warps_total) {
    const int64_t lo = g * group_rows;
    const int64_t hi = min(lo + group_rows, m);
    int32_t n = 0;
    for (int64_t i = lo + lane; i < hi; i += 32) {
      n += mask[i * stride] ? 1 : 0;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      n += __shfl_down_sync(0xffffffffu, n, off);
    }
    if (lane == 0) {
      out[g] = n;
    }
  }
}

}  // namespace

Tensor plora_tile_flags_cuda(const Tensor& im_mask, int64_t group_rows) {
  check_plora_tile_flags_args(im_mask, group_rows);
  STD_TORCH_CHECK(im_mask.is_cuda(), "plora_tile_flags_cuda: im_mask must be a CUDA tensor");
  const torch::stable::accelerator::DeviceGuard device_guard(im_mask.get_device_index());
  const int64_t m = im_mask.size(0);
  const int64_t num_groups = (m + group_rows - 1) / group_rows;
  Tensor out = torch::stable::empty({num_groups}, ScalarType::Int, std::nullopt, im_mask.device());
  if (num_groups == 0) {
    return out;
  }
  const int64_t blocks_needed = (num_groups + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(blocks_needed, 65535 * 16));
  cudaStream_t stream = current_cuda_stream(im_mask.get_device_index());
  plora_tile_flags_kernel<<<blocks, kThreads, 0, stream>>>(
      im_mask.const_data_ptr<bool>(), im_mask.stride(0), m, group_rows, num_groups,
      out.mutable_data_ptr<int32_t>());
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace mmkernels
