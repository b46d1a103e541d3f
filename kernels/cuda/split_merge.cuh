// The second half of flash-decoding, fused into the attention kernels: when a sequence's keys
// are split across CTAs, each writes its rows' partial (max, sum, unnormalised output), and the
// CTA that finishes a row tile's last split merges them into the output. No second launch.
#pragma once
#include "common.cuh"

// True, in every thread of the CTA, when this CTA is the last of `num_splits` to finish the row
// tile that `counter` counts. The last one also resets the counter for the next launch.
__device__ __forceinline__ bool last_split_to_finish(int* counter, int num_splits) {
  __shared__ int last;
  __threadfence();  // our partial rows are visible device-wide before we are counted
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1) == num_splits - 1;
    if (last) *counter = 0;
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// Merges rows [0, rows_here) of a row tile (row r is query row row0 + r of kv head kvh: token
// (row0 + r) / group, head kvh * group + (row0 + r) % group). Partials live at
// [split][token * num_heads + head] with m in log2 units; they are read through L2 (__ldcg),
// since other SMs wrote them. `scratch` is shared memory for rows_here x num_splits floats: each
// split's weight per row is computed once, so the element loop is loads and FMAs only.
template <typename T, int D>
__device__ void merge_split_rows(const float* partial_acc, const float* partial_ml, T* out,
                                 float* scratch, int row0, int rows_here, int group, int kvh,
                                 int q0, int num_heads, int num_tokens, int num_splits) {
  const size_t split_stride = (size_t)num_tokens * num_heads;
  auto row_of = [&](int r) {
    const int token = (row0 + r) / group, head = kvh * group + (row0 + r) % group;
    return (size_t)(q0 + token) * num_heads + head;
  };
  for (int r = threadIdx.x; r < rows_here; r += blockDim.x) {
    const size_t row = row_of(r);
    float m = -INFINITY;
    for (int s = 0; s < num_splits; ++s)
      m = fmaxf(m, __ldcg(partial_ml + (s * split_stride + row) * 2));
    float l = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const size_t sr = s * split_stride + row;
      const float w = m == -INFINITY ? 0.f : exp2f(__ldcg(partial_ml + sr * 2) - m);
      scratch[r * num_splits + s] = w;
      l += __ldcg(partial_ml + sr * 2 + 1) * w;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int s = 0; s < num_splits; ++s) scratch[r * num_splits + s] *= inv;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < rows_here * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    const size_t row = row_of(r);
    const float* w = scratch + r * num_splits;
    float o = 0.f;
#pragma unroll 4
    for (int s = 0; s < num_splits; ++s) o += w[s] * __ldcg(partial_acc + (s * split_stride + row) * D + d);
    out[row * D + d] = from_f32<T>(o);
  }
}
