// Rotary position embedding applied in place, half-split layout (Qwen2/Qwen3/Llama in HF form):
// dims j and j + D/2 form a pair rotated by angle pos * inv_freq[j]. cos/sin come from a table
// [max_position, D/2] in f32 that the engine builds once, so the GPU and the CPU path rotate by
// the very same numbers.
#include "common.cuh"

template <typename T>
__device__ void rope_impl(T* __restrict__ x, const int* __restrict__ positions,
                          const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                          int num_heads, int head_dim, int max_position) {
  const int token = blockIdx.x;
  const int pos = positions[token];
  if (pos < 0 || pos >= max_position) return;  // the host validates; never read out of bounds
  const int half = head_dim / 2;
  T* row = x + (size_t)token * num_heads * head_dim;
  const float* c = cos_table + (size_t)pos * half;
  const float* s = sin_table + (size_t)pos * half;
  for (int i = threadIdx.x; i < num_heads * half; i += blockDim.x) {
    const int h = i / half, j = i % half;
    T* p = row + h * head_dim + j;
    const float x1 = to_f32(p[0]), x2 = to_f32(p[half]);
    p[0] = from_f32<T>(x1 * c[j] - x2 * s[j]);
    p[half] = from_f32<T>(x2 * c[j] + x1 * s[j]);
  }
}

#define SDLM_ROPE(T, NAME)                                                                  \
  extern "C" __global__ void rope_##NAME(T* x, const int* positions, const float* cos_table, \
                                         const float* sin_table, int num_heads, int head_dim, \
                                         int max_position) {                                  \
    rope_impl<T>(x, positions, cos_table, sin_table, num_heads, head_dim, max_position);      \
  }

SDLM_FOR_EACH_DTYPE(SDLM_ROPE)
