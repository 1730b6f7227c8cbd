// CUDA implementation of mmkernels::moe_route (semantics in csrc/moe/route.cpp).
//
// Two launches, no host synchronisation (capacity is a host int computed from shapes), so the op
// can be captured in a CUDA graph:
//   1. moe_topk_kernel: one thread per row picks its k experts (torch.argmax semantics).
//   2. moe_route_scan_kernel: ONE block of 1024 threads walks the (choice, row) sequence in chunks of
//      1024 and computes stable per-expert ranks with warp match + a per-warp count table in shared
//      memory.  Pass A (choices j-major, rows in token order) gives capacity positions, keep and the
//      counts; pass B (slot order, key = expert or E when dropped) gives the stable counting-sort
//      permutation and the offsets.  All counts are integers, so the result is deterministic.
// A single block is plenty for MoE-LLaVA sizes (S*k <= 64k slots: <= 64 chunks per pass).
#include "ops.h"

#include <limits>

#include <cuda_runtime.h>

#include "cuda/stream.h"

namespace mmkernels {
namespace {

constexpr int kScanThreads = 1024;
constexpr int kScanWarps = kScanThreads / 32;
constexpr int64_t kMaxExperts = 320;  // (kScanWarps + 1) * (E + 1) ints of shared memory <= 48 KB

__global__ void moe_topk_kernel(const float* __restrict__ logits, const float* __restrict__ noise, int64_t S,
                                int64_t E, int64_t k, int64_t* __restrict__ idx) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= S) return;
  const float* row = logits + s * E;
  const float* nrow = noise ? noise + s * E : nullptr;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = 0;
    float bv = 0.f;
    for (int64_t e = 0; e < E; ++e) {
      float v = row[e];
      if (j > 0) {
        bool taken = false;
        for (int64_t jj = 0; jj < j; ++jj) taken |= idx[s * k + jj] == e;
        v = taken ? neg_inf : (nrow ? v + nrow[e] : v);
      }
      if (e == 0) {
        bv = v;
        if (isnan(v)) break;
        continue;
      }
      if (isnan(v)) { best = e; break; }
      if (v > bv) { bv = v; best = e; }
    }
    idx[s * k + j] = best;
  }
}

// Stable rank of each thread's key among the keys of this chunk and all earlier chunks.
// Every thread of the block must call it (it synchronises); invalid threads pass valid = false.
__device__ int chunk_rank(int key, bool valid, int G, int* warp_counts, int* running) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int t = threadIdx.x; t < kScanWarps * G; t += blockDim.x) warp_counts[t] = 0;
  __syncthreads();
  const unsigned peers = __match_any_sync(0xffffffffu, valid ? key : -1);
  const int rank_in_warp = __popc(peers & ((1u << lane) - 1u));
  if (valid && rank_in_warp == 0) warp_counts[warp * G + key] = __popc(peers);
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += blockDim.x) {  // exclusive scan over warps, plus earlier chunks
    int acc = running[g];
    for (int w = 0; w < kScanWarps; ++w) {
      const int c = warp_counts[w * G + g];
      warp_counts[w * G + g] = acc;
      acc += c;
    }
    running[g] = acc;
  }
  __syncthreads();
  const int r = valid ? warp_counts[warp * G + key] + rank_in_warp : 0;
  __syncthreads();
  return r;
}

