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

#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace mmkernels {

void check_moe_route_args(const at::Tensor& logits, int64_t k, int64_t capacity,
                          const std::optional<at::Tensor>& noise,
                          const std::optional<at::Tensor>& token_order) {
  TORCH_CHECK(logits.dim() == 2, "moe_route: logits must be 2-D [S, E], got ", logits.dim(), "-D");
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "moe_route: logits must be float32, got ",
              logits.scalar_type());
  const int64_t S = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E >= 1, "moe_route: logits needs at least one expert column");
  TORCH_CHECK(k >= 1 && k <= E, "moe_route: k must be in [1, num_experts=", E, "], got ", k);
  TORCH_CHECK(S * k < (int64_t{1} << 31), "moe_route: S*k must fit in int32, got ", S * k);
  TORCH_CHECK(capacity >= -1, "moe_route: capacity must be >= 0 (or -1 for dropless), got ", capacity);
  if (noise.has_value()) {
    TORCH_CHECK(noise->sizes() == logits.sizes(), "moe_route: noise must have the shape of logits ",
                logits.sizes(), ", got ", noise->sizes());
    TORCH_CHECK(noise->scalar_type() == at::kFloat, "moe_route: noise must be float32");
    TORCH_CHECK(noise->device() == logits.device(), "moe_route: noise must be on logits' device");
  }
  if (token_order.has_value()) {
    TORCH_CHECK(token_order->dim() == 1 && token_order->size(0) == S,
                "moe_route: token_order must be 1-D [S=", S, "], got ", token_order->sizes());
    TORCH_CHECK(token_order->scalar_type() == at::kLong, "moe_route: token_order must be int64");
    TORCH_CHECK(token_order->device() == logits.device(), "moe_route: token_order must be on logits' device");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cpu(
    const at::Tensor& logits, int64_t k, int64_t capacity, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& token_order) {
  check_moe_route_args(logits, k, capacity, noise, token_order);
  TORCH_CHECK(logits.device().is_cpu(), "moe_route_cpu: logits must be on CPU");
  const int64_t S = logits.size(0), E = logits.size(1);
  const auto i64 = logits.options().dtype(at::kLong);
  const auto i32 = logits.options().dtype(at::kInt);
  at::Tensor indices = at::empty({S, k}, i64);
  at::Tensor keep = at::empty({S, k}, logits.options().dtype(at::kBool));
  at::Tensor exp_counts = at::empty({E}, i64);
  at::Tensor top1_counts = at::empty({E}, i64);
  at::Tensor sorted_slots = at::empty({S * k}, i32);
  at::Tensor offsets = at::empty({E + 1}, i32);

  const at::Tensor lg = logits.contiguous();
  const at::Tensor nz = noise.has_value() ? noise->contiguous() : at::Tensor();
  const float* L = lg.const_data_ptr<float>();
  const float* N = nz.defined() ? nz.const_data_ptr<float>() : nullptr;
  int64_t* idx = indices.data_ptr<int64_t>();

  // 1. top-k per row (rows are independent)
  at::parallel_for(0, S, 256, [&](int64_t begin, int64_t end) {
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
  at::Tensor ord;
  if (token_order.has_value()) {
    ord = token_order->contiguous();
    order = ord.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < S; ++i) {
      TORCH_CHECK(order[i] >= 0 && order[i] < S, "moe_route: token_order[", i, "]=", order[i],
                  " is out of range [0, ", S, ")");
    }
  }
  bool* kp = keep.data_ptr<bool>();
  std::vector<int64_t> counts(E, 0);
  int64_t* top1 = top1_counts.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = 0; i < S; ++i) {
      const int64_t s = order ? order[i] : i;
      const int64_t pos = counts[idx[s * k + j]]++;
      kp[s * k + j] = capacity < 0 || pos < capacity;
    }
    if (j == 0) std::copy(counts.begin(), counts.end(), top1);
  }
  std::copy(counts.begin(), counts.end(), exp_counts.data_ptr<int64_t>());

  // 3. dispatch permutation: counting sort of the slots by expert (stable), dropped slots last
  std::vector<int64_t> cursor(E + 1, 0);
  for (int64_t t = 0; t < S * k; ++t) cursor[kp[t] ? idx[t] : E]++;
  int32_t* off = offsets.data_ptr<int32_t>();
  int64_t acc = 0;
  for (int64_t e = 0; e <= E; ++e) {
    const int64_t c = cursor[e];
    cursor[e] = acc;
    off[e] = static_cast<int32_t>(acc);
    acc += c;
  }
  int32_t* sorted = sorted_slots.data_ptr<int32_t>();
  for (int64_t t = 0; t < S * k; ++t) sorted[cursor[kp[t] ? idx[t] : E]++] = static_cast<int32_t>(t);
  return {indices, keep, exp_counts, top1_counts, sorted_slots, offsets};
}

}  // namespace mmkernels
