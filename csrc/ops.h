// Declarations of every native mmkernels operator implementation.
//
// Layout (add new ops the same way):
//   csrc/torch_bindings.cpp  - all schemas (TORCH_LIBRARY) + CPU/CUDA registrations
//   csrc/<op>/*.cpp          - CPU implementations
//   csrc/cuda/*.cu           - CUDA implementations (compiled only when CUDA is built)
// Sources are listed in CMakeLists.txt.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace mmkernels {

// plora_tile_flags(Tensor im_mask, int group_rows) -> Tensor
// im_mask: 1-D bool [M] (any stride).  Returns int32 [ceil(M / group_rows)]
// where out[g] = number of True in im_mask[g*group_rows : (g+1)*group_rows].
at::Tensor plora_tile_flags_cpu(const at::Tensor& im_mask, int64_t group_rows);
#ifdef MMKERNELS_WITH_CUDA
at::Tensor plora_tile_flags_cuda(const at::Tensor& im_mask, int64_t group_rows);
#endif

// Shared argument checks (defined in csrc/plora/tile_flags.cpp).
void check_plora_tile_flags_args(const at::Tensor& im_mask, int64_t group_rows);

}  // namespace mmkernels
