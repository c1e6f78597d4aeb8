// Teacher-target kernels (see targets_kernels.cuh). Only the CUDA runtime: no torch headers here.
//
// Traffic (N = B*T steps, s = input bytes per element, p = unpadded fraction of the steps):
//   per-layer none/layer:  combine reads K*s*N*C*p, writes 4*N*C: the minimum, one kernel.
//   per-layer instance:    instance_stats reads the layers once more first (2*K*s*N*C*p in all);
//                          it walks the batch backwards so that the combine kernel, which starts
//                          at b = 0, finds the last-read samples still in L2.
//   final instance:        + stats over the fp32 average and an in-place normalize: (8p + 4)*N*C.
#include "targets_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace d2v {
namespace {

constexpr int kWarp = 32;
constexpr int kStatsRows = 8;     // thread rows of a stats block; each walks T with this stride
constexpr int kStatsUnroll = 4;   // loads in flight per thread before the Welford updates
constexpr int kCombineWarps = 8;  // one row (step) per warp at a time
constexpr int kCombineRowsPerWarp = 4;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// VEC elements at p as floats: one 16-byte load when VEC * sizeof(T) == 16.
template <typename T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&dst)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) dst[i] = to_float(pack.v[i]);
}

// VEC fp32 values at p (statistics): float4 loads when VEC is a multiple of 4.
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

// 1/sqrt(v) rounded as the reference's rsqrt within an ulp, whatever --use_fast_math says.
__device__ __forceinline__ float exact_rsqrt(float v) { return __fdiv_rn(1.0f, __fsqrt_rn(v)); }

// ------------------------------------------------------------------------------------------------
// Instance statistics: block = 32 vector columns x kStatsRows thread rows; grid = (C chunks, B, K).

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp * kStatsRows)
    instance_stats_kernel(const TargetsProblem p, const bool count_pad, float* __restrict__ mean,
                          float* __restrict__ rstd) {
  __shared__ float s_count[kStatsRows];
  __shared__ float s_mean[kStatsRows][kWarp * VEC];
  __shared__ float s_m2[kStatsRows][kWarp * VEC];

  const int layer = blockIdx.z;
  const int64_t b = p.B - 1 - blockIdx.y;  // backwards: the combine kernel starts at b = 0
  const int64_t c0 = (int64_t(blockIdx.x) * kWarp + threadIdx.x) * VEC;
  const bool col_ok = c0 < p.C;  // C is a multiple of VEC
  const T* base = static_cast<const T*>(p.layers.data[layer]) + b * p.layers.stride_b[layer] + c0;
  const int64_t stride_t = p.layers.stride_t[layer];
  const uint8_t* pad = (p.pad != nullptr && !count_pad) ? p.pad + b * p.T : nullptr;

  float count = 0.0f;
  float mu[VEC], m2[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) mu[i] = m2[i] = 0.0f;

  for (int64_t t0 = threadIdx.y; t0 < p.T; t0 += kStatsRows * kStatsUnroll) {
    float x[kStatsUnroll][VEC];
    bool ok[kStatsUnroll];
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      const int64_t t = t0 + int64_t(u) * kStatsRows;
      ok[u] = t < p.T && (pad == nullptr || pad[t] == 0);
      if (ok[u] && col_ok) load_pack<T, VEC>(base + t * stride_t, x[u]);
    }
#pragma unroll
    for (int u = 0; u < kStatsUnroll; ++u) {
      if (!ok[u]) continue;
      count += 1.0f;
      const float inv = __fdiv_rn(1.0f, count);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {  // Welford: no E[x^2] - E[x]^2 cancellation
        const float delta = x[u][i] - mu[i];
        mu[i] += delta * inv;
        m2[i] += delta * (x[u][i] - mu[i]);
      }
    }
  }

  if (threadIdx.x == 0) s_count[threadIdx.y] = count;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    s_mean[threadIdx.y][threadIdx.x * VEC + i] = mu[i];
    s_m2[threadIdx.y][threadIdx.x * VEC + i] = m2[i];
  }
  __syncthreads();
  if (threadIdx.y != 0 || !col_ok) return;

  // Chan's merge of the thread rows' (count, mean, M2), in row order.
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    float n = 0.0f, m = 0.0f, s = 0.0f;
    for (int r = 0; r < kStatsRows; ++r) {
      const float nr = s_count[r];
      if (nr == 0.0f) continue;
      const float total = n + nr;
      const float delta = s_mean[r][threadIdx.x * VEC + i] - m;
      const float weight = __fdiv_rn(nr, total);
      m += delta * weight;
      s += s_m2[r][threadIdx.x * VEC + i] + delta * delta * n * weight;
      n = total;
    }
    const int64_t at = (int64_t(layer) * p.B + b) * p.C + c0 + i;
    mean[at] = m;
    rstd[at] = exact_rsqrt(__fdiv_rn(s, fmaxf(n, 1.0f)) + p.eps);
  }
}

