// Teacher-target kernels (see targets_kernels.cuh). Only the CUDA runtime: no torch headers here.
//
// Traffic (N = B*T steps, s = input bytes per element, p = unpadded fraction of the steps), as in
// d2v_kernels/targets.py's table:
//   per-layer none/layer:  combine_kernel reads K*s*N*C*p, writes 4*N*C: the minimum, one pass.
//   per-layer instance:    instance_kernel, one launch of tickets: statistics tasks (a T chunk of
//                          one layer, sample and channel block) write partials, the last task of
//                          each (layer, sample, block) merges them; a sample's combine tasks come
//                          `ahead` samples later, when its layers are still in L2: K*s*N*C*p from
//                          DRAM plus 8*K*B*C*(nj+1) bytes of statistics.
//   final instance:        + the fp32 average through instance_kernel again, in place: 8*N*C.
// Every kernel is 8 warps with __launch_bounds__ asking for 4 blocks per SM (<= 64 registers) where
// a thread's row slice (ITEMS x VEC values) is at most 12 (C <= 768), fewer above (min_blocks): the
// fp32 accumulator and two layers' loads stay in registers.
#include "targets_kernels.cuh"

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace d2v {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kRowsPerWarp = 4;                         // combine: steps per warp per block/task
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kStatsUnroll = 2;                         // statistics loads in flight per thread
constexpr int64_t kStatsChunk = 128;                    // steps per statistics task (STATS_ROWS)
constexpr int64_t kL2WindowBytes = int64_t(16) << 20;  // L2_WINDOW_BYTES of d2v_kernels/targets.py

// Resident blocks of 256 threads asked of __launch_bounds__: 4 (64 registers) while a thread's
// row slice holds at most 12 values (C <= 768), then 2 (128 registers), then 1: what each
// instantiation compiles to without spilling (python -m benchmarks.compile_check --csrc).
template <int LANE_FLOATS>
constexpr int min_blocks() {
  return LANE_FLOATS <= 12 ? 4 : LANE_FLOATS <= 24 ? 2 : 1;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// float -> T through the intrinsics: torch.utils.cpp_extension compiles with
// -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit
// constructors (T(0.0f) does not compile there).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC>
__device__ __forceinline__ void load_floats(const float* p, float (&dst)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const float4 q = *reinterpret_cast<const float4*>(p + i);
      dst[i] = q.x;
      dst[i + 1] = q.y;
      dst[i + 2] = q.z;
      dst[i + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = p[i];
  }
}

template <int VEC>
__device__ __forceinline__ void store_floats(float* p, const float (&src)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4)
      *reinterpret_cast<float4*>(p + i) = make_float4(src[i], src[i + 1], src[i + 2], src[i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = src[i];
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// 1/sqrt(v) rounded as the reference's rsqrt within an ulp, whatever --use_fast_math says: for the
// statistics, once per channel. IEEE division and square root call a slow-path routine, whose
// calling convention costs registers, so the per-step code (row norms) uses rsqrtf (2 ulp) and
// products with reciprocals instead.
__device__ __forceinline__ float exact_rsqrt(float v) { return __fdiv_rn(1.0f, __fsqrt_rn(v)); }

// 1/n correctly rounded for the counts a statistics task sees (at most kStatsChunk steps).
struct Inverses {
  float v[kStatsChunk + 1];
  constexpr Inverses() : v() {
    for (int n = 1; n <= kStatsChunk; ++n) v[n] = 1.0f / float(n);
  }
};
__constant__ Inverses kInverse = Inverses();

// Chan's merge of (n_b, mean_b, M2_b) into (n, mean, M2), no E[x^2] - E[x]^2 cancellation;
// inv_total = 1 / (n + n_b).
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float n_b,
                                           float mean_b, float m2_b, float inv_total) {
  const float weight = n_b * inv_total;
  const float delta = mean_b - mean;
  mean += delta * weight;
  m2 += m2_b + delta * delta * n * weight;
  n += n_b;
}

// Release / acquire at GPU scope for the statistics hand-over (fence.acq_rel, lighter than the
// sequentially consistent fence of __threadfence).
__device__ __forceinline__ void fence_acq_rel() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// ------------------------------------------------------------------------------------------------
// Combine: a group of ROW threads (a warp, or two warps for C > 256) owns one step (row) at a
// time, thread g of the group holding vectors g, g + ROW, ... of its C channels (ITEMS x VEC
// values: 12 at C = 768, VEC = 4), so the fp32 accumulator never leaves registers and layer norms
// are warp shuffles (plus one exchange through shared memory between the two warps of a group).
// The next layer's loads are issued before the current layer is reduced; layers stay packed in
// their input dtype until used, and each pass over a packed row converts it again (fresh_float)
// rather than holding it as floats.

// The same conversions as to_float, never merged with an earlier one by the compiler.
__device__ __forceinline__ float fresh_float(float x) { return x; }
__device__ __forceinline__ float fresh_float(__nv_bfloat16 x) {
  float f;
  asm volatile("{ .reg .b32 w; cvt.u32.u16 w, %1; shl.b32 %0, w, 16; }"
               : "=f"(f) : "h"(__bfloat16_as_ushort(x)));
  return f;
}
__device__ __forceinline__ float fresh_float(__half x) {
  float f;
  asm volatile("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(__half_as_ushort(x)));
  return f;
}

template <typename T, int VEC, int ITEMS>
struct Row {
  Pack<T, VEC> v[ITEMS];
};

// The sum of x over the ROW threads of a row group; both warps of a two-warp group get the same
// value (their partials are added in warp order). `slot` alternates between calls, so one barrier
// per call suffices: a slot is rewritten only after the partner passed the next call's barrier.
template <int ROW>
__device__ __forceinline__ float group_sum(float x, float (*s_part)[2], int& slot) {
  x = warp_sum(x);
  if constexpr (ROW == kWarp) return x;
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) s_part[warp][slot] = x;
  asm volatile("bar.sync %0, %1;" ::"r"(1 + warp / 2), "r"(2 * kWarp) : "memory");
  x = s_part[warp & ~1][slot] + s_part[warp | 1][slot];
  slot ^= 1;
  return x;
}

template <typename T, int VEC, int ITEMS, int ROW>
__device__ __forceinline__ void load_row(const TargetsProblem& p, int l, int64_t b, int64_t t,
                                         int g, const bool (&valid)[ITEMS],
                                         Row<T, VEC, ITEMS>& dst) {
  const T* row = static_cast<const T*>(p.layers.data[l]) + b * p.layers.stride_b[l] +
                 t * p.layers.stride_t[l];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    if (valid[i]) {
      dst.v[i] = *reinterpret_cast<const Pack<T, VEC>*>(row + (g + int64_t(i) * ROW) * VEC);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) dst.v[i].v[e] = from_float<T>(0.0f);
    }
  }
}

// mean and 1/std of a row held as ITEMS x VEC per thread (`valid[i]`: vector i inside C).
template <typename X, int VEC, int ITEMS, int ROW>
__device__ __forceinline__ void row_moments(const X& x, const bool (&valid)[ITEMS], float inv_c,
                                            float eps, float (*s_part)[2], int& slot, float& mu,
                                            float& inv) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int e = 0; e < VEC; ++e) sum += valid[i] ? fresh_float(x.v[i].v[e]) : 0.0f;
  mu = group_sum<ROW>(sum, s_part, slot) * inv_c;
  float sq = 0.0f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float d = fresh_float(x.v[i].v[e]) - mu;
      sq += valid[i] ? d * d : 0.0f;
    }
  inv = rsqrtf(group_sum<ROW>(sq, s_part, slot) * inv_c + eps);
}

