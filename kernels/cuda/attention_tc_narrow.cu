// Paged attention on tensor cores for few query rows per kv head (AR decoding with grouped
// heads: 7 rows for Qwen2.5-0.5B's 14/2 heads, 2 for Qwen3's 16/8): the same function, arguments
// and partial-result layout as attention_tc.cu.
//
// attention_tc.cu puts query rows on mma's 16-row side, so 7 rows fill 7/16 of every product and
// of the softmax lanes. Here keys fill the 16-row side and queries the 8-column side, as in
// S^T = K Q^T and O^T = V^T P^T: half the mma work and half the exps per key, for up to 8 rows.
// P^T comes out of the first product in the accumulator layout, and the second needs it as the
// B operand, which is its transpose per 8x8 block: movmatrix does that in registers.
// Each of the 4 warps takes 16 keys of every 64-key tile; they merge through shared memory at
// the end. As in attention_tc.cu, P is split into hi + lo parts for the second product.
//
// With HG = 2 a CTA serves two neighbouring kv heads, whose rows of a key lie side by side in a
// page: it streams 2 x D contiguous elements a key (all of a slot for Qwen2.5's two kv heads)
// where two CTAs would each read every other D. Two warps take each head, 16 keys apiece of a
// 32-key tile.
#include "tc_common.cuh"

namespace {

using tc::Mma;

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int ROWS = 8;  // query rows per kv head and CTA: mma's n

template <typename T, int D, int HG>
__device__ void paged_attention_tc_narrow_impl(
    const T* __restrict__ q, const T* __restrict__ k_new, const T* __restrict__ v_new,
    const T* __restrict__ k_pages, const T* __restrict__ v_pages,
    const int* __restrict__ block_tables, const int* __restrict__ context_lens,
    const int* __restrict__ query_starts, const int* __restrict__ query_blocks,
    T* __restrict__ out, float* __restrict__ partial_acc, float* __restrict__ partial_ml,
    int* __restrict__ split_counters, int num_tokens, int num_heads, int num_kv_heads, int page_size,
    int max_pages_per_seq, int keys_per_split, int num_splits, float scale) {
  constexpr int KSTEPS = D / 16;  // d steps of S^T = K Q^T
  constexpr int MBLOCKS = D / 16;  // 16-row blocks of O^T
  constexpr int KB = WARPS / HG;   // warps (16-key blocks of a tile) per kv head
  constexpr int KEYS = KB * 16;    // keys per tile
  // The HG heads' rows of a key are one row of HG * D elements: the pipeline reads the cache as
  // if it had num_kv_heads / HG heads of that width.
  using Tiles = tc::PagedTiles<T, HG * D, KEYS, THREADS>;
  // [stage][K, V][KEYS x STRIDE] (dynamic); reused as the warps' f32 outputs at the end.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* kv = reinterpret_cast<T*>(smem_raw);
  __shared__ float red_m[WARPS][ROWS];
  __shared__ float red_l[WARPS][ROWS];
  __shared__ float weight[HG][ROWS][KB];
  static_assert(tc::STAGES * 2 * Tiles::TILE * sizeof(T) >= WARPS * ROWS * D * sizeof(float),
                "merge buffer");

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gid = lane >> 2, tig = lane & 3;
  const int head_groups = num_kv_heads / HG;  // the host checks HG divides num_kv_heads
  const int seq = blockIdx.z / head_groups;
  const int hgroup = blockIdx.z % head_groups;
  const int wh = warp / KB;                 // this warp's head within the CTA's HG
  const int kvh = hgroup * HG + wh;         // this warp's kv head
  const int group = num_heads / num_kv_heads;
  const int q0 = query_starts[seq];
  const int query_len = query_starts[seq + 1] - q0;
  const int ctx = context_lens[seq];
  const int qblock = query_blocks[seq];
  const int row0 = blockIdx.x * ROWS;
  const int rows_here = min(ROWS, query_len * group - row0);
  if (rows_here <= 0) return;
  // Row r of kv head h is query head h * group + (row0 + r) % group of token (row0 + r) / group.
  auto token_of = [&](int r) { return (row0 + r) / group; };
  auto out_row = [&](int h, int r) {
    return (size_t)(q0 + token_of(r)) * num_heads + h * group + (row0 + r) % group;
  };

  const int last_token = token_of(rows_here - 1);
  const int k_begin = blockIdx.y * keys_per_split;
  const int k_end = min(visible_keys(ctx, query_len, qblock, last_token), k_begin + keys_per_split);
  const int tiles = k_end > k_begin ? (k_end - k_begin + KEYS - 1) / KEYS : 0;
  const int page_shift = __ffs(page_size) - 1;  // the host checks page_size is a power of two

  // This thread's accumulator columns are rows 2 tig and 2 tig + 1; each sees a prefix of the
  // keys (none for padding rows), so one compare masks.
  int my_keys[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int r = 2 * tig + j;
    my_keys[j] = r < rows_here ? min(k_end, visible_keys(ctx, query_len, qblock, token_of(r))) : 0;
  }

  // Q^T as mma B fragments, loaded once: this thread's column is row gid, its k the d indices
  // 2 tig, 2 tig + 1 (b0) and those + 8 (b1) of each 16-wide d step.
  uint32_t qb[KSTEPS][2];
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const T* src = q + out_row(kvh, gid) * D + ks * 16 + tig * 2 + 8 * h;
      qb[ks][h] = gid < rows_here ? *reinterpret_cast<const uint32_t*>(src) : 0u;
    }
  }

  const Tiles tiles_in{kv, k_new, v_new, k_pages, v_pages,
                       block_tables + (size_t)seq * max_pages_per_seq,
                       ctx, k_end, q0, hgroup, head_groups, page_size, page_shift,
                       (tid % Tiles::VECS_PER_KEY) * 8, tid / Tiles::VECS_PER_KEY};

  // O^T fragments: o[mb] holds d rows mb * 16 + gid (0, 1) and + 8 (2, 3), columns 2 tig (0, 2)
  // and 2 tig + 1 (1, 3).
  float o[MBLOCKS][4];
