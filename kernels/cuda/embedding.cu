// CUDA embedding (contract in kernels/embedding.h).
//
// Forward: a grid-stride copy, one thread per output element.
// Backward without float atomics, in the order kernels/embedding.h fixes. First the ids are counted
// (integer atomics: exact), the hot threshold found from the counts' histogram (embedding_hot_threshold),
// and the hot rows (that many positions or more, at most 512) given slots.
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
// The hot rows: block (b, s) sums the positions of slice s of up to 8 hot rows, each from 0 (the same
// compaction over the slice, then (row, column pack) tasks on the warps, 4 columns a lane, kHotBatch rows
// of dout in flight) into the rows' slots of the scratch; then each hot row's slice sums are added to
// dweight in slice order.
// So the result is bit-identical on every launch, and the CPU's.
// (Until the sixteenth session every row went the first way, with chunks of 256 positions and the whole
// block adding one contribution after another, a thread per column in 2-byte loads: a round trip to
// memory per contribution, 44% of an H100's bandwidth at GPT-2's 8192 × 768 with uniform ids — and
// text is not uniform: English puts ~30% of its GPT-2 tokens in one block's 128 ids, " the" alone ~7%,
// thousands of contributions a step in one sequence.)
#include <algorithm>

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
constexpr int64_t kHotRowBlocks = 64;             // the slice kernel's most blocks along the hot rows

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

// counts[v] = 0, histogram[b] = 0, and the hot rows' count (a kernel rather than a memset: the emulation
// runs kernels).
__global__ void embedding_zero_counts_kernel(int32_t* counts, int32_t* histogram, int32_t* hot_total, int64_t V,
                                             int64_t bins) {
  const int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (v < V) counts[v] = 0;
  if (v < bins) histogram[v] = 0;
  if (v == 0) *hot_total = 0;
}

__global__ void embedding_count_ids_kernel(int32_t* counts, const int32_t* ids, int64_t N) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n < N) atomicAdd(&counts[ids[n]], 1);
}

// The hot threshold's two steps (kernels/embedding.h, embedding_hot_threshold): the rows by count from
// kEmbeddingHotMin up, the last bin every count at or past `bound` (integer atomics: exact)…
__global__ void embedding_count_histogram_kernel(int32_t* histogram, const int32_t* counts, int64_t V, int64_t bound) {
  const int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (v >= V) return;
  const int64_t c = counts[v];
  if (c >= kEmbeddingHotMin) atomicAdd(&histogram[min(c, bound) - kEmbeddingHotMin], 1);
}

// … then one thread adds up the rows with at least k positions from the bound down, while they are at most
// kEmbeddingMaxHotRows (a few hundred bins at a training batch's N).
__global__ void embedding_hot_threshold_kernel(int32_t* threshold, const int32_t* histogram, int64_t bound) {
  int64_t best = bound, at_least = 0;
  for (int64_t k = bound; k >= kEmbeddingHotMin; --k) {
    at_least += histogram[k - kEmbeddingHotMin];
    if (at_least > kEmbeddingMaxHotRows) break;
    best = k;
  }
  *threshold = static_cast<int32_t>(best);
}

