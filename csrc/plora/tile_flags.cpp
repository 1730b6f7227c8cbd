// CPU implementation of mmkernels::plora_tile_flags.
#include "ops.h"

#include <algorithm>

#include <torch/csrc/stable/ops.h>

namespace mmkernels {

void check_plora_tile_flags_args(const Tensor& im_mask, int64_t group_rows) {
  STD_TORCH_CHECK(im_mask.scalar_type() == ScalarType::Bool,
                  "plora_tile_flags: im_mask must be a bool tensor, got ", im_mask.scalar_type());
  STD_TORCH_CHECK(im_mask.dim() == 1,
                  "plora_tile_flags: im_mask must be 1-D, got ", im_mask.dim(), "-D");
  STD_TORCH_CHECK(group_rows > 0, "plora_tile_flags: group_rows must be > 0, got ", group_rows);
}

Tensor plora_tile_flags_cpu(const Tensor& im_mask, int64_t group_rows) {
  check_plora_tile_flags_args(im_mask, group_rows);
  STD_TORCH_CHECK(im_mask.is_cpu(), "plora_tile_flags_cpu: im_mask must be on CPU");
  const int64_t m = im_mask.size(0);
  const int64_t num_groups = (m + group_rows - 1) / group_rows;
  Tensor out = torch::stable::empty({num_groups}, ScalarType::Int, std::nullopt, im_mask.device());
  if (num_groups == 0) {
    return out;
  }
  const bool* mask = im_mask.const_data_ptr<bool>();
  const int64_t stride = im_mask.stride(0);
  int32_t* counts = out.mutable_data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / group_rows);
  torch::stable::parallel_for(0, num_groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t lo = g * group_rows;
      const int64_t hi = std::min(lo + group_rows, m);
      int32_t n = 0;
      for (int64_t i = lo; i < hi; ++i) {
        n += mask[i * stride] ? 1 : 0;
      }
      counts[g] = n;
    }
  });
  return out;
}

}  // namespace mmkernels