// ------------------------------------------------------------------------------------------------
// Combine: a warp owns one step (row) at a time, lane l holding vectors l, l + 32, ... of its C
// channels in registers (ITEMS per lane), so layer norms are warp shuffles and the fp32
// accumulator never leaves registers. Block = kCombineWarps warps over a run of steps of one
// sample (their instance statistics stay in L1); grid = (T chunks, B).

// Layer norm of a row held as ITEMS x VEC per lane; `valid[i]`: whether vector i is inside C.
template <int VEC, int ITEMS>
__device__ __forceinline__ void row_layer_norm(float (&x)[ITEMS][VEC], const bool (&valid)[ITEMS],
                                               int64_t C, float eps) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int v = 0; v < VEC; ++v) sum += valid[i] ? x[i][v] : 0.0f;
  const float mu = __fdiv_rn(warp_sum(sum), float(C));
  float sq = 0.0f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float d = x[i][v] - mu;
      sq += valid[i] ? d * d : 0.0f;
    }
  const float inv = exact_rsqrt(__fdiv_rn(warp_sum(sq), float(C)) + eps);
#pragma unroll
  for (int i = 0; i < ITEMS; ++i)
#pragma unroll
    for (int v = 0; v < VEC; ++v) x[i][v] = (x[i][v] - mu) * inv;
}

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kWarp * kCombineWarps)
    combine_kernel(const TargetsProblem p, const float* __restrict__ mean,
                   const float* __restrict__ rstd, float* out, const int norm,
                   const int final_norm, const bool keep_pad, const int64_t rows_per_block) {
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = blockIdx.y;
  const int64_t nvec = p.C / VEC;
  const int64_t t_end = min(p.T, (int64_t(blockIdx.x) + 1) * rows_per_block);
  const float inv_k = __fdiv_rn(1.0f, float(p.K));
  bool valid[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) valid[i] = lane + int64_t(i) * kWarp < nvec;

  for (int64_t t = int64_t(blockIdx.x) * rows_per_block + warp; t < t_end; t += kCombineWarps) {
    float* out_row = out + (b * p.T + t) * p.C;
    float acc[ITEMS][VEC];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[i][v] = 0.0f;
    const bool padded = p.pad != nullptr && p.pad[b * p.T + t] != 0;
    if (!padded || keep_pad) {
      for (int l = 0; l < p.K; ++l) {
        const T* row = static_cast<const T*>(p.layers.data[l]) + b * p.layers.stride_b[l] +
                       t * p.layers.stride_t[l];
        float x[ITEMS][VEC];
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {  // all loads first: ITEMS x 16 bytes in flight per lane
          if (valid[i]) {
            load_pack<T, VEC>(row + (lane + int64_t(i) * kWarp) * VEC, x[i]);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) x[i][v] = 0.0f;
          }
        }
        if (norm == kNormInstance) {
          const int64_t stat = (int64_t(l) * p.B + b) * p.C;
#pragma unroll
          for (int i = 0; i < ITEMS; ++i) {
            if (!valid[i]) continue;
            float m[VEC], r[VEC];
            const int64_t c = stat + (lane + int64_t(i) * kWarp) * VEC;
            load_floats<VEC>(mean + c, m);
            load_floats<VEC>(rstd + c, r);
#pragma unroll
            for (int v = 0; v < VEC; ++v) x[i][v] = (x[i][v] - m[v]) * r[v];
          }
        } else if (norm == kNormLayer) {
          row_layer_norm<VEC, ITEMS>(x, valid, p.C, p.eps);
        }
#pragma unroll
        for (int i = 0; i < ITEMS; ++i)
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[i][v] += x[i][v];
      }
#pragma unroll
      for (int i = 0; i < ITEMS; ++i)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[i][v] *= inv_k;
      if (final_norm == kNormLayer) row_layer_norm<VEC, ITEMS>(acc, valid, p.C, p.eps);
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i)
      if (valid[i]) store_floats<VEC>(out_row + (lane + int64_t(i) * kWarp) * VEC, acc[i]);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

template <typename T, int VEC>
cudaError_t stats_for(const TargetsProblem& p, bool count_pad, float* mean, float* rstd,
                      cudaStream_t stream) {
  const int64_t chunks = (p.C / VEC + kWarp - 1) / kWarp;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(p.B),
                  static_cast<unsigned>(p.K));
  const dim3 block(kWarp, kStatsRows);
  instance_stats_kernel<T, VEC><<<grid, block, 0, stream>>>(p, count_pad, mean, rstd);
  return cudaGetLastError();
}