__global__ void __launch_bounds__(kScanThreads) moe_route_scan_kernel(
    const int64_t* __restrict__ idx, const int64_t* __restrict__ order, int S, int E, int k, int64_t capacity,
    bool* __restrict__ keep, int64_t* __restrict__ exp_counts, int64_t* __restrict__ top1_counts,
    int32_t* __restrict__ sorted, int32_t* __restrict__ offsets, int32_t* __restrict__ rank_tmp) {
  extern __shared__ int smem[];
  const int G = E + 1;
  int* warp_counts = smem;                  // [kScanWarps][G]
  int* running = smem + kScanWarps * G;     // [G]
  for (int g = threadIdx.x; g < G; g += blockDim.x) running[g] = 0;
  __syncthreads();
  // Pass A: positions.  Sequence = choice j (outer), rows in token order (inner).
  for (int j = 0; j < k; ++j) {
    for (int base = 0; base < S; base += kScanThreads) {
      const int i = base + static_cast<int>(threadIdx.x);
      const bool valid = i < S;
      const int64_t s = valid ? (order ? order[i] : i) : 0;
      const int e = valid ? static_cast<int>(idx[s * k + j]) : 0;
      const int pos = chunk_rank(e, valid, E, warp_counts, running);
      if (valid) keep[s * k + j] = capacity < 0 || pos < capacity;
    }
    if (j == 0) {
      for (int g = threadIdx.x; g < E; g += blockDim.x) top1_counts[g] = running[g];
    }
  }
  for (int g = threadIdx.x; g < E; g += blockDim.x) exp_counts[g] = running[g];
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += blockDim.x) running[g] = 0;
  __syncthreads();
  // Pass B: stable counting sort of the slots by (expert if kept else E).
  const int n = S * k;
  for (int base = 0; base < n; base += kScanThreads) {
    const int t = base + static_cast<int>(threadIdx.x);
    const bool valid = t < n;
    const int key = valid ? (keep[t] ? static_cast<int>(idx[t]) : E) : 0;
    const int r = chunk_rank(key, valid, G, warp_counts, running);
    if (valid) rank_tmp[t] = r;
  }
  if (threadIdx.x == 0) {  // exclusive scan of the group sizes (G is small)
    int acc = 0;
    for (int g = 0; g < G; ++g) {
      const int c = running[g];
      running[g] = acc;
      offsets[g] = acc;
      acc += c;
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const int key = keep[t] ? static_cast<int>(idx[t]) : E;
    sorted[running[key] + rank_tmp[t]] = t;
  }
}

}  // namespace

MoERouteResult moe_route_cuda(const Tensor& logits, int64_t k, int64_t capacity,
                              const std::optional<Tensor>& noise, const std::optional<Tensor>& token_order) {
  check_moe_route_args(logits, k, capacity, noise, token_order);
  STD_TORCH_CHECK(logits.is_cuda(), "moe_route_cuda: logits must be a CUDA tensor");
  const int64_t S = logits.size(0), E = logits.size(1);
  STD_TORCH_CHECK(E <= kMaxExperts, "moe_route (CUDA): at most ", kMaxExperts, " experts, got ", E);
  const torch::stable::accelerator::DeviceGuard device_guard(logits.get_device_index());
  const auto dev = logits.device();
  Tensor indices = torch::stable::empty({S, k}, ScalarType::Long, std::nullopt, dev);
  Tensor keep = torch::stable::empty({S, k}, ScalarType::Bool, std::nullopt, dev);
  Tensor exp_counts = torch::stable::empty({E}, ScalarType::Long, std::nullopt, dev);
  Tensor top1_counts = torch::stable::empty({E}, ScalarType::Long, std::nullopt, dev);
  Tensor sorted_slots = torch::stable::empty({S * k}, ScalarType::Int, std::nullopt, dev);
  Tensor offsets = torch::stable::empty({E + 1}, ScalarType::Int, std::nullopt, dev);
  Tensor rank_tmp = torch::stable::empty({S * k}, ScalarType::Int, std::nullopt, dev);
  const Tensor lg = torch::stable::contiguous(logits);
  const Tensor nz = noise.has_value() ? torch::stable::contiguous(*noise) : Tensor();
  const Tensor ord = token_order.has_value() ? torch::stable::contiguous(*token_order) : Tensor();
  cudaStream_t stream = current_cuda_stream(logits.get_device_index());
  if (S > 0) {
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>((S + threads - 1) / threads);
    moe_topk_kernel<<<blocks, threads, 0, stream>>>(lg.const_data_ptr<float>(),
                                                    nz.defined() ? nz.const_data_ptr<float>() : nullptr, S, E, k,
                                                    indices.mutable_data_ptr<int64_t>());
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const size_t smem = static_cast<size_t>(kScanWarps + 1) * static_cast<size_t>(E + 1) * sizeof(int);
  moe_route_scan_kernel<<<1, kScanThreads, smem, stream>>>(
      indices.const_data_ptr<int64_t>(), ord.defined() ? ord.const_data_ptr<int64_t>() : nullptr,
      static_cast<int>(S), static_cast<int>(E), static_cast<int>(k), capacity, keep.mutable_data_ptr<bool>(),
      exp_counts.mutable_data_ptr<int64_t>(), top1_counts.mutable_data_ptr<int64_t>(),
      sorted_slots.mutable_data_ptr<int32_t>(), offsets.mutable_data_ptr<int32_t>(),
      rank_tmp.mutable_data_ptr<int32_t>());
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return {indices, keep, exp_counts, top1_counts, sorted_slots, offsets};
}

}  // namespace mmkernels