#pragma unroll
  for (int mb = 0; mb < MBLOCKS; ++mb) o[mb][0] = o[mb][1] = o[mb][2] = o[mb][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float scale_log2 = scale * tc::LOG2E;
  const int key_off = (warp % KB) * 16;
  const int col_off = wh * D;  // this warp's head within a key's row
  // ldmatrix addresses: lane l gives row l % 8 of 8x8 matrix l / 8.
  const int mi = lane >> 3, ri = lane & 7;

  int pages[Tiles::KEYS_PER_THREAD];
  tiles_in.start(k_begin, tiles, pages);
  for (int it = 0; it < tiles; ++it) {
    const T* ks = tiles_in.next(it, k_begin, tiles, pages);
    const T* vs = ks + Tiles::TILE;
    const int t0 = k_begin + it * KEYS;
    // S^T (16 keys x 8 rows): s[0], s[1] key gid, rows 2 tig, 2 tig + 1; s[2], s[3] key gid + 8.
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    // K as A fragments: matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (0-7, 8-15), (8-15, 8-15).
    const T* krow = ks + (key_off + (mi & 1) * 8 + ri) * Tiles::STRIDE + col_off + (mi >> 1) * 8;
#pragma unroll
    for (int kstep = 0; kstep < KSTEPS; ++kstep) {
      uint32_t a[4];
      tc::ldmatrix_x4(a, krow + kstep * 16);
      Mma<T>::run(s, a, qb[kstep][0], qb[kstep][1]);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int t = t0 + key_off + gid + 8 * (e >> 1);
      s[e] = t < my_keys[e & 1] ? s[e] * scale_log2 : -INFINITY;
    }
    // Per row (column of S^T): max over the 16 keys, held by the 8 lanes that share tig.
    float alpha[2], m_new[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float mx = fmaxf(s[j], s[2 + j]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      m_new[j] = fmaxf(m[j], mx);
      // Nothing visible yet: keep the (empty) state; avoids exp2(-inf - -inf).
      alpha[j] = m_new[j] == -INFINITY ? 1.f : exp2f(m[j] - m_new[j]);
      l[j] *= alpha[j];
      m[j] = m_new[j];
    }
#pragma unroll
    for (int mb = 0; mb < MBLOCKS; ++mb) {
      o[mb][0] *= alpha[0]; o[mb][1] *= alpha[1];
      o[mb][2] *= alpha[0]; o[mb][3] *= alpha[1];
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = m_new[e & 1] == -INFINITY ? 0.f : exp2f(s[e] - m_new[e & 1]);
      s[e] = p;
      l[e & 1] += p;
    }
    // P^T as B fragments (k = keys, n = rows): the transposes of its two 8x8 accumulator blocks.
    uint32_t hi[2], lo[2];
    Mma<T>::split(s[0], s[1], hi[0], lo[0]);
    Mma<T>::split(s[2], s[3], hi[1], lo[1]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      hi[h] = tc::movmatrix_trans(hi[h]);
      lo[h] = tc::movmatrix_trans(lo[h]);
    }
    // V^T as A fragments (m = d, k = keys) through ldmatrix.trans: matrices (keys 0-7, d 0-7),
    // (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15) of the stored V.
    const T* vrow = vs + (key_off + (mi >> 1) * 8 + ri) * Tiles::STRIDE + col_off + (mi & 1) * 8;
#pragma unroll
    for (int mb = 0; mb < MBLOCKS; ++mb) {
      uint32_t a[4];
      tc::ldmatrix_x4_trans(a, vrow + mb * 16);
      Mma<T>::run(o[mb], a, hi[0], hi[1]);
      Mma<T>::run(o[mb], a, lo[0], lo[1]);
    }
    __syncthreads();  // the next iteration reloads the stage computed in this one
  }
  tc::cp_async_wait<0>();  // the merge below reuses the buffer

  // Each row's sum over this warp's keys: the 8 lanes that share tig.
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    l[j] += __shfl_xor_sync(0xffffffffu, l[j], 4);
    l[j] += __shfl_xor_sync(0xffffffffu, l[j], 8);
    l[j] += __shfl_xor_sync(0xffffffffu, l[j], 16);
  }
  // The warps' partial rows, [warp][row][d], merged by all threads below.
  float* obuf = reinterpret_cast<float*>(kv);
  float* mine = obuf + warp * ROWS * D;
#pragma unroll
  for (int mb = 0; mb < MBLOCKS; ++mb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = 2 * tig + (e & 1), d = mb * 16 + gid + 8 * (e >> 1);
      mine[r * D + d] = o[mb][e];
    }
  }
  if (gid == 0) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      red_m[warp][2 * tig + j] = m[j];
      red_l[warp][2 * tig + j] = l[j];
    }
  }
  __syncthreads();
  // Per head and row: each of its warps' weight, exp2(m_w - m); normalised by the sum when this
  // CTA writes the output, else written with (m, sum) as this split's partial.
  const size_t split_row0 = (size_t)blockIdx.y * num_tokens * num_heads;
  if (tid < HG * rows_here) {
    const int h = tid / rows_here, r = tid % rows_here;
    const float* wm = &red_m[h * KB][0];
    const float* wl = &red_l[h * KB][0];
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < KB; ++w) mx = fmaxf(mx, wm[w * ROWS + r]);
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < KB; ++w) {
      weight[h][r][w] = mx == -INFINITY ? 0.f : exp2f(wm[w * ROWS + r] - mx);
      sum += wl[w * ROWS + r] * weight[h][r][w];
    }
    if (num_splits == 1) {
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
      for (int w = 0; w < KB; ++w) weight[h][r][w] *= inv;
    } else {
      const size_t row = split_row0 + out_row(hgroup * HG + h, r);
      partial_ml[row * 2] = mx;
      partial_ml[row * 2 + 1] = sum;
    }
  }
  __syncthreads();
  for (int idx = tid; idx < HG * rows_here * D; idx += THREADS) {
    const int h = idx / (rows_here * D), r = idx / D % rows_here, d = idx % D;
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < KB; ++w) acc += weight[h][r][w] * obuf[((h * KB + w) * ROWS + r) * D + d];
    const size_t row = out_row(hgroup * HG + h, r);
    if (num_splits == 1) out[row * D + d] = from_f32<T>(acc);
    else partial_acc[(split_row0 + row) * D + d] = acc;
  }
  if (num_splits > 1 &&
      last_split_to_finish(split_counters + blockIdx.z * gridDim.x + blockIdx.x, num_splits)) {
    for (int h = 0; h < HG; ++h) {
      if (h > 0) __syncthreads();  // the last merge's reads of its scratch are done
      merge_split_rows<T, D>(partial_acc, partial_ml, out, reinterpret_cast<float*>(kv), row0,
                             rows_here, group, hgroup * HG + h, q0, num_heads, num_tokens,
                             num_splits);
    }
  }
}

}  // namespace