// hot_slot[v]: row v's slot among the hot rows, else −1; hot_rows[slot] = v. The slots come in whatever
// order the atomics take (a slot only says where the row's slice sums live: no sum depends on it).
__global__ void embedding_hot_slots_kernel(int32_t* hot_slot, int32_t* hot_rows, int32_t* hot_total,
                                           const int32_t* counts, int64_t V, const int32_t* threshold) {
  const int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (v >= V) return;
  int32_t slot = -1;
  if (counts[v] >= *threshold) {
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

// Block (b, s): the sums over slice s of the positions, [s·L, (s + 1)·L), of the hot rows whose slots are
// b, b + G, b + 2G, … (G = gridDim.x: a group of rows for every 1,024 positions, up to kHotRowBlocks; at
// most 8 rows a block at a training batch), each from 0 in position order, into
// sums[(slot·kHotSlices + s)·C …]. The block reads the slice's ids once: in each chunk the positions of
// its rows are compacted, in position order, with the row's index among the block's, and the adding is
// split into (row, 128-column pack) tasks on the warps, as the other rows' kernel does with its classes;
// a task finds its row's entries 32 at a time (ballots) and adds kHotBatch of them with their loads in
// flight, the sum held in registers through the chunk (and read and written only in chunks that have
// the row). (Until the seventeenth session a block summed one row's slice, reading the slice's ids for
// every hot row.)
template <typename T, int kCols>
__global__ void __launch_bounds__(kThreads)
    embedding_hot_slices_kernel(float* sums, const T* dout, const int32_t* ids, const int32_t* hot_slot,
                                const int32_t* hot_total, int64_t N, int64_t C, int64_t L) {
  __shared__ int64_t list_pos[kChunk];
  __shared__ int32_t list_row[kChunk];
  __shared__ int warp_count[kWarps];
  const int b = blockIdx.x, G = gridDim.x, s = blockIdx.y, rows = *hot_total;
  if (b >= rows) return;  // (the whole block)
  const int mine = (rows - b + G - 1) / G;  // the block's rows: slots b + r·G, r < mine
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t begin = s * L, end = min(N, begin + L);
  const int64_t packs = (C + 32 * kCols - 1) / (32 * kCols), tasks = mine * packs;
  auto out_of = [&](int64_t r) { return sums + ((b + r * G) * static_cast<int64_t>(kHotSlices) + s) * C; };
  for (int64_t t = warp; t < tasks; t += kWarps) {  // from 0: each lane zeroes the columns it adds to
    const int64_t c = (t % packs) * (32 * kCols) + static_cast<int64_t>(lane) * kCols;
    const float zero[kCols] = {};
    if (c < C) store_cols<kCols>(out_of(t / packs) + c, zero);
  }
  auto keep = [](int32_t r) { return r >= 0; };
  for (int64_t base = begin; base < end; base += kChunk) {  // the same trip count for every thread
    int32_t id[kIdsPerThread], row[kIdsPerThread];
    load_chunk_ids(ids, base, end, id);
#pragma unroll
    for (int j = 0; j < kIdsPerThread; ++j) {  // my positions' rows among the block's, else −1
      const int32_t slot = id[j] >= 0 ? hot_slot[id[j]] : -1;
      row[j] = slot >= 0 && slot % G == b ? slot / G : -1;
    }
    const int total = compact_chunk(row, base, keep, list_pos, list_row, warp_count);
    for (int64_t t = warp; total > 0 && t < tasks; t += kWarps) {
      const int r = static_cast<int>(t / packs);
      const int64_t c = (t % packs) * (32 * kCols) + static_cast<int64_t>(lane) * kCols;
      const bool active = c < C;  // (every lane takes part in the ballots below)
      auto next = [&](int i) {  // r's first entry at or after i (the same for the whole warp)
        for (; i < total; i += 32) {
          const unsigned int found = __ballot_sync(0xffffffffu, i + lane < total && list_row[i + lane] == r);
          if (found) return i + __ffs(found) - 1;
        }
        return total;
      };
      int i = next(0);
      if (i >= total) continue;  // (none of r's positions in this chunk: its sum stays where it is)
      float acc[kCols] = {};
      if (active) load_cols<kCols>(out_of(r) + c, acc);
      while (i < total) {
        int entry[kHotBatch], n = 0;
#pragma unroll
        for (int k = 0; k < kHotBatch; ++k)
          if (i < total) entry[k] = i, n = k + 1, i = next(i + 1);
        float g[kHotBatch][kCols] = {};  // (the entries past n: never added)
#pragma unroll
        for (int k = 0; k < kHotBatch; ++k)
          if (k < n && active) load_cols<kCols>(dout + list_pos[entry[k]] * C + c, g[k]);
#pragma unroll
        for (int k = 0; k < kHotBatch; ++k)
          if (k < n)
#pragma unroll
            for (int q = 0; q < kCols; ++q) acc[q] += g[k][q];
      }
      if (active) store_cols<kCols>(out_of(r) + c, acc);
    }
    __syncthreads();  // the lists are rewritten by the next chunk
  }
}

// Block b, for the hot rows h = b, b + gridDim.x, …: dweight[hot row h] += its slices' sums, in slice order.
__global__ void embedding_hot_add_kernel(float* dweight, const float* sums, const int32_t* hot_rows,
                                         const int32_t* hot_total, int64_t C) {
  const int rows = *hot_total;
  for (int h = blockIdx.x; h < rows; h += gridDim.x) {
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
  // Hot rows exist only where some row can reach the least threshold; never more than kEmbeddingMaxHotRows
  // of them (kernels/embedding.h).
  const int64_t max_hot = std::min(kEmbeddingMaxHotRows, N / kEmbeddingHotMin);
  int32_t* hot_slot = nullptr;
  if (max_hot > 0) {
    // Scratch: counts (V), hot_slot (V), hot_rows (max_hot), the hot total, the threshold, the counts'
    // histogram, then the slice sums (f32, 16-byte aligned): 25 MB at C = 768.
    const int64_t bound = embedding_hot_threshold_bound(N), bins = bound - kEmbeddingHotMin + 1;
    const size_t ints = static_cast<size_t>(2 * V + max_hot + 2 + bins);
    const size_t ints_bytes = (ints * sizeof(int32_t) + 255) / 256 * 256;
    const size_t sums_bytes = static_cast<size_t>(max_hot * kHotSlices * C) * sizeof(float);
    char* scratch = static_cast<char*>(cuda_detail::device_scratch(cuda_detail::ScratchSlot::kEmbeddingBackward,
                                                                   ints_bytes + sums_bytes));
    int32_t* counts = reinterpret_cast<int32_t*>(scratch);
    hot_slot = counts + V;
    int32_t* hot_rows = hot_slot + V;
    int32_t* hot_total = hot_rows + max_hot;
    int32_t* threshold = hot_total + 1;
    int32_t* histogram = threshold + 1;
    float* sums = reinterpret_cast<float*>(scratch + ints_bytes);
    const unsigned int v_blocks = static_cast<unsigned int>((V + kThreads - 1) / kThreads);
    KRAKEN_KERNEL(static_cast<unsigned int>((std::max(V, bins) + kThreads - 1) / kThreads), kThreads, 0, stream,
                  embedding_zero_counts_kernel)(counts, histogram, hot_total, V, bins);
    KRAKEN_CUDA_LAUNCH_CHECK();
    KRAKEN_KERNEL(blocks_for(N, kThreads), kThreads, 0, stream, embedding_count_ids_kernel)(counts, ids, N);
    KRAKEN_CUDA_LAUNCH_CHECK();
    KRAKEN_KERNEL(v_blocks, kThreads, 0, stream, embedding_count_histogram_kernel)(histogram, counts, V, bound);
    KRAKEN_CUDA_LAUNCH_CHECK();
    KRAKEN_KERNEL(1, 1, 0, stream, embedding_hot_threshold_kernel)(threshold, histogram, bound);
    KRAKEN_CUDA_LAUNCH_CHECK();
    KRAKEN_KERNEL(v_blocks, kThreads, 0, stream, embedding_hot_slots_kernel)(hot_slot, hot_rows, hot_total, counts, V,
                                                                            threshold);
    KRAKEN_CUDA_LAUNCH_CHECK();
    const int64_t row_groups = std::min({max_hot, kHotRowBlocks, (N + kChunk - 1) / kChunk});
    const dim3 slices(static_cast<unsigned int>(row_groups), static_cast<unsigned int>(kHotSlices));
    const int64_t L = embedding_slice_length(N);
    if (wide)
      KRAKEN_KERNEL(slices, kThreads, 0, stream, embedding_hot_slices_kernel<T, 4>)(sums, dout, ids, hot_slot,
                                                                                    hot_total, N, C, L);
    else
      KRAKEN_KERNEL(slices, kThreads, 0, stream, embedding_hot_slices_kernel<T, 1>)(sums, dout, ids, hot_slot,
                                                                                    hot_total, N, C, L);
    KRAKEN_CUDA_LAUNCH_CHECK();
    KRAKEN_KERNEL(static_cast<unsigned int>(std::min(max_hot, 4 * row_groups)), kThreads, 0, stream,
                  embedding_hot_add_kernel)(dweight, sums, hot_rows, hot_total, C);
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
