// Declarations of every native mmkernels operator implementation.
//
// Written against the LibTorch stable ABI (torch/csrc/stable, torch/headeronly) only, so one build
// loads into every torch release from the one it targets (TORCH_TARGET_VERSION, set by
// CMakeLists.txt) on.  Layout (add new ops the same way):
//   csrc/torch_bindings.cpp       - all schemas (STABLE_TORCH_LIBRARY) + CPU registrations -> _C
//   csrc/<op>/*.cpp               - CPU implementations and argument checks                -> _C, _C_cuda
//   csrc/cuda/*.cu                - CUDA implementations                                   -> _C_cuda
//   csrc/cuda/torch_bindings.cpp  - CUDA registrations (STABLE_TORCH_LIBRARY_IMPL)         -> _C_cuda
// Sources are listed in CMakeLists.txt.  _C_cuda is a separate library so that _C loads into any
// torch, CPU builds included; mmkernels/_extension.py loads _C_cuda only into a CUDA torch.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

namespace mmkernels {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

// "[3, 4]": a tensor's shape for error messages.
inline std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    s += (d ? ", " : "") + std::to_string(t.size(d));
  }
  return s + "]";
}

// plora_tile_flags(Tensor im_mask, int group_rows) -> Tensor
// im_mask: 1-D bool [M] (any stride).  Returns int32 [ceil(M / group_rows)]
// where out[g] = number of True in im_mask[g*group_rows : (g+1)*group_rows].
Tensor plora_tile_flags_cpu(const Tensor& im_mask, int64_t group_rows);
#ifdef MMKERNELS_WITH_CUDA
Tensor plora_tile_flags_cuda(const Tensor& im_mask, int64_t group_rows);
#endif

// Shared argument checks (defined in csrc/plora/tile_flags.cpp).
void check_plora_tile_flags_args(const Tensor& im_mask, int64_t group_rows);

// moe_route(Tensor logits, int k, int capacity, Tensor? noise, Tensor? token_order)
//   -> (indices [S,k] i64, keep [S,k] bool, exp_counts [E] i64, top1_counts [E] i64,
//       sorted_slots [S*k] i32, expert_offsets [E+1] i32)
// DeepSpeed top-k gating decisions for float32 logits [S, E]; capacity -1 = dropless.  Semantics in
// csrc/moe/route.cpp; the CUDA version (csrc/cuda/moe_routing.cu) never synchronises with the host.
using MoERouteResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
MoERouteResult moe_route_cpu(const Tensor& logits, int64_t k, int64_t capacity,
                             const std::optional<Tensor>& noise, const std::optional<Tensor>& token_order);
#ifdef MMKERNELS_WITH_CUDA
MoERouteResult moe_route_cuda(const Tensor& logits, int64_t k, int64_t capacity,
                              const std::optional<Tensor>& noise, const std::optional<Tensor>& token_order);
#endif
// Shared argument checks (defined in csrc/moe/route.cpp).
void check_moe_route_args(const Tensor& logits, int64_t k, int64_t capacity,
                          const std::optional<Tensor>& noise, const std::optional<Tensor>& token_order);

}  // namespace mmkernels