// Step t of sample b by its row group (g: the thread's index in it): the K layers normalized
// (none / layer by `norm`, or instance with `mean`, `rstd`: rows of stat_ld floats per (layer,
// sample)), averaged, final layer norm, written to out.
template <typename T, int VEC, int ITEMS, int ROW, bool INSTANCE>
__device__ __forceinline__ void combine_row(const TargetsProblem& p, int64_t b, int64_t t, int g,
                                            const float* mean, const float* rstd,
                                            int64_t stat_ld, float* out, int norm, int final_norm,
                                            bool keep_pad, float (*s_part)[2], int& slot) {
  const int64_t nvec = p.C / VEC;
  bool valid[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) valid[i] = g + int64_t(i) * ROW < nvec;
  Row<float, VEC, ITEMS> acc;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc.v[i].v[e] = 0.0f;
  const bool padded = p.pad != nullptr && p.pad[b * p.T + t] != 0;
  if (!padded || keep_pad) {
    Row<T, VEC, ITEMS> next;
    load_row<T, VEC, ITEMS, ROW>(p, 0, b, t, g, valid, next);
    for (int l = 0; l < p.K; ++l) {
      const Row<T, VEC, ITEMS> cur = next;
      if (l + 1 < p.K) load_row<T, VEC, ITEMS, ROW>(p, l + 1, b, t, g, valid, next);
      float mu = 0.0f, inv = 1.0f;
      if (!INSTANCE && norm == kNormLayer)
        row_moments<Row<T, VEC, ITEMS>, VEC, ITEMS, ROW>(cur, valid, p.inv_c, p.eps, s_part,
                                                         slot, mu, inv);
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        float m[VEC], r[VEC];
        if (INSTANCE && valid[i]) {
          const int64_t c = (int64_t(l) * p.B + b) * stat_ld + (g + int64_t(i) * ROW) * VEC;
          load_floats<VEC>(mean + c, m);
          load_floats<VEC>(rstd + c, r);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) m[e] = mu, r[e] = inv;
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc.v[i].v[e] += (fresh_float(cur.v[i].v[e]) - m[e]) * r[e];
      }
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc.v[i].v[e] *= p.inv_k;
    if (final_norm == kNormLayer) {
      float mu, inv;
      row_moments<Row<float, VEC, ITEMS>, VEC, ITEMS, ROW>(acc, valid, p.inv_c, p.eps, s_part,
                                                           slot, mu, inv);
#pragma unroll
      for (int i = 0; i < ITEMS; ++i)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc.v[i].v[e] = (acc.v[i].v[e] - mu) * inv;
    }
  }
  float* out_row = out + (b * p.T + t) * p.C;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
    if (valid[i]) store_floats<VEC>(out_row + (g + int64_t(i) * ROW) * VEC, acc.v[i].v);
}

