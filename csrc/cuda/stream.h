// CUDA helpers through the LibTorch stable ABI: the current stream, plus the headers for
// torch::stable::accelerator::DeviceGuard, torch::stable::empty and STD_CUDA_KERNEL_LAUNCH_CHECK.
#pragma once

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // aoti_torch_get_current_cuda_stream (USE_CUDA)
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>  // STD_CUDA_KERNEL_LAUNCH_CHECK
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/shim_utils.h>  // TORCH_ERROR_CODE_CHECK

namespace mmkernels {

// torch's current stream on device `device_index` (what at::cuda::getCurrentCUDAStream gives).
// The stable C shim is the only way to reach it at the targeted torch release
// (torch::stable::accelerator::Stream::nativeHandle exists from 2.13 on).
inline cudaStream_t current_cuda_stream(int32_t device_index) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<cudaStream_t>(stream);
}

}  // namespace mmkernels
