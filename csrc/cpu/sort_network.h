// CPU kernels of primitive C (flashloss.ops.sort_network): relaxed sorting networks run as
// comparator schedules over slots (python/flashloss/ops/sort_schedule.py), one row per OpenMP
// iteration. No torch headers; csrc/ops.cpp checks arguments and allocates.
#pragma once
#include <cstdint>

#include "../core/sort_network.h"

namespace flashloss {
namespace cpu {

struct SortSchedule {
  int64_t n;              // elements per row
  int64_t num_comparators;
  const int32_t* pairs;   // [C, 2]: a = x[pairs[c,0]] (gets the min), b = x[pairs[c,1]] (gets the max)
  int64_t num_layers;
  const int32_t* layer_ptr;  // [L + 1]: layer l = comparators [layer_ptr[l], layer_ptr[l+1]), disjoint slots
  const int32_t* out_slot;  // [n]: output position r reads slot out_slot[r]
};

// x [B, n] (accumulation type T) -> sorted [B, n], alpha [B, C], and when non-null P [B, n, n]
// (sorted = x @ P) and PW [B, n, g] = P @ W with W [Bw, n, g] (Bw = 1: shared by every row).
template <typename T>
void sort_network_forward(const SortSchedule& s, const core::RelaxParams<T>& relax, int64_t B, const T* x,
                          T* sorted, T* alpha, T* P, const T* W, int64_t Bw, int64_t g, T* PW);

// Upstreams g_sorted [B, n], g_P [B, n, n], g_PW [B, n, g] (null when absent) -> g_x [B, n] and,
// when g_W is non-null, g_W [Bw, n, g] (summed over rows when Bw = 1; overwritten).
template <typename T>
void sort_network_backward(const SortSchedule& s, const core::RelaxParams<T>& relax, int64_t B, const T* x,
                           const T* alpha, const T* g_sorted, const T* g_P, const T* g_PW, const T* W, int64_t Bw,
                           int64_t g, T* g_x, T* g_W);

}  // namespace cpu
}  // namespace flashloss
