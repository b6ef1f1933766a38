// CUDA embedding (contract in kernels/embedding.h).
//
// Forward: a grid-stride copy, one thread per output element.
// Backward without float atomics, in the order kernels/embedding.h fixes. First the ids are counted
// (integer atomics: exact), and the hot rows (embedding_hot_count(N) positions or more) given slots.
// The other rows: block b owns the ids [b·kIdsPerBlock, (b + 1)·kIdsPerBlock). It walks all positions in
// chunks of kChunk (4 ids a thread, one 16-byte load where aligned, the next chunk's loaded while this one
// is added); in each chunk the positions whose id it owns (and is not hot) are compacted, in position
// order (warp ballots and a prefix over the warps), into shared memory, and then added. The adding is
// split into tasks: (class, column pack), class = (id − lo) mod kClasses, a pack = 32 lanes × kCols
// columns (8 in 16-byte accesses where C allows, else 1); task t goes to warp t mod kWarps, so a row's
// packs run on different warps. A task walks its class's entries in list order kBatch at a time: the
// gradient rows of the batch and the dweight rows they go to are loaded together, then added in order, a
// row held in registers while consecutive entries add to it. So every such dweight[v, c] is written by one
// lane of one warp of one block, with its contributions in increasing position.
// A hot row: block (h, s) sums hot row h's positions in slice s from 0 (the same compaction over the
// slice, then each warp a column pack of 4 columns a lane, kHotBatch rows of dout in flight) into its slot
// of the scratch, and one block per hot row adds the slices' sums to dweight in slice order.
// So the result is bit-identical on every launch, and the CPU's.
// (Until the sixteenth session every row went the first way, with chunks of 256 positions and the whole
// block adding one contribution after another, a thread per column in 2-byte loads: a round trip to
// memory per contribution, 44% of an H100's bandwidth at GPT-2's 8192 × 768 with uniform ids — and
// text is not uniform: English puts ~30% of its GPT-2 tokens in one block's 128 ids, " the" alone ~7%,
// thousands of contributions a step in one sequence.)
#include "kernels/cuda/check.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/scratch.h"
#include "kernels/cuda/storage.h"
#include "kernels/embedding.h"

namespace kraken::kernels {
namespace {

using cuda_detail::aligned16;
using cuda_detail::as_bf16;
using cuda_detail::blocks_for;
using cuda_detail::load;
using cuda_detail::load8;
using cuda_detail::store8;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// The backward's decomposition (above).
constexpr int kIdsPerThread = 4;
constexpr int kChunk = kThreads * kIdsPerThread;  // positions listed per pass
constexpr int kIdsPerBlock = 128;                 // 50257 GPT-2 ids -> 393 blocks: 3 an SM, one wave on an H100
constexpr int kClasses = 8;
constexpr int kBatch = 2;                         // a task's entries whose loads are in flight together
constexpr int kHotBatch = 8;                      // the same for a hot row's slice sum
constexpr int kHotSlices = static_cast<int>(kEmbeddingHotSlices);

// A chunk's positions base + 4·thread + j < end whose id `keep` takes, compacted in position order into
// list_pos (warp ballots and a prefix over the warps); returns how many, the same for every thread. The
// ids come in `id` (loaded by the caller). Two barriers: the list is complete when it returns, and the
// caller must pass a barrier before calling it again.
template <typename Keep>
__device__ __forceinline__ int compact_chunk(const int32_t (&id)[kIdsPerThread], int64_t base, Keep keep,
                                             int64_t* list_pos, int32_t* list_id, int* warp_count) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned int below = (1u << lane) - 1u;  // the lanes before mine
  bool mine[kIdsPerThread];
  int before = 0, in_warp = 0;  // my warp's matches in lanes before mine, and in all its lanes
#pragma unroll
  for (int j = 0; j < kIdsPerThread; ++j) {
    mine[j] = keep(id[j]);
    const unsigned int ballot = __ballot_sync(0xffffffffu, mine[j]);
    before += __popc(ballot & below);
    in_warp += __popc(ballot);
  }
  if (lane == 0) warp_count[warp] = in_warp;
  __syncthreads();
  int offset = before, total = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) offset += warp_count[w];
    total += warp_count[w];
  }
  const int64_t p0 = base + static_cast<int64_t>(kIdsPerThread) * threadIdx.x;
#pragma unroll
  for (int j = 0; j < kIdsPerThread; ++j)  // positions p0 + j: in order after the lanes and warps before
    if (mine[j]) {
      list_pos[offset] = p0 + j;
      if (list_id) list_id[offset] = id[j];
      ++offset;
    }
  __syncthreads();
  return total;
}