// The steps [t_begin, t_end) of sample b, a row group at a time each.
template <typename T, int VEC, int ITEMS, int ROW, bool INSTANCE>
__device__ __forceinline__ void combine_rows(const TargetsProblem& p, int64_t b, int64_t t_begin,
                                             int64_t t_end, const float* mean, const float* rstd,
                                             int64_t stat_ld, float* out, int norm,
                                             int final_norm, bool keep_pad) {
  __shared__ float s_part[kWarps][2];
  constexpr int kGroups = kThreads / ROW;
  int slot = 0;
  const int g = threadIdx.x % ROW;
  for (int64_t t = t_begin + threadIdx.x / ROW; t < t_end; t += kGroups)
    combine_row<T, VEC, ITEMS, ROW, INSTANCE>(p, b, t, g, mean, rstd, stat_ld, out, norm,
                                              final_norm, keep_pad, s_part, slot);
}

// Per-layer norm none / layer. Block = 8 warps over kRowsPerBlock steps of one sample; grid =
// (T blocks, B).
template <typename T, int VEC, int ITEMS, int ROW>
__global__ void __launch_bounds__(kThreads, min_blocks<ITEMS * VEC>())
    combine_kernel(const TargetsProblem p, float* out, const int norm, const int final_norm,
                   const bool keep_pad) {
  const int64_t t0 = int64_t(blockIdx.x) * kRowsPerBlock;
  combine_rows<T, VEC, ITEMS, ROW, false>(p, blockIdx.y, t0, min(p.T, t0 + kRowsPerBlock),
                                          nullptr, nullptr, 0, out, norm, final_norm, keep_pad);
}

// ------------------------------------------------------------------------------------------------
// Instance norm: one launch of tasks taken in ticket order (see instance_kernel).

