// Paged attention for a ragged batch of query blocks (block-diffusion decoding).
//
// One idea: keys come from two places, and one mask rule covers every decoding mode. A sequence
// has `context_len` committed tokens in the paged cache, all visible, and `query_len` new tokens
// whose keys/values are passed alongside (the open diffusion block, an AR token, or a prefill
// chunk; they are not in the cache yet). New token i sees new token j iff
// j / query_block <= i / query_block: query_block = 1 is causal, query_block >= query_len is
// bidirectional, anything between is block-causal.
//
// Work split (flash-decoding style): a CTA takes one (sequence, kv head), a tile of query rows
// (rows = tokens x the query heads sharing that kv head, so K/V are read once per group), and one
// split of the keys. Keys stream through shared memory in tiles, widened to f32; each query row is
// held by LANES threads (32 dims each) with an online softmax in f32. When a tile has few rows
// (AR decoding), the idle threads take every ksplit-th key instead and the CTA merges them at the
// end. When a sequence has few CTAs for the machine, the host splits the keys and the last CTA
// of each row tile merges the partial results (split_merge.cuh).
#include "split_merge.cuh"

namespace {

constexpr int THREADS = 256;
constexpr int DIMS_PER_LANE = 32;
constexpr int SCORE_CHUNK = 8;  // keys scored between two online-softmax rescales (16 spills at 128 registers)
constexpr float LOG2E = 1.4426950408889634f;

template <int D>
struct Shape {
  static constexpr int LANES = D / DIMS_PER_LANE;           // threads per query row
  static constexpr int ROWS = THREADS / LANES;              // query rows per CTA
  static constexpr int KEYS = 4096 / D;                     // keys per tile: K+V in f32 = 32 KiB
  static constexpr int CHUNKS = DIMS_PER_LANE / 4;          // float4 chunks per lane
  static_assert(D % DIMS_PER_LANE == 0 && LANES <= 32, "head_dim must be a multiple of 32");
};

// Row-lane dims are interleaved in float4 chunks (lane l holds chunks l, l+LANES, ...) so that
// the LANES threads of a row read neighbouring banks of a shared K/V row.
template <int D>
__device__ __forceinline__ int chunk_col(int lane, int c) {
  return (lane + Shape<D>::LANES * c) * 4;
}

template <int LANES>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int o = 1; o < LANES; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, int D>
__device__ void paged_attention_impl(
    const T* __restrict__ q, const T* __restrict__ k_new, const T* __restrict__ v_new,
    const T* __restrict__ k_pages, const T* __restrict__ v_pages,
    const int* __restrict__ block_tables, const int* __restrict__ context_lens,
    const int* __restrict__ query_starts, const int* __restrict__ query_blocks,
    T* __restrict__ out, float* __restrict__ partial_acc, float* __restrict__ partial_ml,
    int* __restrict__ split_counters, int num_tokens, int num_heads, int num_kv_heads, int page_size, int max_pages_per_seq,
    int keys_per_split, int num_splits, float scale) {
  using S = Shape<D>;
  __shared__ __align__(16) float smem[2 * S::KEYS * D];
  __shared__ float red_m[S::ROWS];
  __shared__ float red_l[S::ROWS];
  float* Ks = smem;
  float* Vs = smem + S::KEYS * D;

  const int tid = threadIdx.x;
  const int seq = blockIdx.z / num_kv_heads;
  const int kvh = blockIdx.z % num_kv_heads;
  const int group = num_heads / num_kv_heads;
  const int q0 = query_starts[seq];
  const int query_len = query_starts[seq + 1] - q0;
  const int ctx = context_lens[seq];
  const int qblock = query_blocks[seq];
  const int row0 = blockIdx.x * S::ROWS;
  const int rows_here = min(S::ROWS, query_len * group - row0);
  if (rows_here <= 0) return;  // uniform over the CTA

  int ksplit = 1;
  while (ksplit * 2 * rows_here <= S::ROWS && ksplit * 2 <= S::KEYS) ksplit *= 2;

  const int lane = tid % S::LANES;
  const int rowslot = tid / S::LANES;
  const int r = rowslot % rows_here;
  const int g = rowslot / rows_here;
  const bool active = g < ksplit;
  const int token = (row0 + r) / group;  // index inside the sequence's query block
  const int head = kvh * group + (row0 + r) % group;

  // Keys this CTA covers: its split, trimmed to what the tile's last token can see.
  const int last_token = (row0 + rows_here - 1) / group;
  const int k_begin = blockIdx.y * keys_per_split;
  const int k_end = min(visible_keys(ctx, query_len, qblock, last_token), k_begin + keys_per_split);
  const int my_keys = min(k_end, visible_keys(ctx, query_len, qblock, token));
  const int page_shift = __ffs(page_size) - 1;  // the host checks page_size is a power of two

  float4 qv[S::CHUNKS], acc[S::CHUNKS];
  {
    const T* qrow = q + ((size_t)(q0 + token) * num_heads + head) * D;
    const float qs = scale * LOG2E;  // scores in log2 units, so exp2f below
#pragma unroll
    for (int c = 0; c < S::CHUNKS; ++c) {
      const int col = chunk_col<D>(lane, c);
      qv[c] = make_float4(to_f32(qrow[col]) * qs, to_f32(qrow[col + 1]) * qs,
                          to_f32(qrow[col + 2]) * qs, to_f32(qrow[col + 3]) * qs);
      acc[c] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
  float m = -INFINITY, l = 0.f;

  constexpr int VN = Vec16<T>::N;
  constexpr int VECS_PER_ROW = D / VN;
  for (int t0 = k_begin; t0 < k_end; t0 += S::KEYS) {
    __syncthreads();  // the previous tile is no longer read
    for (int v = tid; v < S::KEYS * VECS_PER_ROW; v += THREADS) {
      const int key = v / VECS_PER_ROW;
      const int col = (v % VECS_PER_ROW) * VN;
      const int t = t0 + key;
      float kf[VN], vf[VN];
      if (t < k_end) {
        size_t base;
        const T *ksrc, *vsrc;
        if (t < ctx) {
          const int page = block_tables[(size_t)seq * max_pages_per_seq + (t >> page_shift)];
          base = (((size_t)page * page_size + (t & (page_size - 1))) * num_kv_heads + kvh) * D;
          ksrc = k_pages;
          vsrc = v_pages;
        } else {
          base = ((size_t)(q0 + t - ctx) * num_kv_heads + kvh) * D;
          ksrc = k_new;
          vsrc = v_new;
        }
        load16_f32(ksrc + base + col, kf);
        load16_f32(vsrc + base + col, vf);
      } else {
#pragma unroll
        for (int i = 0; i < VN; ++i) kf[i] = vf[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < VN; i += 4) {
        *reinterpret_cast<float4*>(Ks + key * D + col + i) =
            make_float4(kf[i], kf[i + 1], kf[i + 2], kf[i + 3]);
        *reinterpret_cast<float4*>(Vs + key * D + col + i) =
            make_float4(vf[i], vf[i + 1], vf[i + 2], vf[i + 3]);
      }
    }
    __syncthreads();

    const int keys_tile = min(S::KEYS, k_end - t0);
    // Loop bounds are uniform over the CTA so that every lane reaches the shuffles.
    for (int j0 = 0; j0 * ksplit < keys_tile; j0 += SCORE_CHUNK) {
      float s[SCORE_CHUNK];
      float chunk_max = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < SCORE_CHUNK; ++jj) {
        const int kl = g + ksplit * (j0 + jj);
        const int kc = min(kl, S::KEYS - 1);
        const float4* krow = reinterpret_cast<const float4*>(Ks + kc * D);
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < S::CHUNKS; ++c) {
          const float4 kv = krow[lane + S::LANES * c];
          dot = fmaf(qv[c].x, kv.x, dot);
          dot = fmaf(qv[c].y, kv.y, dot);
          dot = fmaf(qv[c].z, kv.z, dot);
          dot = fmaf(qv[c].w, kv.w, dot);
        }
        dot = row_sum<S::LANES>(dot);
        const int t = t0 + kl;
        const bool visible = active && kl < keys_tile && t < my_keys;
        s[jj] = visible ? dot : -INFINITY;
        chunk_max = fmaxf(chunk_max, s[jj]);
      }
      const float m_new = fmaxf(m, chunk_max);
      if (m_new == -INFINITY) continue;  // nothing visible yet for this row
      const float alpha = exp2f(m - m_new);
      l *= alpha;
#pragma unroll
      for (int c = 0; c < S::CHUNKS; ++c) {
        acc[c].x *= alpha; acc[c].y *= alpha; acc[c].z *= alpha; acc[c].w *= alpha;
      }
#pragma unroll
      for (int jj = 0; jj < SCORE_CHUNK; ++jj) {
        const float p = exp2f(s[jj] - m_new);
        l += p;
        const int kc = min(g + ksplit * (j0 + jj), S::KEYS - 1);
        const float4* vrow = reinterpret_cast<const float4*>(Vs + kc * D);
#pragma unroll
        for (int c = 0; c < S::CHUNKS; ++c) {
          const float4 vv = vrow[lane + S::LANES * c];
          acc[c].x = fmaf(p, vv.x, acc[c].x);
          acc[c].y = fmaf(p, vv.y, acc[c].y);
          acc[c].z = fmaf(p, vv.z, acc[c].z);
          acc[c].w = fmaf(p, vv.w, acc[c].w);
        }
      }
      m = m_new;
    }
  }

  if (ksplit > 1) {
    // Merge the key groups of each row through shared memory (the K/V tile is free now).
    __syncthreads();
    if (active) {
      if (lane == 0) {
        red_m[rowslot] = m;
        red_l[rowslot] = l;
      }
#pragma unroll
      for (int c = 0; c < S::CHUNKS; ++c)
        *reinterpret_cast<float4*>(smem + rowslot * D + chunk_col<D>(lane, c)) = acc[c];
    }
    __syncthreads();
    if (active && g == 0) {
      for (int gg = 1; gg < ksplit; ++gg) {
        const int other = r + gg * rows_here;
        const float mo = red_m[other];
        const float m_new = fmaxf(m, mo);
        if (m_new == -INFINITY) continue;
        const float a = exp2f(m - m_new), b = exp2f(mo - m_new);
        l = l * a + red_l[other] * b;
#pragma unroll
        for (int c = 0; c < S::CHUNKS; ++c) {
          const float4 o = *reinterpret_cast<const float4*>(smem + other * D + chunk_col<D>(lane, c));
          acc[c].x = acc[c].x * a + o.x * b;
          acc[c].y = acc[c].y * a + o.y * b;
          acc[c].z = acc[c].z * a + o.z * b;
          acc[c].w = acc[c].w * a + o.w * b;
        }
        m = m_new;
      }
    }
  }
  const size_t row_index = (size_t)(q0 + token) * num_heads + head;
  const bool writer = active && g == 0;
  if (writer && num_splits == 1) {
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* orow = out + row_index * D;
#pragma unroll
    for (int c = 0; c < S::CHUNKS; ++c) {
      const int col = chunk_col<D>(lane, c);
      orow[col] = from_f32<T>(acc[c].x * inv);
      orow[col + 1] = from_f32<T>(acc[c].y * inv);
      orow[col + 2] = from_f32<T>(acc[c].z * inv);
      orow[col + 3] = from_f32<T>(acc[c].w * inv);
    }
  } else if (writer) {
    const size_t split_row = (size_t)blockIdx.y * num_tokens * num_heads + row_index;
#pragma unroll
    for (int c = 0; c < S::CHUNKS; ++c)
      *reinterpret_cast<float4*>(partial_acc + split_row * D + chunk_col<D>(lane, c)) = acc[c];
    if (lane == 0) {
      partial_ml[split_row * 2] = m;
      partial_ml[split_row * 2 + 1] = l;
    }
  }
  if (num_splits > 1 &&
      last_split_to_finish(split_counters + blockIdx.z * gridDim.x + blockIdx.x, num_splits))
    merge_split_rows<T, D>(partial_acc, partial_ml, out, smem, row0, rows_here,
                           group, kvh, q0, num_heads, num_tokens, num_splits);
}

}  // namespace

#define SDLM_ATTENTION(T, NAME, D)                                                            \
  extern "C" __global__ void __launch_bounds__(THREADS, 2) paged_attention_##NAME##_d##D(    \
      const T* q, const T* k_new, const T* v_new, const T* k_pages, const T* v_pages,         \
      const int* block_tables, const int* context_lens, const int* query_starts,              \
      const int* query_blocks, T* out, float* partial_acc, float* partial_ml,                 \
      int* split_counters, int num_tokens, int num_heads, int num_kv_heads, int page_size,    \
      int max_pages_per_seq, int keys_per_split, int num_splits, float scale) {               \
    paged_attention_impl<T, D>(q, k_new, v_new, k_pages, v_pages, block_tables, context_lens, \
                               query_starts, query_blocks, out, partial_acc, partial_ml,      \
                               split_counters, num_tokens, num_heads, num_kv_heads,           \
                               page_size, max_pages_per_seq, keys_per_split, num_splits,      \
                               scale);                                                        \
  }

#define SDLM_ATTENTION_ALL_D(T, NAME) \
  SDLM_ATTENTION(T, NAME, 64)         \
  SDLM_ATTENTION(T, NAME, 128)

SDLM_FOR_EACH_DTYPE(SDLM_ATTENTION_ALL_D)