// The ids of positions base + 4·thread + j, −1 at or past `end` (one 16-byte load where aligned).
__device__ __forceinline__ void load_chunk_ids(const int32_t* ids, int64_t base, int64_t end,
                                               int32_t (&id)[kIdsPerThread]) {
  const int64_t p0 = base + static_cast<int64_t>(kIdsPerThread) * threadIdx.x;
  if (reinterpret_cast<uintptr_t>(ids + p0) % 16 == 0 && p0 + kIdsPerThread <= end) {
    const int4 q = *reinterpret_cast<const int4*>(ids + p0);
    id[0] = q.x, id[1] = q.y, id[2] = q.z, id[3] = q.w;
  } else {
#pragma unroll
    for (int j = 0; j < kIdsPerThread; ++j) id[j] = p0 + j < end ? ids[p0 + j] : -1;
  }
}

__global__ void embedding_forward_kernel(float* out, const float* weight, const int32_t* ids, int64_t N, int64_t C) {
  const int64_t total = N * C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t n = i / C, c = i - n * C;
    out[i] = weight[static_cast<int64_t>(ids[n]) * C + c];
  }
}

// The token and position embedding's forward (kernels/embedding.h): 8 channels a thread, the table rows
// in 16-byte f32 loads, one 16-byte bf16 store. (The three ops it replaces — the f32 lookup above, a
// broadcast add and a cast — took 0.64 ms of GPT-2's B = 64 step on an H100, over an f32 (N, C) three
// times.)
__global__ void embedding_positions_bf16x8_kernel(__nv_bfloat16* out, const float* weight, const float* positions,
                                                  const int32_t* ids, int64_t N, int64_t T, int64_t packs_per_row) {
  const int64_t C = 8 * packs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N * packs_per_row;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t n = i / packs_per_row, c0 = 8 * (i - n * packs_per_row);
    float w[8], p[8];
    load8(weight + static_cast<int64_t>(ids[n]) * C + c0, w);
    load8(positions + (n % T) * C + c0, p);
#pragma unroll
    for (int k = 0; k < 8; ++k) w[k] = w[k] + p[k];
    store8(out + n * C + c0, w);
  }
}

// kCols consecutive elements widened to f32 and f32 stored back: kCols = 8 through load8/store8 (16-byte
// accesses), kCols = 4 in one access (16 bytes of f32, 8 of bf16), the caller having checked the alignment;
// kCols = 1 through load/store.
template <int kCols>
__device__ __forceinline__ void load_cols(const float* p, float (&v)[kCols]) {
  if constexpr (kCols == 8) {
    load8(p, v);
  } else if constexpr (kCols == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    v[0] = *p;
  }
}
template <int kCols>
__device__ __forceinline__ void load_cols(const __nv_bfloat16* p, float (&v)[kCols]) {
  if constexpr (kCols == 8) {
    load8(p, v);
  } else if constexpr (kCols == 4) {  // a bf16 is the high half of its f32: widening is a shift
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    v[0] = __uint_as_float(q.x << 16), v[1] = __uint_as_float(q.x & 0xffff0000u);
    v[2] = __uint_as_float(q.y << 16), v[3] = __uint_as_float(q.y & 0xffff0000u);
  } else {
    v[0] = load(p);
  }
}
template <int kCols>
__device__ __forceinline__ void store_cols(float* p, const float (&v)[kCols]) {
  if constexpr (kCols == 8) store8(p, v);
  else if constexpr (kCols == 4) *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  else *p = v[0];
}

// counts[v] = 0, and the hot rows' count (a kernel rather than a memset: the emulation runs kernels).
__global__ void embedding_zero_counts_kernel(int32_t* counts, int32_t* hot_total, int64_t V) {
  const int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (v < V) counts[v] = 0;
  if (v == 0) *hot_total = 0;
}

__global__ void embedding_count_ids_kernel(int32_t* counts, const int32_t* ids, int64_t N) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n < N) atomicAdd(&counts[ids[n]], 1);
}

// hot_slot[v]: row v's slot among the hot rows, else −1; hot_rows[slot] = v. The slots come in whatever
// order the atomics take (a slot only says where the row's slice sums live: no sum depends on it).
__global__ void embedding_hot_slots_kernel(int32_t* hot_slot, int32_t* hot_rows, int32_t* hot_total,
                                           const int32_t* counts, int64_t V, int64_t hot_count) {
  const int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (v >= V) return;
  int32_t slot = -1;
  if (counts[v] >= hot_count) {
    slot = atomicAdd(hot_total, 1);
    hot_rows[slot] = static_cast<int32_t>(v);
  }
  hot_slot[v] = slot;
}

