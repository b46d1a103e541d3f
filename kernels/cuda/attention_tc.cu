// Paged attention on tensor cores (mma.sync m16n8k16, bf16/f16 in, f32 accumulate): the same
// function, arguments and partial-result layout as attention.cu, which stays the f32 kernel and
// the baseline this one is timed against.
//
// A warp owns 16 query rows (rows = tokens x the query heads of one kv head, so grouped heads
// share every K/V load) and computes S = Q K^T and O += P V with mma. K/V tiles stream through
// shared memory with cp.async, STAGES deep, so two tiles load while one computes. (Four stages
// measured no faster on an H100: the AR case is bound by instruction issue at low occupancy, so
// the shared memory buys a fourth CTA per SM instead.)
// When a CTA has fewer rows than warps x 16 (AR decoding), warps split each tile's keys and merge
// at the end. P is split into bf16/f16 hi + lo parts for the P V product (two mmas), so rounding
// P costs no accuracy: the result matches the f32 reference to f32 rounding, not to bf16's.
#include "split_merge.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int ROWS = WARPS * 16;  // query rows per CTA
constexpr float LOG2E = 1.4426950408889634f;
// Tiles in flight per CTA. The host sizes dynamic shared memory to match (tc_smem_bytes in
// src/cuda/attention.rs): STAGES x 2 (K, V) x KEYS x (D + 8) elements.
constexpr int STAGES = 3;

template <int D>
struct Shape {
  static constexpr int KEYS = D <= 64 ? 64 : 32;  // keys per tile: 16 KiB of bf16 K+V
  static constexpr int STRIDE = D + 8;  // +16 bytes per smem row: fragment loads hit 32 banks
  static constexpr int KSTEPS = D / 16;
  static constexpr int DBLOCKS = D / 8;
  static constexpr int NB = KEYS / 8;           // 8-key blocks of S per tile
  static constexpr int MAX_WSPLIT = KEYS / 16;  // a warp needs >= 16 keys (one P V k-step)
  static constexpr int TILE = KEYS * STRIDE;    // elements of one K (or V) stage
};

template <typename T> struct Mma;

template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Packs (x, y) as a hi part and the rounding remainder as a lo part.
  static __device__ __forceinline__ void split(float x, float y, uint32_t& hi, uint32_t& lo) {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    __nv_bfloat162 l = __floats2bfloat162_rn(x - __low2float(h), y - __high2float(h));
    hi = *reinterpret_cast<uint32_t*>(&h);
    lo = *reinterpret_cast<uint32_t*>(&l);
  }
};

template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void split(float x, float y, uint32_t& hi, uint32_t& lo) {
    __half2 h = __floats2half2_rn(x, y);
    __half2 l = __floats2half2_rn(x - __low2float(h), y - __high2float(h));
    hi = *reinterpret_cast<uint32_t*>(&h);
    lo = *reinterpret_cast<uint32_t*>(&l);
  }
};

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

