// What the two tensor-core attention kernels share: the mma and copy instructions, and the
// pipeline that streams one kv head's keys of a sequence from the paged cache (and the new
// tokens' K/V) through shared memory, STAGES tiles deep with cp.async.
#pragma once
#include "split_merge.cuh"

namespace tc {

constexpr float LOG2E = 1.4426950408889634f;
// Tiles in flight per CTA. The host sizes dynamic shared memory to match (dynamic_smem_bytes in
// src/cuda/attention.rs): STAGES x 2 (K, V) x KEYS x (D + 8) elements.
constexpr int STAGES = 3;

template <typename T> struct Mma;

// One specialisation per 16-bit type: m16n8k16 with f32 accumulators (`run`), and `split`,
// which packs (x, y) as a hi part and the rounding remainder as a lo part. The types differ
// only in the PTX type name and their pair type's conversions.
#define SDLM_TC_MMA(T, PTX, PAIR, PACK2)                                                        \
  template <> struct Mma<T> {                                                                   \
    static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0,    \
                                               uint32_t b1) {                                   \
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX                         \
                   ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"              \
                   : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                            \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));           \
    }                                                                                           \
    static __device__ __forceinline__ void split(float x, float y, uint32_t& hi, uint32_t& lo) { \
      PAIR h = PACK2(x, y);                                                                     \
      PAIR l = PACK2(x - __low2float(h), y - __high2float(h));                                  \
      hi = *reinterpret_cast<uint32_t*>(&h);                                                    \
      lo = *reinterpret_cast<uint32_t*>(&l);                                                    \
    }                                                                                           \
  };

SDLM_TC_MMA(__nv_bfloat16, "bf16", __nv_bfloat162, __floats2bfloat162_rn)
SDLM_TC_MMA(__half, "f16", __half2, __floats2half2_rn)
#undef SDLM_TC_MMA

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: no read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// The warp's 8x8 b16 matrix, one register a thread in mma's fragment layout (thread 4r + c
// holds row r, columns 2c and 2c + 1), transposed in that same layout.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

// The keys [k_begin, k_end) of kv head `kvh` of one sequence, streamed in tiles of KEYS rows of
// D elements (row stride D + 8: +16 bytes a row, so fragment loads hit all 32 banks). Key t < ctx
// is in the paged cache through the block table; later keys are the new tokens' own K/V. Each
// thread copies 16-byte chunks of one column of every (THREADS / (D/8))-th key row.
template <typename T, int D, int KEYS, int THREADS>
struct PagedTiles {
  static constexpr int STRIDE = D + 8;
  static constexpr int TILE = KEYS * STRIDE;  // elements of one K (or V) stage
  static constexpr int VECS_PER_KEY = D / 8;
  static constexpr int KEY_STEP = THREADS / VECS_PER_KEY;
  static constexpr int KEYS_PER_THREAD = KEYS / KEY_STEP;
  static_assert(THREADS % VECS_PER_KEY == 0 && KEYS % KEY_STEP == 0, "loader mapping");

  T* kv;  // [stage][K, V][KEYS x STRIDE]
  const T* k_new;
  const T* v_new;
  const T* k_pages;
  const T* v_pages;
  const int* table;  // this sequence's block table
  int ctx, k_end, q0, kvh, num_kv_heads, page_size, page_shift, load_col, load_key0;

  // The pages of this thread's keys in a tile, looked up one tile before they are needed: a
  // lookup right in front of its cp.async stalled the warp on a global load every tile.
  __device__ __forceinline__ void lookup_pages(int t0, int (&pages)[KEYS_PER_THREAD]) const {
#pragma unroll
    for (int i = 0; i < KEYS_PER_THREAD; ++i) {
      const int t = t0 + load_key0 + i * KEY_STEP;
      pages[i] = t < min(k_end, ctx) ? table[t >> page_shift] : 0;
    }
  }

  __device__ __forceinline__ void load_tile(int stage, int t0, const int (&pages)[KEYS_PER_THREAD]) const {
    T* ks = kv + stage * 2 * TILE;
    T* vs = ks + TILE;
#pragma unroll
    for (int i = 0; i < KEYS_PER_THREAD; ++i) {
      const int key = load_key0 + i * KEY_STEP;
      const int col = load_col;
      const int t = t0 + key;
      const bool in = t < k_end;
      size_t base = 0;
      const T* ksrc = k_pages;
      const T* vsrc = v_pages;
      if (in && t < ctx) {
        const int page = pages[i];
        base = (((size_t)page * page_size + (t & (page_size - 1))) * num_kv_heads + kvh) * D;
      } else if (in) {
        base = ((size_t)(q0 + t - ctx) * num_kv_heads + kvh) * D;
        ksrc = k_new;
        vsrc = v_new;
      }
      cp_async16(ks + key * STRIDE + col, ksrc + base + col, in);
      cp_async16(vs + key * STRIDE + col, vsrc + base + col, in);
    }
    cp_async_commit();
  }

  // The pipeline, in the caller's loop over tiles (a loop body passed in as a lambda cost the
  // d128 kernel register spills):
  //   int pages[KEYS_PER_THREAD];
  //   tiles_in.start(k_begin, tiles, pages);
  //   for (int it = 0; it < tiles; ++it) {
  //     const T* ks = tiles_in.next(it, k_begin, tiles, pages);  // K; V is ks + TILE
  //     ... (tile `it` is in shared memory) ...
  //     __syncthreads();  // the next iteration reloads this stage
  //   }
  //   cp_async_wait<0>();  // before the caller reuses `kv`
  // Every iteration commits one group (empty past the last tile), so waiting for all but the
  // newest STAGES - 1 groups always means: tile `it` has landed.
  __device__ __forceinline__ void start(int k_begin, int tiles, int (&pages)[KEYS_PER_THREAD]) const {
    for (int p = 0; p < STAGES - 1; ++p) {
      lookup_pages(k_begin + p * KEYS, pages);
      if (p < tiles) load_tile(p, k_begin + p * KEYS, pages);
      else cp_async_commit();
    }
    lookup_pages(k_begin + (STAGES - 1) * KEYS, pages);
  }

  // Starts loading tile it + STAGES - 1, waits for tile `it` and returns its K stage.
  __device__ __forceinline__ const T* next(int it, int k_begin, int tiles, int (&pages)[KEYS_PER_THREAD]) const {
    const int ahead = it + STAGES - 1;
    if (ahead < tiles) load_tile(ahead % STAGES, k_begin + ahead * KEYS, pages);
    else cp_async_commit();
    lookup_pages(k_begin + (ahead + 1) * KEYS, pages);  // consumed next iteration
    cp_async_wait<STAGES - 1>();
    __syncthreads();
    return kv + (it % STAGES) * 2 * TILE;
  }
};

}  // namespace tc