// T: dout's storage (f32, or bf16 widened exactly as it is added: the same sums either way). hot_slot:
// the rows left to the hot kernels (≥ 0), or null where no row can be hot.
template <typename T, int kCols>
__global__ void __launch_bounds__(kThreads, 3)
    embedding_backward_kernel(float* dweight, const T* dout, const int32_t* ids, const int32_t* hot_slot, int64_t N,
                              int64_t V, int64_t C) {
  __shared__ int64_t list_pos[kChunk];
  __shared__ int32_t list_id[kChunk];
  __shared__ int warp_count[kWarps];
  __shared__ bool hot[kIdsPerBlock];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kIdsPerBlock, hi = min(V, lo + kIdsPerBlock);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < kIdsPerBlock; i += kThreads) hot[i] = hot_slot && lo + i < hi && hot_slot[lo + i] >= 0;
  __syncthreads();
  const int64_t packs = (C + 32 * kCols - 1) / (32 * kCols), tasks = kClasses * packs;
  auto keep = [&](int32_t id) { return id >= lo && id < hi && !hot[id - lo]; };
  int32_t id[kIdsPerThread];
  load_chunk_ids(ids, 0, N, id);
  for (int64_t base = 0; base < N; base += kChunk) {  // the same trip count for every thread
    const int total = compact_chunk(id, base, keep, list_pos, list_id, warp_count);
    load_chunk_ids(ids, base + kChunk, N, id);  // the next chunk's, in flight while this one is added
    for (int64_t t = warp; total > 0 && t < tasks; t += kWarps) {
      const int cls = static_cast<int>(t / packs);
      const int64_t c = (t % packs) * (32 * kCols) + static_cast<int64_t>(lane) * kCols;  // my first column
      const bool active = c < C;  // (kCols > 1 only where C is a multiple of kCols)
      auto next = [&](int i) {  // the class's first entry at or after i (the same for the whole warp)
        while (i < total && (list_id[i] - lo) % kClasses != cls) ++i;
        return i;
      };
      int64_t row = -1;  // the row d holds
      float d[kCols] = {};
      for (int i = next(0); i < total;) {
        int entry[kBatch], n = 0;
        int64_t rows[kBatch];
#pragma unroll
        for (int k = 0; k < kBatch; ++k)
          if (i < total) entry[k] = i, rows[k] = list_id[i], n = k + 1, i = next(i + 1);
        float g[kBatch][kCols], dn[kBatch][kCols];
#pragma unroll
        for (int k = 0; k < kBatch; ++k)
          if (k < n && active) {
            load_cols<kCols>(dout + list_pos[entry[k]] * C + c, g[k]);
            load_cols<kCols>(dweight + rows[k] * C + c, dn[k]);
          }
        const int64_t held = row;  // stored below if another row comes: its dn loads above are stale
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
          if (k >= n) break;
          if (rows[k] != row) {
            if (row >= 0 && active) store_cols<kCols>(dweight + row * C + c, d);
            bool stale = rows[k] == held;
            for (int j = 0; j < k; ++j) stale = stale || rows[j] == rows[k];
            if (active) {
              if (stale) {
                load_cols<kCols>(dweight + rows[k] * C + c, d);  // after my store above
              } else {
#pragma unroll
                for (int q = 0; q < kCols; ++q) d[q] = dn[k][q];
              }
            }
            row = rows[k];
          }
          if (active)
#pragma unroll
            for (int q = 0; q < kCols; ++q) d[q] += g[k][q];
        }
      }
      if (row >= 0 && active) store_cols<kCols>(dweight + row * C + c, d);
    }
    __syncthreads();  // the lists are rewritten by the next chunk
  }
}

