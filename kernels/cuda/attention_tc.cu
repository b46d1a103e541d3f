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
#include "tc_common.cuh"

namespace {

using tc::LOG2E;
using tc::Mma;
using tc::STAGES;

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int ROWS = WARPS * 16;  // query rows per CTA

template <int D>
struct Shape {
  static constexpr int KEYS = D <= 64 ? 64 : 32;  // keys per tile: 16 KiB of bf16 K+V
  static constexpr int KSTEPS = D / 16;
  static constexpr int DBLOCKS = D / 8;
  static constexpr int NB = KEYS / 8;           // 8-key blocks of S per tile
  static constexpr int MAX_WSPLIT = KEYS / 16;  // a warp needs >= 16 keys (one P V k-step)
};

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
  static_assert(STAGES * 2 * S::KEYS * (D + 8) * sizeof(T) >= WARPS * 16 * D * sizeof(float), "merge buffer");

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

  using Tiles = tc::PagedTiles<T, D, S::KEYS, THREADS>;
  const Tiles tiles_in{kv, k_new, v_new, k_pages, v_pages,
                       block_tables + (size_t)seq * max_pages_per_seq,
                       ctx, k_end, q0, kvh, num_kv_heads, page_size, page_shift,
                       (tid % Tiles::VECS_PER_KEY) * 8, tid / Tiles::VECS_PER_KEY};

  float o[S::DBLOCKS][4];
#pragma unroll
  for (int d = 0; d < S::DBLOCKS; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = scale * LOG2E;

  int pages[Tiles::KEYS_PER_THREAD];
  tiles_in.start(k_begin, tiles, pages);
  for (int it = 0; it < tiles; ++it) {
    const T* ks = tiles_in.next(it, k_begin, tiles, pages);
    const T* vs = ks + Tiles::TILE;
    const int t0 = k_begin + it * S::KEYS;
    if (active) {
      float s[S::NB][4];
#pragma unroll
      for (int nb = 0; nb < S::NB; ++nb) {
        s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = -INFINITY;
        if (nb < nb_w) {
          s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
          const T* krow = ks + (key_off + nb * 8 + gid) * Tiles::STRIDE + tig * 2;
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
          const T* vrow = vs + (key_off + kk * 16 + (mi & 1) * 8 + ri) * Tiles::STRIDE + (mi >> 1) * 8;
#pragma unroll
          for (int j = 0; j < S::DBLOCKS / 2; ++j) {
            uint32_t b[4];
            tc::ldmatrix_x4_trans(b, vrow + j * 16);
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
  tc::cp_async_wait<0>();  // the merge below reuses the buffer

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
