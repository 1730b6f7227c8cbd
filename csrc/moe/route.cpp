// CPU implementation of mmkernels::moe_route: DeepSpeed top-k gating decisions.
//
//   indices[s, 0] = argmax(logits[s])                                  (torch.argmax: first NaN wins,
//   indices[s, j] = argmax((logits[s] + noise[s]) masked at chosen)     else the first maximum)
//   pos(s, j)     = #{(j', s') : j' < j, e_j'(s') = e}  +  #{s' before s in token_order : e_j(s') = e}
//   keep          = capacity < 0 || pos < capacity
//   exp_counts[e] = #{(s, j) : e_j(s) = e}     top1_counts[e] = #{s : e_0(s) = e}
//   sorted_slots  = kept slots s*k+j grouped by expert (slot order inside a group), dropped slots last
//   expert_offsets[e] = start of expert e's group; expert_offsets[E] = number of kept slots
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <torch/csrc/stable/ops.h>

namespace mmkernels {

void check_moe_route_args(const Tensor& logits, int64_t k, int64_t capacity,
                          const std::optional<Tensor>& noise,
                          const std::optional<Tensor>& token_order) {
  STD_TORCH_CHECK(logits.dim() == 2, "moe_route: logits must be 2-D [S, E], got ", logits.dim(), "-D");
  STD_TORCH_CHECK(logits.scalar_type() == ScalarType::Float, "moe_route: logits must be float32, got ",
                  logits.scalar_type());
  const int64_t S = logits.size(0), E = logits.size(1);
  STD_TORCH_CHECK(E >= 1, "moe_route: logits needs at least one expert column");
  STD_TORCH_CHECK(k >= 1 && k <= E, "moe_route: k must be in [1, num_experts=", E, "], got ", k);
  STD_TORCH_CHECK(S * k < (int64_t{1} << 31), "moe_route: S*k must fit in int32, got ", S * k);
  STD_TORCH_CHECK(capacity >= -1, "moe_route: capacity must be >= 0 (or -1 for dropless), got ", capacity);
  if (noise.has_value()) {
    STD_TORCH_CHECK(noise->sizes().equals(logits.sizes()), "moe_route: noise must have the shape of logits ",
                    shape_str(logits), ", got ", shape_str(*noise));
    STD_TORCH_CHECK(noise->scalar_type() == ScalarType::Float, "moe_route: noise must be float32");
    STD_TORCH_CHECK(noise->device() == logits.device(), "moe_route: noise must be on logits' device");
  }
  if (token_order.has_value()) {
    STD_TORCH_CHECK(token_order->dim() == 1 && token_order->size(0) == S,
                    "moe_route: token_order must be 1-D [S=", S, "], got ", shape_str(*token_order));
    STD_TORCH_CHECK(token_order->scalar_type() == ScalarType::Long, "moe_route: token_order must be int64");
    STD_TORCH_CHECK(token_order->device() == logits.device(),
                    "moe_route: token_order must be on logits' device");
  }
}

MoERouteResult moe_route_cpu(const Tensor& logits, int64_t k, int64_t capacity,
                             const std::optional<Tensor>& noise, const std::optional<Tensor>& token_order) {
  check_moe_route_args(logits, k, capacity, noise, token_order);
  STD_TORCH_CHECK(logits.is_cpu(), "moe_route_cpu: logits must be on CPU");
  const int64_t S = logits.size(0), E = logits.size(1);
  const auto dev = logits.device();
  Tensor indices = torch::stable::empty({S, k}, ScalarType::Long, std::nullopt, dev);
  Tensor keep = torch::stable::empty({S, k}, ScalarType::Bool, std::nullopt, dev);
  Tensor exp_counts = torch::stable::empty({E}, ScalarType::Long, std::nullopt, dev);
  Tensor top1_counts = torch::stable::empty({E}, ScalarType::Long, std::nullopt, dev);
  Tensor sorted_slots = torch::stable::empty({S * k}, ScalarType::Int, std::nullopt, dev);
  Tensor offsets = torch::stable::empty({E + 1}, ScalarType::Int, std::nullopt, dev);

  const Tensor lg = torch::stable::contiguous(logits);
  const Tensor nz = noise.has_value() ? torch::stable::contiguous(*noise) : Tensor();
  const float* L = lg.const_data_ptr<float>();
  const float* N = nz.defined() ? nz.const_data_ptr<float>() : nullptr;
  int64_t* idx = indices.mutable_data_ptr<int64_t>();

  // 1. top-k per row (rows are independent)
  torch::stable::parallel_for(0, S, 256, [&](int64_t begin, int64_t end) {
    std::vector<char> chosen(E);
    for (int64_t s = begin; s < end; ++s) {
      std::fill(chosen.begin(), chosen.end(), 0);
      const float* row = L + s * E;
      const float* nrow = N ? N + s * E : nullptr;
      for (int64_t j = 0; j < k; ++j) {
        auto value = [&](int64_t e) -> float {
          if (j == 0) return row[e];
          if (chosen[e]) return -std::numeric_limits<float>::infinity();
          return nrow ? row[e] + nrow[e] : row[e];
        };
        int64_t best = 0;
        float bv = value(0);
        if (!std::isnan(bv)) {
          for (int64_t e = 1; e < E; ++e) {
            const float v = value(e);
            if (std::isnan(v)) { best = e; break; }
            if (v > bv) { bv = v; best = e; }
          }
        }
        idx[s * k + j] = best;
        chosen[best] = 1;
      }
    }
  });

  // 2. capacity positions: choices j-major, rows in token order
  const int64_t* order = nullptr;
  Tensor ord;
  if (token_order.has_value()) {
    ord = torch::stable::contiguous(*token_order);
    order = ord.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < S; ++i) {
      STD_TORCH_CHECK(order[i] >= 0 && order[i] < S, "moe_route: token_order[", i, "]=", order[i],
                      " is out of range [0, ", S, ")");
    }
  }
  bool* kp = keep.mutable_data_ptr<bool>();
  std::vector<int64_t> counts(E, 0);
  int64_t* top1 = top1_counts.mutable_data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = 0; i < S; ++i) {
      const int64_t s = order ? order[i] : i;
      const int64_t pos = counts[idx[s * k + j]]++;
      kp[s * k + j] = capacity < 0 || pos < capacity;
    }
    if (j == 0) std::copy(counts.begin(), counts.end(), top1);
  }
  std::copy(counts.begin(), counts.end(), exp_counts.mutable_data_ptr<int64_t>());

  // 3. dispatch permutation: counting sort of the slots by expert (stable), dropped slots last
  std::vector<int64_t> cursor(E + 1, 0);
  for (int64_t t = 0; t < S * k; ++t) cursor[kp[t] ? idx[t] : E]++;
  int32_t* off = offsets.mutable_data_ptr<int32_t>();
  int64_t acc = 0;
  for (int64_t e = 0; e <= E; ++e) {
    const int64_t c = cursor[e];
    cursor[e] = acc;
    off[e] = static_cast<int32_t>(acc);
    acc += c;
  }
  int32_t* sorted = sorted_slots.mutable_data_ptr<int32_t>();
  for (int64_t t = 0; t < S * k; ++t) sorted[cursor[kp[t] ? idx[t] : E]++] = static_cast<int32_t>(t);
  return {indices, keep, exp_counts, top1_counts, sorted_slots, offsets};
}

}  // namespace mmkernels
