// Confidence selection for a denoising step, in two launches:
//  1. row_confidence: per logits row, in one pass over the vocabulary, the arg max and the
//     probability of it under softmax(logits / temperature) (temperature 0 means 1 here: greedy
//     decoding still needs a confidence). Online max/sum, as in flash attention's softmax.
//  2. select_unmask: per block, every masked position with confidence >= threshold; if fewer
//     than min_unmask[b] qualify, the most confident remaining masked positions are added until
//     min_unmask[b] are chosen (at least one per step, so decoding always progresses).
// Ties go to the lower index in both, as in the CPU reference.
#include "common.cuh"

namespace {
constexpr int THREADS = 512;

struct MaxSum {
  float m;  // running max of scaled logits
  float s;  // sum of exp(x - m)
  int arg;  // index of the first maximum
};

__device__ __forceinline__ void push(MaxSum& a, float x, int i) {
  if (x > a.m) {
    a.s = a.s * __expf(a.m - x) + 1.f;
    a.m = x;
    a.arg = i;
  } else if (a.m != -INFINITY) {  // -inf logits (a banned token) add nothing
    a.s += __expf(x - a.m);
  }
}

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  if (b.m > a.m || (b.m == a.m && b.arg < a.arg)) {
    MaxSum t = a; a = b; b = t;
  }
  // a now holds the maximum (first index among equals)
  if (b.m != -INFINITY) a.s += b.s * __expf(b.m - a.m);
  return a;
}

template <typename T>
__device__ void row_confidence_impl(const T* __restrict__ logits, int vocab, float temperature,
                                    int* __restrict__ tokens, float* __restrict__ confidence) {
  const T* row = logits + (size_t)blockIdx.x * vocab;
  const float inv_t = temperature > 0.f ? 1.f / temperature : 1.f;
  MaxSum acc = {-INFINITY, 0.f, 0x7fffffff};
  constexpr int VN = Vec16<T>::N;
  const bool aligned = (vocab % VN) == 0;  // rows then start on 16-byte boundaries
  if (aligned) {
    for (int v = threadIdx.x; v < vocab / VN; v += THREADS) {
      float f[VN];
      load16_f32(row + v * VN, f);
#pragma unroll
      for (int i = 0; i < VN; ++i) push(acc, f[i] * inv_t, v * VN + i);
    }
  } else {
    for (int i = threadIdx.x; i < vocab; i += THREADS) push(acc, to_f32(row[i]) * inv_t, i);
  }
  // Threads saw interleaved indices, so merge keeps the first maximum by index, not by order.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other = {__shfl_xor_sync(0xffffffffu, acc.m, o), __shfl_xor_sync(0xffffffffu, acc.s, o),
                    __shfl_xor_sync(0xffffffffu, acc.arg, o)};
    acc = merge(acc, other);
  }
  __shared__ MaxSum warps[THREADS / 32];
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    MaxSum total = warps[0];
    for (int w = 1; w < THREADS / 32; ++w) total = merge(total, warps[w]);
    tokens[blockIdx.x] = total.arg;
    confidence[blockIdx.x] = 1.f / total.s;  // exp(max - max) / sum
  }
}
}  // namespace

#define SDLM_ROW_CONFIDENCE(T, NAME)                                                        \
  extern "C" __global__ void __launch_bounds__(THREADS) row_confidence_##NAME(              \
      const T* logits, int vocab, float temperature, int* tokens, float* confidence) {      \
    row_confidence_impl<T>(logits, vocab, temperature, tokens, confidence);                 \
  }

SDLM_FOR_EACH_DTYPE(SDLM_ROW_CONFIDENCE)

// grid = blocks, any block size. Rows [block_starts[b], block_starts[b + 1]).
extern "C" __global__ void select_unmask(const float* __restrict__ confidence,
                                         const unsigned char* __restrict__ masked,
                                         const int* __restrict__ block_starts,
                                         const int* __restrict__ min_unmask, float threshold,
                                         unsigned char* __restrict__ unmask) {
  __shared__ int passed;
  const int begin = block_starts[blockIdx.x], end = block_starts[blockIdx.x + 1];
  if (threadIdx.x == 0) passed = 0;
  __syncthreads();
  int mine = 0;
  for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const bool pick = masked[i] && confidence[i] >= threshold;
    unmask[i] = pick;
    mine += pick;
  }
  atomicAdd(&passed, mine);
  __syncthreads();
  const int need = min_unmask[blockIdx.x] - passed;
  if (need <= 0) return;
  // Rank each remaining candidate by (confidence desc, index asc); take the first `need`.
  for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
    if (!masked[i] || confidence[i] >= threshold) continue;
    const float ci = confidence[i];
    int rank = 0;
    for (int j = begin; j < end; ++j) {
      if (!masked[j] || confidence[j] >= threshold) continue;
      const float cj = confidence[j];
      rank += (cj > ci) || (cj == ci && j < i);
    }
    if (rank < need) unmask[i] = 1;
  }
}