template <typename T, int VEC, int ITEMS>
cudaError_t combine_launch(const TargetsProblem& p, const float* mean, const float* rstd,
                           float* out, int norm, int final_norm, bool keep_pad,
                           cudaStream_t stream) {
  const int64_t rows = int64_t(kCombineWarps) * kCombineRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((p.T + rows - 1) / rows), static_cast<unsigned>(p.B));
  combine_kernel<T, VEC, ITEMS><<<grid, kWarp * kCombineWarps, 0, stream>>>(
      p, mean, rstd, out, norm, final_norm, keep_pad, rows);
  return cudaGetLastError();
}

// ITEMS (vectors per lane) instantiated: the smallest of these that covers C / VEC / 32, as long
// as a lane's row (ITEMS * VEC floats, twice: accumulator and layer) fits in registers without
// spilling: kLaneFloats per lane, so C <= 2048 with 16-byte loads and C <= 1024 without.
constexpr int kLaneFloats = 64;
constexpr int kScalarItems = 32;

template <typename T, int VEC>
cudaError_t combine_for(const TargetsProblem& p, const float* mean, const float* rstd, float* out,
                        int norm, int final_norm, bool keep_pad, cudaStream_t stream) {
  const int64_t per_lane = (p.C / VEC + kWarp - 1) / kWarp;
#define D2V_COMBINE_ITEMS(N)                                                                  \
  if constexpr (N * VEC <= kLaneFloats || (VEC == 1 && N <= kScalarItems)) {                   \
    if (per_lane <= N)                                                                         \
      return combine_launch<T, VEC, N>(p, mean, rstd, out, norm, final_norm, keep_pad, stream); \
  }
  D2V_COMBINE_ITEMS(1)
  D2V_COMBINE_ITEMS(2)
  D2V_COMBINE_ITEMS(3)
  D2V_COMBINE_ITEMS(4)
  D2V_COMBINE_ITEMS(6)
  D2V_COMBINE_ITEMS(8)
  D2V_COMBINE_ITEMS(12)
  D2V_COMBINE_ITEMS(16)
  D2V_COMBINE_ITEMS(24)
  D2V_COMBINE_ITEMS(32)
#undef D2V_COMBINE_ITEMS
  return cudaErrorInvalidValue;  // C above max_channels(): the caller checks first
}

template <typename T>
constexpr int vec_of() {
  return 16 / static_cast<int>(sizeof(T));
}

struct StatsLaunch {
  const TargetsProblem& p;
  bool count_pad;
  float* mean;
  float* rstd;
  cudaStream_t stream;
  template <typename T, int VEC>
  cudaError_t run() const {
    return stats_for<T, VEC>(p, count_pad, mean, rstd, stream);
  }
};

struct CombineLaunch {
  const TargetsProblem& p;
  const float* mean;
  const float* rstd;
  float* out;
  int norm, final_norm;
  bool keep_pad;
  cudaStream_t stream;
  template <typename T, int VEC>
  cudaError_t run() const {
    return combine_for<T, VEC>(p, mean, rstd, out, norm, final_norm, keep_pad, stream);
  }
};

// Calls fn.run<T, VEC>() for the problem's dtype and load width.
template <typename Fn>
cudaError_t dispatch(const TargetsProblem& p, const Fn& fn) {
  const bool vec = can_vectorize(p);
  switch (p.dtype) {
    case DType::kFloat32:
      return vec ? fn.template run<float, vec_of<float>()>()
                 : fn.template run<float, 1>();
    case DType::kBFloat16:
      return vec ? fn.template run<__nv_bfloat16, vec_of<__nv_bfloat16>()>()
                 : fn.template run<__nv_bfloat16, 1>();
    case DType::kFloat16:
      return vec ? fn.template run<__half, vec_of<__half>()>()
                 : fn.template run<__half, 1>();
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
  (void)dtype;  // every vector width gives the same kLaneFloats per lane
  return int64_t(kWarp) * (vectorized ? kLaneFloats : kScalarItems);
}

cudaError_t launch_instance_stats(const TargetsProblem& p, bool count_pad, float* mean, float* rstd,
                                  cudaStream_t stream) {
  if (p.K < 1 || p.K > kMaxLayers || p.B > 65535) return cudaErrorInvalidValue;
  if (p.B == 0 || p.T == 0 || p.C == 0) return cudaSuccess;
  return dispatch(p, StatsLaunch{p, count_pad, mean, rstd, stream});
}

cudaError_t launch_combine(const TargetsProblem& p, const float* mean, const float* rstd,
                           float* out, int norm, int final_norm, bool keep_pad,
                           cudaStream_t stream) {
  if (p.K < 1 || p.K > kMaxLayers || p.B > 65535) return cudaErrorInvalidValue;
  if (p.C > max_channels(p.dtype, can_vectorize(p))) return cudaErrorInvalidValue;
  if (p.B == 0 || p.T == 0 || p.C == 0) return cudaSuccess;
  return dispatch(p, CombineLaunch{p, mean, rstd, out, norm, final_norm, keep_pad, stream});
}

}  // namespace d2v