struct InstanceArgs {
  int64_t nj, ncb, ahead, nrg;  // T chunks, channel blocks, look-ahead, combine tasks per sample
  int64_t stat_ld;              // floats per (layer, sample) row of mean / rstd: C rounded to 32
  float* part_mean;             // B x K x nj x (ncb * 32 * VEC)
  float* part_m2;
  float* counts;                // B x K x ncb x nj
  float* mean;                  // K x B x stat_ld, rows 128-byte aligned
  float* rstd;
  int* ticket;
  int* ready;                   // B: merged (layer, block) statistics per sample
  int* finished;                // B x K x ncb: statistics tasks done
};

// Statistics of steps [j * kStatsChunk, ...) of layer l, sample b, channels of block cb: 8 thread
// rows (a warp each) stride the chunk, lane = channel vector; Welford within a thread, Chan merges
// across the rows in row order. The last of the nj tasks of (b, l, cb) to finish merges the
// partials in chunk order (deterministic: no atomics on values), writes mean and 1/std, and
// counts itself in ready[b].
template <typename T, int VEC>
__device__ __forceinline__ void stats_task(const TargetsProblem& p, const InstanceArgs& a,
                                           bool count_pad, int64_t b, int l, int cb,
                                           int j) {
  __shared__ float s_count[kWarps];
  __shared__ float s_mean[kWarps][kWarp * VEC];
  __shared__ float s_m2[kWarps][kWarp * VEC];
  __shared__ bool s_last;
  const int lane = threadIdx.x % kWarp;
  const int row = threadIdx.x / kWarp;
  const int64_t block_w = int64_t(kWarp) * VEC;
  const int64_t c0 = cb * block_w + int64_t(lane) * VEC;
  const bool col_ok = c0 < p.C;  // C is a multiple of VEC
  const int64_t stride_t = p.layers.stride_t[l];
  const int64_t step = kWarps * stride_t;
  const uint8_t* pad = (p.pad != nullptr && !count_pad) ? p.pad + b * p.T : nullptr;
  const int t_begin = j * static_cast<int>(kStatsChunk) + row;  // T < 2^31: 32-bit steps
  const int t_end = static_cast<int>(min(p.T, (j + 1) * kStatsChunk));
  const T* at = static_cast<const T*>(p.layers.data[l]) + b * p.layers.stride_b[l] + c0 +
                t_begin * stride_t;

  int count = 0;
  float mu[VEC], m2[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) mu[e] = m2[e] = 0.0f;
  for (int t = t_begin; t < t_end; t += kWarps * kStatsUnroll, at += kStatsUnroll * step) {
    Pack<T, VEC> x[kStatsUnroll];
    bool ok[kStatsUnroll];
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      ok[u] = t + u * kWarps < t_end && (pad == nullptr || pad[t + u * kWarps] == 0);
      if (ok[u] && col_ok) x[u] = *reinterpret_cast<const Pack<T, VEC>*>(at + u * step);
    }
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      if (!ok[u]) continue;
      const float inv = kInverse.v[++count];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {  // Welford
        const float v = col_ok ? to_float(x[u].v[e]) : 0.0f;
        const float delta = v - mu[e];
        mu[e] += delta * inv;
        m2[e] += delta * (v - mu[e]);
      }
    }
  }
  if (lane == 0) s_count[row] = float(count);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    s_mean[row][lane * VEC + e] = mu[e];
    s_m2[row][lane * VEC + e] = m2[e];
  }
  __syncthreads();

  const int64_t part = ((b * p.K + l) * a.nj + j) * (a.ncb * block_w) + cb * block_w;
  const int64_t counter = (b * p.K + l) * a.ncb + cb;
  for (int c = threadIdx.x; c < block_w; c += kThreads) {  // one channel per thread, rows merged
    float n = 0.0f, m = 0.0f, s = 0.0f;
    for (int r = 0; r < kWarps; ++r) {
      const float n_r = s_count[r];
      chan_merge(n, m, s, n_r, s_mean[r][c], s_m2[r][c], kInverse.v[static_cast<int>(n + n_r)]);
    }
    a.part_mean[part + c] = m;
    a.part_m2[part + c] = s;
  }
  if (threadIdx.x == 0) {
    float n = 0.0f;
    for (int r = 0; r < kWarps; ++r) n += s_count[r];
    a.counts[counter * a.nj + j] = n;
  }
  fence_acq_rel();  // this block's partial is visible device-wide before it is counted
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(a.finished + counter, 1) == a.nj - 1;
  __syncthreads();
  if (!s_last) return;
  fence_acq_rel();  // acquire: the other tasks' partials

  for (int c = threadIdx.x; c < block_w; c += kThreads) {
    const int64_t ch = cb * block_w + c;
    float n = 0.0f, m = 0.0f, s = 0.0f;
    for (int64_t jj = 0; jj < a.nj; ++jj) {
      const int64_t at = ((b * p.K + l) * a.nj + jj) * (a.ncb * block_w) + cb * block_w + c;
      const float n_j = __ldcg(a.counts + counter * a.nj + jj);
      chan_merge(n, m, s, n_j, __ldcg(a.part_mean + at), __ldcg(a.part_m2 + at),
                 __fdividef(1.0f, fmaxf(n + n_j, 1.0f)));
    }
    if (ch < p.C) {
      const int64_t at = (int64_t(l) * p.B + b) * a.stat_ld + ch;
      a.mean[at] = m;
      a.rstd[at] = exact_rsqrt(__fdiv_rn(s, fmaxf(n, 1.0f)) + p.eps);
    }
  }
  fence_acq_rel();  // release: mean and 1/std before the sample's ready count
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(a.ready + b, 1);
}

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Tasks in ticket order: the statistics tasks of samples 0..ahead-1, then for each later sample s
// its statistics tasks followed by the combine tasks of sample s - ahead, then the last `ahead`
// samples' combine tasks. A combine task waits (acquire) for its sample's statistics; every task
// it waits on took an earlier ticket, so it is running already and never waits itself: no
// deadlock whatever order the hardware starts blocks in. Between a sample's statistics and its
// combine only ~ahead samples' layers are read, so the second read finds them in L2. The mean and
// 1/std rows of a sample are 128-byte aligned and nobody reads them before they are final, so no
// SM's L1 holds a stale copy.
template <typename T, int SVEC, int VEC, int ITEMS, int ROW>
__global__ void __launch_bounds__(kThreads, min_blocks<ITEMS * VEC>())
    instance_kernel(const TargetsProblem p, const InstanceArgs a, const bool count_pad,
                    float* out, const int final_norm, const bool keep_pad) {
  __shared__ int s_task;
  if (threadIdx.x == 0) s_task = atomicAdd(a.ticket, 1);
  __syncthreads();
  // 32-bit decoding (the launch checks that tasks fit): 64-bit division is a called routine,
  // whose calling convention alone costs registers.
  const int task = s_task;
  const int s1 = p.K * static_cast<int>(a.ncb * a.nj);  // statistics tasks per sample
  const int unit = s1 + static_cast<int>(a.nrg);
  const int ahead = static_cast<int>(a.ahead);
  const int head = ahead * s1;
  const int mid = static_cast<int>(p.B - ahead) * unit;
  int b, i;
  bool stats;
  if (task < head) {
    stats = true, b = task / s1, i = task % s1;
  } else if (task - head < mid) {
    const int u = (task - head) / unit, w = (task - head) % unit;
    stats = w < s1;
    b = stats ? ahead + u : u;
    i = stats ? w : w - s1;
  } else {
    const int r = task - head - mid, nrg = static_cast<int>(a.nrg);
    stats = false, b = static_cast<int>(p.B) - ahead + r / nrg, i = r % nrg;
  }
  if (stats) {
    const int nj = static_cast<int>(a.nj), ncb = static_cast<int>(a.ncb);
    stats_task<T, SVEC>(p, a, count_pad, b, i / (ncb * nj), (i / nj) % ncb, i % nj);
    return;
  }
  if (threadIdx.x == 0) {
    const int need = p.K * static_cast<int>(a.ncb);
    while (load_acquire(a.ready + b) < need) __nanosleep(64);
  }
  __syncthreads();
  const int64_t t0 = int64_t(i) * kRowsPerBlock;
  combine_rows<T, VEC, ITEMS, ROW, true>(p, b, t0, min(p.T, t0 + kRowsPerBlock), a.mean, a.rstd,
                                         a.stat_ld, out, kNormInstance, final_norm, keep_pad);
}