// Block (h, s): hot row h's sum over slice s of the positions, [s·L, (s + 1)·L), from 0 in position order,
// into sums[(h·kHotSlices + s)·C …]. Blocks past the hot rows' count return at once.
template <typename T, int kCols>
__global__ void __launch_bounds__(kThreads)
    embedding_hot_slices_kernel(float* sums, const T* dout, const int32_t* ids, const int32_t* hot_rows,
                                const int32_t* hot_total, int64_t N, int64_t C, int64_t L) {
  __shared__ int64_t list_pos[kChunk];
  __shared__ int warp_count[kWarps];
  const int h = blockIdx.x, s = blockIdx.y;
  if (h >= *hot_total) return;  // (the whole block)
  const int32_t v = hot_rows[h];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t begin = s * L, end = min(N, begin + L);
  float* out = sums + (static_cast<int64_t>(h) * kHotSlices + s) * C;
  const int64_t packs = (C + 32 * kCols - 1) / (32 * kCols);
  for (int64_t pk = warp; pk < packs; pk += kWarps) {  // from 0: each lane zeroes the columns it adds to
    const int64_t c = pk * (32 * kCols) + static_cast<int64_t>(lane) * kCols;
    const float zero[kCols] = {};
    if (c < C) store_cols<kCols>(out + c, zero);
  }
  auto keep = [&](int32_t id) { return id == v; };
  int32_t id[kIdsPerThread];
  for (int64_t base = begin; base < end; base += kChunk) {  // the same trip count for every thread
    load_chunk_ids(ids, base, end, id);
    const int total = compact_chunk(id, base, keep, list_pos, static_cast<int32_t*>(nullptr), warp_count);
    for (int64_t pk = warp; total > 0 && pk < packs; pk += kWarps) {
      const int64_t c = pk * (32 * kCols) + static_cast<int64_t>(lane) * kCols;
      if (c >= C) continue;  // (no warp-wide operation below)
      float acc[kCols];
      load_cols<kCols>(out + c, acc);
      for (int i = 0; i < total; i += kHotBatch) {
        float g[kHotBatch][kCols] = {};  // (the entries past total: never added)
#pragma unroll
        for (int k = 0; k < kHotBatch; ++k)
          if (i + k < total) load_cols<kCols>(dout + list_pos[i + k] * C + c, g[k]);
#pragma unroll
        for (int k = 0; k < kHotBatch; ++k)
          if (i + k < total)
#pragma unroll
            for (int q = 0; q < kCols; ++q) acc[q] += g[k][q];
      }
      store_cols<kCols>(out + c, acc);
    }
    __syncthreads();  // the list is rewritten by the next chunk
  }
}

// Block h: dweight[hot row h] += its slices' sums, in slice order.
__global__ void embedding_hot_add_kernel(float* dweight, const float* sums, const int32_t* hot_rows,
                                         const int32_t* hot_total, int64_t C) {
  const int h = blockIdx.x;
  if (h >= *hot_total) return;
  float* dst = dweight + static_cast<int64_t>(hot_rows[h]) * C;
  const float* src = sums + static_cast<int64_t>(h) * kHotSlices * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float part[kHotSlices];
#pragma unroll
    for (int s = 0; s < kHotSlices; ++s) part[s] = src[s * C + c];
    float acc = dst[c];
#pragma unroll
    for (int s = 0; s < kHotSlices; ++s) acc += part[s];
    dst[c] = acc;
  }
}

}  // namespace

// V is part of the contract (ids < V); the lookup itself does not need it.
void embedding_forward_cuda(float* out, const float* weight, const int32_t* ids, int64_t N, [[maybe_unused]] int64_t V,
                            int64_t C, CUstream_st* stream) {
  if (N * C <= 0) return;
  KRAKEN_KERNEL(blocks_for(N * C, kThreads), kThreads, 0, stream, embedding_forward_kernel)(out, weight, ids, N, C);
  KRAKEN_CUDA_LAUNCH_CHECK();
}

