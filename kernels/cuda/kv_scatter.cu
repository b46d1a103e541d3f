// Writes a committed block's keys and values into their cache pages. Committed blocks never
// change, so this runs once per block (at commit), never during denoising.
//
// k_block, v_block: [tokens, kv_heads, head_dim]; slots[t] = page * page_size + offset, or -1 to
// skip a padding token; pages: [num_pages, page_size, kv_heads, head_dim].
#include "common.cuh"

template <typename T>
__device__ void kv_scatter_impl(const T* __restrict__ k_block, const T* __restrict__ v_block,
                                T* __restrict__ k_pages, T* __restrict__ v_pages,
                                const int* __restrict__ slots, int row_elems) {
  const int token = blockIdx.x;
  const int slot = slots[token];
  if (slot < 0) return;
  // Rows are copied as raw 16-byte vectors: no conversion, so the cache holds the exact bits.
  const int vecs = row_elems * (int)sizeof(T) / 16;
  const uint4* ks = reinterpret_cast<const uint4*>(k_block + (size_t)token * row_elems);
  const uint4* vs = reinterpret_cast<const uint4*>(v_block + (size_t)token * row_elems);
  uint4* kd = reinterpret_cast<uint4*>(k_pages + (size_t)slot * row_elems);
  uint4* vd = reinterpret_cast<uint4*>(v_pages + (size_t)slot * row_elems);
  for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
    kd[i] = ks[i];
    vd[i] = vs[i];
  }
}

#define SDLM_KV_SCATTER(T, NAME)                                                         \
  extern "C" __global__ void kv_scatter_##NAME(const T* k_block, const T* v_block,       \
                                               T* k_pages, T* v_pages, const int* slots, \
                                               int row_elems) {                          \
    kv_scatter_impl<T>(k_block, v_block, k_pages, v_pages, slots, row_elems);            \
  }

SDLM_FOR_EACH_DTYPE(SDLM_KV_SCATTER)