template <typename T, int D>
__device__ void paged_attention_tc_impl(
    const T* __restrict__ q, const T* __restrict__ k_new, const T* __restrict__ v_new,
    const T* __restrict__ k_pages, const T* __restrict__ v_pages,
    const int* __restrict__ block_tables, const int* __restrict__ context_lens,
    const int* __restrict__ query_starts, const int* __restrict__ query_blocks,
    T* __restrict__ out, float* __restrict__ partial_acc, float* __restrict__ partial_ml,
    int* __restrict__ split_counters, int num_tokens, int num_heads, int num_kv_heads, int page_size, int max_pages_per_seq,
    int keys_per_split, int num_splits, float scale) {
  using S = Shape<D>;
  // [stage][K, V][KEYS x STRIDE] (dynamic); reused as the f32 merge buffer at the end.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* kv = reinterpret_cast<T*>(smem_raw);
  __shared__ float red_m[WARPS][16];
  __shared__ float red_l[WARPS][16];
  static_assert(STAGES * 2 * S::TILE * sizeof(T) >= WARPS * 16 * D * sizeof(float), "merge buffer");

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const int seq = blockIdx.z / num_kv_heads;
  const int kvh = blockIdx.z % num_kv_heads;
  const int group = num_heads / num_kv_heads;
  const int q0 = query_starts[seq];
  const int query_len = query_starts[seq + 1] - q0;
  const int ctx = context_lens[seq];
  const int qblock = query_blocks[seq];
  const int row0 = blockIdx.x * ROWS;
  const int rows_here = min(ROWS, query_len * group - row0);
  if (rows_here <= 0) return;

  const int row_blocks = (rows_here + 15) / 16;
  const int wsplit = min(row_blocks == 1 ? 4 : row_blocks == 2 ? 2 : 1, S::MAX_WSPLIT);
  const int rb = warp / wsplit, ws = warp % wsplit;
  const bool active = rb < row_blocks;  // uniform per warp
  const int keys_per_warp = S::KEYS / wsplit;
  const int nb_w = keys_per_warp / 8;
  const int key_off = ws * keys_per_warp;

  // This thread's two rows (fragment rows gid and gid + 8 of the warp's 16).
  int row[2], token[2], head[2];
  bool valid[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = rb * 16 + gid + 8 * h;
    valid[h] = active && row[h] < rows_here;
    const int rr = min(row0 + row[h], query_len * group - 1);
    token[h] = rr / group;
    head[h] = kvh * group + rr % group;
  }

  const int last_token = (row0 + rows_here - 1) / group;
  const int k_begin = blockIdx.y * keys_per_split;
  const int k_end = min(visible_keys(ctx, query_len, qblock, last_token), k_begin + keys_per_split);
  const int page_shift = __ffs(page_size) - 1;  // the host checks page_size is a power of two
  // Keys each of this thread's rows sees (0 for padding rows): a prefix, so one compare masks.
  int my_keys[2];
  for (int h = 0; h < 2; ++h)
    my_keys[h] = valid[h] ? min(k_end, visible_keys(ctx, query_len, qblock, token[h])) : 0;
  const int tiles = k_end > k_begin ? (k_end - k_begin + S::KEYS - 1) / S::KEYS : 0;

  // Q as mma A fragments, loaded once.
  uint32_t qf[S::KSTEPS][4];
#pragma unroll
  for (int ks = 0; ks < S::KSTEPS; ++ks) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int h = r & 1;
      const int col = ks * 16 + tig * 2 + ((r & 2) ? 8 : 0);
      const T* src = q + ((size_t)(q0 + token[h]) * num_heads + head[h]) * D + col;
      qf[ks][r] = valid[h] ? *reinterpret_cast<const uint32_t*>(src) : 0u;
    }
  }

  // Each thread copies 16-byte chunks of one column of every (THREADS / (D/8))-th key row.
  constexpr int VECS_PER_KEY = D / 8;
  constexpr int KEY_STEP = THREADS / VECS_PER_KEY;
  static_assert(THREADS % VECS_PER_KEY == 0 && S::KEYS % KEY_STEP == 0, "loader mapping");
  const int load_col = (tid % VECS_PER_KEY) * 8;
  const int load_key0 = tid / VECS_PER_KEY;
  constexpr int KEYS_PER_THREAD = S::KEYS / KEY_STEP;
  const int* table = block_tables + (size_t)seq * max_pages_per_seq;
  // The pages of this thread's keys in a tile, looked up one tile before they are needed: a
  // lookup right in front of its cp.async stalled the warp on a global load every tile.
  auto lookup_pages = [&](int t0, int (&pages)[KEYS_PER_THREAD]) {
#pragma unroll
    for (int i = 0; i < KEYS_PER_THREAD; ++i) {
      const int t = t0 + load_key0 + i * KEY_STEP;
      pages[i] = t < min(k_end, ctx) ? table[t >> page_shift] : 0;
    }
  };
  auto load_tile = [&](int stage, int t0, const int (&pages)[KEYS_PER_THREAD]) {
    T* ks = kv + stage * 2 * S::TILE;
    T* vs = ks + S::TILE;
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
      cp_async16(ks + key * S::STRIDE + col, ksrc + base + col, in);
      cp_async16(vs + key * S::STRIDE + col, vsrc + base + col, in);
    }
    cp_async_commit();
  };

  float o[S::DBLOCKS][4];
