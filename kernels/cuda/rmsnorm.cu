// Residual add + RMSNorm in one pass over a row, as every pre-norm decoder layer does twice:
//   residual <- round(x + residual);  out <- round(residual * rsqrt(mean(residual^2) + eps) * w)
// The norm reads the rounded residual, so the fused result equals "add, then norm" exactly.
#include "common.cuh"

namespace {
constexpr int THREADS = 256;

__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < THREADS / 32 ? scratch[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ void residual_rmsnorm_impl(const T* __restrict__ x, T* __restrict__ residual,
                                      const T* __restrict__ weight, T* __restrict__ out,
                                      int hidden, float eps) {
  __shared__ float scratch[THREADS / 32];
  constexpr int VN = Vec16<T>::N;
  const size_t base = (size_t)blockIdx.x * hidden;
  const int vecs = hidden / VN;  // the host checks hidden % VN == 0
  float sumsq = 0.f;
  for (int v = threadIdx.x; v < vecs; v += THREADS) {
    uint4 xr = reinterpret_cast<const uint4*>(x + base)[v];
    uint4 rr = reinterpret_cast<const uint4*>(residual + base)[v];
    const T* xe = reinterpret_cast<const T*>(&xr);
    T* re = reinterpret_cast<T*>(&rr);
#pragma unroll
    for (int i = 0; i < VN; ++i) {
      re[i] = from_f32<T>(to_f32(xe[i]) + to_f32(re[i]));
      const float z = to_f32(re[i]);
      sumsq = fmaf(z, z, sumsq);
    }
    reinterpret_cast<uint4*>(residual + base)[v] = rr;
  }
  const float inv_rms = rsqrtf(block_sum(sumsq, scratch) / hidden + eps);
  for (int v = threadIdx.x; v < vecs; v += THREADS) {
    uint4 rr = reinterpret_cast<const uint4*>(residual + base)[v];  // this thread's own write
    uint4 wr = reinterpret_cast<const uint4*>(weight)[v];
    uint4 outr;
    const T* re = reinterpret_cast<const T*>(&rr);
    const T* we = reinterpret_cast<const T*>(&wr);
    T* oe = reinterpret_cast<T*>(&outr);
#pragma unroll
    for (int i = 0; i < VN; ++i) oe[i] = from_f32<T>(to_f32(re[i]) * inv_rms * to_f32(we[i]));
    reinterpret_cast<uint4*>(out + base)[v] = outr;
  }
}
}  // namespace

#define SDLM_RMSNORM(T, NAME)                                                            \
  extern "C" __global__ void __launch_bounds__(THREADS) residual_rmsnorm_##NAME(         \
      const T* x, T* residual, const T* weight, T* out, int hidden, float eps) {          \
    residual_rmsnorm_impl<T>(x, residual, weight, out, hidden, eps);                     \
  }

SDLM_FOR_EACH_DTYPE(SDLM_RMSNORM)