namespace {
template <typename T>
void embedding_backward(float* dweight, const T* dout, const int32_t* ids, int64_t N, int64_t V, int64_t C,
                        CUstream_st* stream) {
  // in the forward pass this was: out[n, :] = weight[ids[n], :]
  if (N * C <= 0 || V <= 0) return;
  // Columns a lane in one access: the other rows' kernel 8 (16-byte accesses: rows of a multiple of 8,
  // dweight and dout 16-byte aligned), the hot slices' kernel 4 (rows of a multiple of 4, dweight 16-byte
  // aligned, dout aligned to its 4 elements' bytes: 16 of f32, 8 of bf16); else one.
  const bool wide8 = C % 8 == 0 && aligned16(dweight) && aligned16(dout);
  const bool wide = C % 4 == 0 && aligned16(dweight) && reinterpret_cast<uintptr_t>(dout) % (4 * sizeof(T)) == 0;
  // Hot rows exist only where N reaches the threshold; at most N / hot_count of them.
  const int64_t hot_count = embedding_hot_count(N), max_hot = N / hot_count;
  int32_t* hot_slot = nullptr;
  if (max_hot > 0) {
    // Scratch: counts (V), hot_slot (V), hot_rows (max_hot), the hot total, then the slice sums (f32,
    // 16-byte aligned): never more than 512 possible hot rows (kernels/embedding.h), 25 MB at C = 768.
    const size_t ints = static_cast<size_t>(2 * V + max_hot + 1);
    const size_t ints_bytes = (ints * sizeof(int32_t) + 255) / 256 * 256;
    const size_t sums_bytes = static_cast<size_t>(max_hot * kHotSlices * C) * sizeof(float);
    char* scratch = static_cast<char*>(cuda_detail::device_scratch(cuda_detail::ScratchSlot::kEmbeddingBackward,
                                                                   ints_bytes + sums_bytes));
    int32_t* counts = reinterpret_cast<int32_t*>(scratch);
    hot_slot = counts + V;
    int32_t* hot_rows = hot_slot + V;
    int32_t* hot_total = hot_rows + max_hot;
    float* sums = reinterpret_cast<float*>(scratch + ints_bytes);
    const unsigned int v_blocks = static_cast<unsigned int>((V + kThreads - 1) / kThreads);
    KRAKEN_KERNEL(v_blocks, kThreads, 0, stream, embedding_zero_counts_kernel)(counts, hot_total, V);
    KRAKEN_CUDA_LAUNCH_CHECK();
    KRAKEN_KERNEL(blocks_for(N, kThreads), kThreads, 0, stream, embedding_count_ids_kernel)(counts, ids, N);
    KRAKEN_CUDA_LAUNCH_CHECK();
    KRAKEN_KERNEL(v_blocks, kThreads, 0, stream, embedding_hot_slots_kernel)(hot_slot, hot_rows, hot_total, counts, V,
                                                                            hot_count);
    KRAKEN_CUDA_LAUNCH_CHECK();
    const dim3 slices(static_cast<unsigned int>(max_hot), static_cast<unsigned int>(kHotSlices));
    const int64_t L = embedding_slice_length(N);
    if (wide)
      KRAKEN_KERNEL(slices, kThreads, 0, stream, embedding_hot_slices_kernel<T, 4>)(sums, dout, ids, hot_rows,
                                                                                    hot_total, N, C, L);
    else
      KRAKEN_KERNEL(slices, kThreads, 0, stream, embedding_hot_slices_kernel<T, 1>)(sums, dout, ids, hot_rows,
                                                                                    hot_total, N, C, L);
    KRAKEN_CUDA_LAUNCH_CHECK();
    KRAKEN_KERNEL(static_cast<unsigned int>(max_hot), kThreads, 0, stream, embedding_hot_add_kernel)(
        dweight, sums, hot_rows, hot_total, C);
    KRAKEN_CUDA_LAUNCH_CHECK();
  }
  const unsigned int blocks = static_cast<unsigned int>((V + kIdsPerBlock - 1) / kIdsPerBlock);
  if (wide8)
    KRAKEN_KERNEL(blocks, kThreads, 0, stream, embedding_backward_kernel<T, 8>)(dweight, dout, ids, hot_slot, N, V, C);
  else
    KRAKEN_KERNEL(blocks, kThreads, 0, stream, embedding_backward_kernel<T, 1>)(dweight, dout, ids, hot_slot, N, V, C);
  KRAKEN_CUDA_LAUNCH_CHECK();
}
}  // namespace

void embedding_backward_cuda(float* dweight, const float* dout, const int32_t* ids, int64_t N, int64_t V, int64_t C,
                             CUstream_st* stream) {
  embedding_backward(dweight, dout, ids, N, V, C, stream);
}

void embedding_backward_bf16_cuda(float* dweight, const uint16_t* dout, const int32_t* ids, int64_t N, int64_t V,
                                  int64_t C, CUstream_st* stream) {
  embedding_backward(dweight, as_bf16(dout), ids, N, V, C, stream);
}

bool embedding_positions_forward_bf16_cuda(uint16_t* out, const float* weight, const float* positions,
                                           const int32_t* ids, int64_t N, int64_t T, [[maybe_unused]] int64_t V,
                                           int64_t C, CUstream_st* stream) {
  if (C <= 0 || C % 8 != 0 || T <= 0 || !aligned16(out) || !aligned16(weight) || !aligned16(positions)) return false;
  if (N <= 0) return true;
  const int64_t packs = N * (C / 8);
  KRAKEN_KERNEL(blocks_for(packs, kThreads), kThreads, 0, stream, embedding_positions_bf16x8_kernel)
  (as_bf16(out), weight, positions, ids, N, T, C / 8);
  KRAKEN_CUDA_LAUNCH_CHECK();
  return true;
}

}  // namespace kraken::kernels