#pragma unroll
  for (int d = 0; d < S::DBLOCKS; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = scale * LOG2E;

  // Every iteration commits one group (empty past the last tile), so waiting for all but the
  // newest STAGES - 1 groups always means: tile `it` has landed.
  int pages[KEYS_PER_THREAD];
  for (int p = 0; p < STAGES - 1; ++p) {
    lookup_pages(k_begin + p * S::KEYS, pages);
    if (p < tiles) load_tile(p, k_begin + p * S::KEYS, pages);
    else cp_async_commit();
  }
  lookup_pages(k_begin + (STAGES - 1) * S::KEYS, pages);
  for (int it = 0; it < tiles; ++it) {
    const int stage = it % STAGES;
    const int t0 = k_begin + it * S::KEYS;
    const int next = it + STAGES - 1;
    if (next < tiles) load_tile(next % STAGES, k_begin + next * S::KEYS, pages);
    else cp_async_commit();
    lookup_pages(k_begin + (next + 1) * S::KEYS, pages);  // consumed next iteration
    cp_async_wait<STAGES - 1>();
    __syncthreads();
    if (active) {
      const T* ks = kv + stage * 2 * S::TILE;
      const T* vs = ks + S::TILE;
      float s[S::NB][4];
#pragma unroll
      for (int nb = 0; nb < S::NB; ++nb) {
        s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = -INFINITY;
        if (nb < nb_w) {
          s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
          const T* krow = ks + (key_off + nb * 8 + gid) * S::STRIDE + tig * 2;
#pragma unroll
          for (int kstep = 0; kstep < S::KSTEPS; ++kstep) {
            const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + kstep * 16);
            const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + kstep * 16 + 8);
            Mma<T>::run(s[nb], qf[kstep], b0, b1);
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h = e >> 1;
            const int t = t0 + key_off + nb * 8 + tig * 2 + (e & 1);
            s[nb][e] = t < my_keys[h] ? s[nb][e] * scale_log2 : -INFINITY;
          }
        }
      }
      // Loops below skip the S blocks this warp does not own (nb_w is uniform per warp).
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nb = 0; nb < S::NB; ++nb) {
        if (nb >= nb_w) break;
        mx[0] = fmaxf(mx[0], fmaxf(s[nb][0], s[nb][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[nb][2], s[nb][3]));
      }
      float alpha[2], m_new[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        m_new[h] = fmaxf(m[h], mx[h]);
        // Nothing visible yet: keep the (empty) state; avoids exp2(-inf - -inf).
        alpha[h] = m_new[h] == -INFINITY ? 1.f : exp2f(m[h] - m_new[h]);
        l[h] *= alpha[h];
        m[h] = m_new[h];
      }
#pragma unroll
      for (int d = 0; d < S::DBLOCKS; ++d) {
        o[d][0] *= alpha[0]; o[d][1] *= alpha[0];
        o[d][2] *= alpha[1]; o[d][3] *= alpha[1];
      }
#pragma unroll
      for (int nb = 0; nb < S::NB; ++nb) {
        if (nb >= nb_w) break;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1;
          const float p = m_new[h] == -INFINITY ? 0.f : exp2f(s[nb][e] - m_new[h]);
          s[nb][e] = p;
          l[h] += p;
        }
      }
      // O += P V, 16 keys per k-step; V fragments through ldmatrix.trans.
      const int mi = lane >> 3, ri = lane & 7;
