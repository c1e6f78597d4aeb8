// Teacher targets in CUDA C++: the kernels' host interface. Torch-independent on purpose (only the
// CUDA runtime), so targets_kernels.cu compiles and can be checked with nvcc alone; the torch
// binding lives in d2v_cuda.cpp.
//
//   target = final_norm((1/K) * sum_l norm_l(y_l))      y_l: B x T x C (fp32/bf16/fp16), target fp32
//
// Same semantics as d2v_kernels/targets.py (teacher_targets_reference): norms are none / layer (per
// step over C, no affine) / instance (per channel over T, padded steps left out of the statistics
// unless count_pad); padded steps of the target are 0.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace d2v {

constexpr int kMaxLayers = 32;

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum Norm : int { kNormNone = 0, kNormLayer = 1, kNormInstance = 2 };

// K layers as typed pointers plus batch and time strides (in elements); channels are unit-stride.
// Passed by value as a kernel argument: no device-side table, no host-to-device copy.
struct LayerTable {
  const void* data[kMaxLayers];
  int64_t stride_b[kMaxLayers];
  int64_t stride_t[kMaxLayers];
};

struct TargetsProblem {
  LayerTable layers;
  int K;
  int64_t B, T, C;
  DType dtype;
  const uint8_t* pad;  // B x T, nonzero = padded; nullptr = no padding
  float eps;
  float inv_c, inv_k;  // 1 / C and 1 / K, set by the launchers
};

// Elements per 16-byte load for `dtype`.
int vector_width(DType dtype);

// Whether every layer allows 16-byte loads: C, both strides a multiple of the vector width and
// every base pointer 16-byte aligned. Otherwise the kernels load one element at a time.
bool can_vectorize(const TargetsProblem& p);

// The largest C the kernels take (one or two warps hold a whole row in registers).
int64_t max_channels(DType dtype, bool vectorized);

// One pass, per-layer norm none or layer: every layer read once, normalized, averaged in fp32, the
// average layer-normed when final_norm == kNormLayer, the B x T x C fp32 target written once.
// Padded steps are written 0 unless keep_pad. `out` may be the only layer (in place): every
// element is read and written by the same thread.
cudaError_t launch_combine(const TargetsProblem& p, float* out, int norm, int final_norm,
                           bool keep_pad, cudaStream_t stream);

// Per-layer instance norm in one launch (see targets_kernels.cu): split-T statistics tasks, their
// partials merged by the last task of each (layer, sample, channel block), combine tasks taken
// `ahead` samples later in ticket order so that the second read of a layer hits L2.
struct InstanceWorkspace {
  int64_t nj;             // T chunks per statistics task
  int64_t ncb;            // channel blocks
  int64_t ahead;          // samples between a sample's statistics and its combine
  int64_t floats;         // fp32 workspace: partial means, M2s, counts, then mean and 1/std
  int64_t ints;           // int32 workspace, zeroed before the launch: ticket and counters
};
InstanceWorkspace instance_workspace(const TargetsProblem& p);

// `floats` and `ints` as instance_workspace(p) sizes them, `ints` zeroed on `stream`.
cudaError_t launch_instance(const TargetsProblem& p, bool count_pad, float* out, int final_norm,
                            bool keep_pad, float* floats, int* ints, cudaStream_t stream);

}  // namespace d2v