// ------------------------------------------------------------------------------------------------
// Host side.

template <typename T>
constexpr int vec_of() {
  return 16 / static_cast<int>(sizeof(T));
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

TargetsProblem with_inverses(TargetsProblem p) {
  p.inv_c = 1.0f / float(p.C);
  p.inv_k = 1.0f / float(p.K);
  return p;
}
int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

struct Launch {
  const TargetsProblem& p;
  float* out;
  int norm, final_norm;
  bool keep_pad, count_pad;
  const InstanceArgs* instance;  // null: combine_kernel (norm none / layer)
  cudaStream_t stream;

  template <typename T, int SVEC, int VEC, int ITEMS, int ROW>
  cudaError_t go() const {
    if (instance == nullptr) {
      const dim3 grid(static_cast<unsigned>(cdiv(p.T, kRowsPerBlock)), static_cast<unsigned>(p.B));
      combine_kernel<T, VEC, ITEMS, ROW><<<grid, kThreads, 0, stream>>>(p, out, norm, final_norm,
                                                                        keep_pad);
    } else {
      const int64_t tasks = p.B * (p.K * instance->ncb * instance->nj + instance->nrg);
      if (tasks > 0x7fffffff) return cudaErrorInvalidValue;
      instance_kernel<T, SVEC, VEC, ITEMS, ROW>
          <<<static_cast<unsigned>(tasks), kThreads, 0, stream>>>(p, *instance, count_pad, out,
                                                                  final_norm, keep_pad);
    }
    return cudaGetLastError();
  }

  // SVEC: the statistics' load width (16 bytes); the combine loads VEC = 4 elements (16 bytes in
  // fp32, 8 in 16-bit types: 768 channels are 192 vectors, 3 per thread of a 64-thread group).
  // ROW: a warp per row up to 64 vectors, two warps above; ITEMS: the smallest instantiated
  // count of vectors per thread that covers the row.
  template <typename T, int SVEC>
  cudaError_t run() const {
    constexpr int VEC = SVEC == 1 ? 1 : 4;
    const int64_t nvec = p.C / VEC;
#define D2V_ITEMS(ROW, N)                                                  \
  if (cdiv(nvec, ROW) <= N) return go<T, SVEC, VEC, N, ROW>();
    if (nvec <= 2 * kWarp) {
      D2V_ITEMS(kWarp, 1) D2V_ITEMS(kWarp, 2)
    } else if constexpr (VEC == 1) {
      D2V_ITEMS(2 * kWarp, 2) D2V_ITEMS(2 * kWarp, 4) D2V_ITEMS(2 * kWarp, 8)
      D2V_ITEMS(2 * kWarp, 16)
    } else {
      D2V_ITEMS(2 * kWarp, 2) D2V_ITEMS(2 * kWarp, 3) D2V_ITEMS(2 * kWarp, 4)
      D2V_ITEMS(2 * kWarp, 6) D2V_ITEMS(2 * kWarp, 8)
    }
#undef D2V_ITEMS
    return cudaErrorInvalidValue;  // C above max_channels(): the caller checks first
  }
};

// Calls fn.run<T, SVEC>() for the problem's dtype and 16-byte load width (1: unaligned).
template <typename Fn>
cudaError_t dispatch(const TargetsProblem& p, const Fn& fn) {
  const bool vec = can_vectorize(p);
  switch (p.dtype) {
    case DType::kFloat32:
      return vec ? fn.template run<float, vec_of<float>()>() : fn.template run<float, 1>();
    case DType::kBFloat16:
      return vec ? fn.template run<__nv_bfloat16, vec_of<__nv_bfloat16>()>()
                 : fn.template run<__nv_bfloat16, 1>();
    case DType::kFloat16:
      return vec ? fn.template run<__half, vec_of<__half>()>() : fn.template run<__half, 1>();
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int vector_width(DType dtype) { return dtype == DType::kFloat32 ? 4 : 8; }

bool can_vectorize(const TargetsProblem& p) {
  const int vec = vector_width(p.dtype);
  if (p.C % vec != 0) return false;
  for (int l = 0; l < p.K; ++l) {
    if (reinterpret_cast<uintptr_t>(p.layers.data[l]) % 16 != 0) return false;
    if (p.layers.stride_b[l] % vec != 0 || p.layers.stride_t[l] % vec != 0) return false;
  }
  return true;
}

int64_t max_channels(DType dtype, bool vectorized) {
  (void)dtype;  // the combine's vectors are 4 elements whatever the dtype
  return int64_t(2 * kWarp) * (vectorized ? 4 * 8 : 16);  // the largest ITEMS instantiated
}

cudaError_t launch_combine(const TargetsProblem& p, float* out, int norm, int final_norm,
                           bool keep_pad, cudaStream_t stream) {
  if (p.K < 1 || p.K > kMaxLayers || p.B > 65535 || norm == kNormInstance)
    return cudaErrorInvalidValue;
  if (p.C > max_channels(p.dtype, can_vectorize(p))) return cudaErrorInvalidValue;
  if (p.B == 0 || p.T == 0 || p.C == 0) return cudaSuccess;
  const TargetsProblem q = with_inverses(p);
  return dispatch(q, Launch{q, out, norm, final_norm, keep_pad, false, nullptr, stream});
}

InstanceWorkspace instance_workspace(const TargetsProblem& p) {
  InstanceWorkspace w{};
  const int64_t vec = can_vectorize(p) ? vector_width(p.dtype) : 1;
  const int64_t block_w = kWarp * vec;
  w.nj = cdiv(p.T, kStatsChunk);
  w.ncb = cdiv(p.C, block_w);
  const int64_t sample_bytes = int64_t(p.K) * p.T * p.C * (p.dtype == DType::kFloat32 ? 4 : 2);
  w.ahead = std::max<int64_t>(1, std::min<int64_t>(p.B, kL2WindowBytes / std::max<int64_t>(
                                                                 1, sample_bytes)));
  const int64_t partial = round_up(p.B * p.K * w.nj * w.ncb * block_w, 32);
  const int64_t counts = round_up(p.B * p.K * w.ncb * w.nj, 32);
  const int64_t stats = int64_t(p.K) * p.B * round_up(p.C, 32);
  w.floats = 2 * partial + counts + 2 * stats;
  w.ints = 1 + p.B + p.B * p.K * w.ncb;
  return w;
}

cudaError_t launch_instance(const TargetsProblem& p, bool count_pad, float* out, int final_norm,
                            bool keep_pad, float* floats, int* ints, cudaStream_t stream) {
  if (p.K < 1 || p.K > kMaxLayers) return cudaErrorInvalidValue;
  if (p.C > max_channels(p.dtype, can_vectorize(p))) return cudaErrorInvalidValue;
  if (p.B == 0 || p.T == 0 || p.C == 0) return cudaSuccess;
  const InstanceWorkspace w = instance_workspace(p);
  const int64_t vec = can_vectorize(p) ? vector_width(p.dtype) : 1;
  InstanceArgs a{};
  a.nj = w.nj;
  a.ncb = w.ncb;
  a.ahead = w.ahead;
  a.nrg = cdiv(p.T, kRowsPerBlock);
  a.stat_ld = round_up(p.C, 32);
  const int64_t partial = round_up(p.B * p.K * w.nj * w.ncb * kWarp * vec, 32);
  const int64_t counts = round_up(p.B * p.K * w.ncb * w.nj, 32);
  const int64_t stats = int64_t(p.K) * p.B * a.stat_ld;
  a.part_mean = floats;
  a.part_m2 = floats + partial;
  a.counts = floats + 2 * partial;
  a.mean = floats + 2 * partial + counts;
  a.rstd = a.mean + stats;
  a.ticket = ints;
  a.ready = ints + 1;
  a.finished = ints + 1 + p.B;
  const TargetsProblem q = with_inverses(p);
  return dispatch(q, Launch{q, out, kNormInstance, final_norm, keep_pad, count_pad, &a, stream});
}

}  // namespace d2v