#pragma unroll
      for (int kk = 0; kk < S::NB / 2; ++kk) {
        if (2 * kk < nb_w) {
          uint32_t ph[4], pl[4];
          Mma<T>::split(s[2 * kk][0], s[2 * kk][1], ph[0], pl[0]);
          Mma<T>::split(s[2 * kk][2], s[2 * kk][3], ph[1], pl[1]);
          Mma<T>::split(s[2 * kk + 1][0], s[2 * kk + 1][1], ph[2], pl[2]);
          Mma<T>::split(s[2 * kk + 1][2], s[2 * kk + 1][3], ph[3], pl[3]);
          const T* vrow = vs + (key_off + kk * 16 + (mi & 1) * 8 + ri) * S::STRIDE + (mi >> 1) * 8;
#pragma unroll
          for (int j = 0; j < S::DBLOCKS / 2; ++j) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, vrow + j * 16);
            Mma<T>::run(o[2 * j], ph, b[0], b[1]);
            Mma<T>::run(o[2 * j], pl, b[0], b[1]);
            Mma<T>::run(o[2 * j + 1], ph, b[2], b[3]);
            Mma<T>::run(o[2 * j + 1], pl, b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // the next iteration reloads the stage computed in this one
  }
  cp_async_wait<0>();  // only empty groups remain; the merge below reuses the buffer

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }

  if (wsplit > 1) {
    // Warps that shared a row block's keys merge into the first of them.
    float* obuf = reinterpret_cast<float*>(kv);
    if (active && ws > 0) {
      float* mine = obuf + warp * 16 * D;
#pragma unroll
      for (int d = 0; d < S::DBLOCKS; ++d) {
        const int col = d * 8 + tig * 2;
        mine[gid * D + col] = o[d][0];
        mine[gid * D + col + 1] = o[d][1];
        mine[(gid + 8) * D + col] = o[d][2];
        mine[(gid + 8) * D + col + 1] = o[d][3];
      }
      if (tig == 0) {
        red_m[warp][gid] = m[0];
        red_l[warp][gid] = l[0];
        red_m[warp][gid + 8] = m[1];
        red_l[warp][gid + 8] = l[1];
      }
    }
    __syncthreads();
    if (active && ws == 0) {
      for (int w2 = warp + 1; w2 < warp + wsplit; ++w2) {
        const float* theirs = obuf + w2 * 16 * D;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = gid + 8 * h;
          const float mo = red_m[w2][r];
          const float mn = fmaxf(m[h], mo);
          const float a = mn == -INFINITY ? 0.f : exp2f(m[h] - mn);
          const float b = mn == -INFINITY ? 0.f : exp2f(mo - mn);
          l[h] = l[h] * a + red_l[w2][r] * b;
          m[h] = mn;
#pragma unroll
          for (int d = 0; d < S::DBLOCKS; ++d) {
            const int col = d * 8 + tig * 2;
            o[d][2 * h] = o[d][2 * h] * a + theirs[r * D + col] * b;
            o[d][2 * h + 1] = o[d][2 * h + 1] * a + theirs[r * D + col + 1] * b;
          }
        }
      }
    }
  }
  const bool writer = active && ws == 0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!writer || !valid[h]) continue;
    const size_t row_index = (size_t)(q0 + token[h]) * num_heads + head[h];
    if (num_splits == 1) {
      const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
      T* orow = out + row_index * D;
#pragma unroll
      for (int d = 0; d < S::DBLOCKS; ++d) {
        const int col = d * 8 + tig * 2;
        orow[col] = from_f32<T>(o[d][2 * h] * inv);
        orow[col + 1] = from_f32<T>(o[d][2 * h + 1] * inv);
      }
    } else {
      const size_t split_row = (size_t)blockIdx.y * num_tokens * num_heads + row_index;
#pragma unroll
      for (int d = 0; d < S::DBLOCKS; ++d) {
        const int col = d * 8 + tig * 2;
        *reinterpret_cast<float2*>(partial_acc + split_row * D + col) =
            make_float2(o[d][2 * h], o[d][2 * h + 1]);
      }
      if (tig == 0) {
        partial_ml[split_row * 2] = m[h];
        partial_ml[split_row * 2 + 1] = l[h];
      }
    }
  }
  if (num_splits > 1 &&
      last_split_to_finish(split_counters + blockIdx.z * gridDim.x + blockIdx.x, num_splits))
    merge_split_rows<T, D>(partial_acc, partial_ml, out, reinterpret_cast<float*>(kv), row0, rows_here,
                           group, kvh, q0, num_heads, num_tokens, num_splits);
}

}  // namespace

// Four CTAs per SM at D = 64 (128 registers, 3 x 18 KiB stages each); D = 128 needs ~170
// registers and gets three.
#define SDLM_ATTENTION_TC(T, NAME, D)                                                          \
  extern "C" __global__ void __launch_bounds__(THREADS, D <= 64 ? 4 : 3)                     \
      paged_attention_tc_##NAME##_d##D(                                                        \
      const T* q, const T* k_new, const T* v_new, const T* k_pages, const T* v_pages,          \
      const int* block_tables, const int* context_lens, const int* query_starts,               \
      const int* query_blocks, T* out, float* partial_acc, float* partial_ml,                  \
      int* split_counters, int num_tokens, int num_heads, int num_kv_heads, int page_size,     \
      int max_pages_per_seq, int keys_per_split, int num_splits, float scale) {                \
    paged_attention_tc_impl<T, D>(q, k_new, v_new, k_pages, v_pages, block_tables,             \
                                  context_lens, query_starts, query_blocks, out, partial_acc,  \
                                  partial_ml, split_counters, num_tokens, num_heads,           \
                                  num_kv_heads, page_size,                                     \
                                  max_pages_per_seq, keys_per_split, num_splits, scale);       \
  }

SDLM_ATTENTION_TC(__nv_bfloat16, bf16, 64)
SDLM_ATTENTION_TC(__nv_bfloat16, bf16, 128)
SDLM_ATTENTION_TC(__half, f16, 64)
SDLM_ATTENTION_TC(__half, f16, 128)
