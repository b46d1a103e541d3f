// Shared helpers: element conversion and the instantiation macro used by every kernel file.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// Every kernel computes in f32 and rounds once when it stores (round to nearest even), which is
// what the Rust reference does with the `half` crate, so outputs can be compared bit for bit
// where the arithmetic order is the same.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}

// Loads 16 bytes (4 f32, or 8 bf16/f16) and widens them to f32.
template <typename T> struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
};

template <typename T>
__device__ __forceinline__ void load16_f32(const T* __restrict__ src, float* dst) {
  uint4 raw = *reinterpret_cast<const uint4*>(src);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::N; ++i) dst[i] = to_f32(e[i]);
}

#define SDLM_FOR_EACH_DTYPE(M) \
  M(float, f32)                \
  M(__nv_bfloat16, bf16)       \
  M(__half, f16)

// The one mask rule of attention. A sequence has `ctx` committed keys and `query_len` new ones;
// new token i sees new token j iff j / qblock <= i / qblock. So token i sees a prefix of the
// sequence's keys, [0, visible_keys(...)): every committed key, then the new keys up to the end
// of its own query block.
__device__ __forceinline__ int visible_keys(int ctx, int query_len, int qblock, int token) {
  return ctx + min(query_len, (token / qblock + 1) * qblock);
}