// Three stages of 64-key (HG = 1) or 32-key (HG = 2) tiles: 52-54 KiB of shared memory at
// D = 64 (4 CTAs per SM), 100-102 KiB at D = 128.
#define SDLM_ATTENTION_TC_NARROW(T, NAME, D, HG, PREFIX)                                        \
  extern "C" __global__ void __launch_bounds__(THREADS)                                        \
      PREFIX##_##NAME##_d##D(                                                                  \
      const T* q, const T* k_new, const T* v_new, const T* k_pages, const T* v_pages,          \
      const int* block_tables, const int* context_lens, const int* query_starts,               \
      const int* query_blocks, T* out, float* partial_acc, float* partial_ml,                  \
      int* split_counters, int num_tokens, int num_heads, int num_kv_heads, int page_size,     \
      int max_pages_per_seq, int keys_per_split, int num_splits, float scale) {                \
    paged_attention_tc_narrow_impl<T, D, HG>(q, k_new, v_new, k_pages, v_pages, block_tables,  \
                                             context_lens, query_starts, query_blocks, out,    \
                                             partial_acc, partial_ml, split_counters,          \
                                             num_tokens, num_heads, num_kv_heads, page_size,   \
                                             max_pages_per_seq, keys_per_split, num_splits,    \
                                             scale);                                           \
  }

SDLM_ATTENTION_TC_NARROW(__nv_bfloat16, bf16, 64, 1, paged_attention_tcn)
SDLM_ATTENTION_TC_NARROW(__nv_bfloat16, bf16, 128, 1, paged_attention_tcn)
SDLM_ATTENTION_TC_NARROW(__half, f16, 64, 1, paged_attention_tcn)
SDLM_ATTENTION_TC_NARROW(__half, f16, 128, 1, paged_attention_tcn)
SDLM_ATTENTION_TC_NARROW(__nv_bfloat16, bf16, 64, 2, paged_attention_tcn2)
SDLM_ATTENTION_TC_NARROW(__nv_bfloat16, bf16, 128, 2, paged_attention_tcn2)
SDLM_ATTENTION_TC_NARROW(__half, f16, 64, 2, paged_attention_tcn2)
SDLM_ATTENTION_TC_NARROW(__half, f16, 128, 2, paged_attention_tcn2)
