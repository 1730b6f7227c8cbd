// Declarations of every native mmkernels operator implementation.
//
// Layout (add new ops the same way):
//   csrc/torch_bindings.cpp  - all schemas (TORCH_LIBRARY) + CPU/CUDA registrations
//   csrc/<op>/*.cpp          - CPU implementations
//   csrc/cuda/*.cu           - CUDA implementations (compiled only when CUDA is built)
// Sources are listed in CMakeLists.txt.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

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

// moe_route(Tensor logits, int k, int capacity, Tensor? noise, Tensor? token_order)
//   -> (indices [S,k] i64, keep [S,k] bool, exp_counts [E] i64, top1_counts [E] i64,
//       sorted_slots [S*k] i32, expert_offsets [E+1] i32)
// DeepSpeed top-k gating decisions for float32 logits [S, E]; capacity -1 = dropless.  Semantics in
// csrc/moe/route.cpp; the CUDA version (csrc/cuda/moe_routing.cu) never synchronises with the host.
using MoERouteResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
MoERouteResult moe_route_cpu(const at::Tensor& logits, int64_t k, int64_t capacity,
                             const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& token_order);
#ifdef MMKERNELS_WITH_CUDA
MoERouteResult moe_route_cuda(const at::Tensor& logits, int64_t k, int64_t capacity,
                              const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& token_order);
#endif
// Shared argument checks (defined in csrc/moe/route.cpp).
void check_moe_route_args(const at::Tensor& logits, int64_t k, int64_t capacity,
                          const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& token_order);

}  // namespace mmkernels
