// Python binding of the CUDA teacher-target kernels (module d2v_cuda): built by setup.py where
// nvcc and a CUDA torch exist, or just in time by d2v_kernels/_cuda.py. Checks the tensors, builds the
// by-value layer table and runs the same launch sequence as d2v_kernels/targets.py's Triton path: one
// launch per pass (combine, or the instance kernel), a second in place for a final instance norm.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>
#include <vector>

#include "targets_kernels.cuh"

namespace {

d2v::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return d2v::DType::kFloat32;
    case at::kBFloat16:
      return d2v::DType::kBFloat16;
    case at::kHalf:
      return d2v::DType::kFloat16;
    default:
      TORCH_CHECK(false, "d2v_cuda.teacher_targets: layer dtype must be float32, bfloat16 or "
                         "float16, got ", t.scalar_type());
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "d2v_cuda.teacher_targets: ", what, " failed: ",
              cudaGetErrorString(err));
}

d2v::TargetsProblem problem_of(const std::vector<at::Tensor>& ys, const uint8_t* pad, double eps) {
  d2v::TargetsProblem p{};
  p.K = static_cast<int>(ys.size());
  p.B = ys[0].size(0);
  p.T = ys[0].size(1);
  p.C = ys[0].size(2);
  p.dtype = dtype_of(ys[0]);
  p.pad = pad;
  p.eps = static_cast<float>(eps);
  for (int l = 0; l < p.K; ++l) {
    p.layers.data[l] = ys[l].data_ptr();
    p.layers.stride_b[l] = ys[l].stride(0);
    p.layers.stride_t[l] = ys[l].stride(1);
  }
  return p;
}

// K layers B x T x C (unit channel stride after the checks), the checks named after the op.
std::vector<at::Tensor> checked_layers(const std::vector<at::Tensor>& layers) {
  TORCH_CHECK(!layers.empty() && layers.size() <= static_cast<size_t>(d2v::kMaxLayers),
              "d2v_cuda.teacher_targets: need 1 to ", d2v::kMaxLayers, " layers, got ",
              layers.size());
  const at::Tensor& first = layers[0];
  TORCH_CHECK(first.is_cuda() && first.dim() == 3,
              "d2v_cuda.teacher_targets: layers must be CUDA tensors B x T x C, got ",
              first.device(), " ", first.sizes());
  dtype_of(first);
  std::vector<at::Tensor> ys;
  ys.reserve(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    const at::Tensor& y = layers[l];
    TORCH_CHECK(y.sizes() == first.sizes() && y.scalar_type() == first.scalar_type() &&
                    y.device() == first.device(),
                "d2v_cuda.teacher_targets: every layer must match layer 0 (", first.sizes(), " ",
                first.scalar_type(), " on ", first.device(), "); layer ", l, " is ", y.sizes(),
                " ", y.scalar_type(), " on ", y.device());
    ys.push_back(y.stride(2) == 1 ? y : y.contiguous());
  }
  return ys;
}

bool supports(const std::vector<at::Tensor>& layers) {
  if (layers.empty() || layers.size() > static_cast<size_t>(d2v::kMaxLayers)) return false;
  const at::Tensor& first = layers[0];
  if (!first.is_cuda() || first.dim() != 3 || first.size(0) > 65535) return false;
  const auto type = first.scalar_type();
  if (type != at::kFloat && type != at::kBFloat16 && type != at::kHalf) return false;
  std::vector<at::Tensor> ys;
  for (const auto& y : layers) ys.push_back(y.stride(2) == 1 ? y : y.contiguous());
  const d2v::TargetsProblem p = problem_of(ys, nullptr, 1e-5);
  return p.C <= d2v::max_channels(p.dtype, d2v::can_vectorize(p));
}

// One normalize-and-average pass: the combine kernel (per-layer norm none / layer), or the
// one-launch instance kernel with its workspace (statistics, partials, zeroed counters).
void combine_pass(const d2v::TargetsProblem& p, at::Tensor& out, int norm, int final_norm,
                  bool count_pad, bool keep_pad, cudaStream_t stream) {
  if (norm != d2v::kNormInstance) {
    check(d2v::launch_combine(p, out.data_ptr<float>(), norm, final_norm, keep_pad, stream),
          "combine");
    return;
  }
  const d2v::InstanceWorkspace w = d2v::instance_workspace(p);
  at::Tensor floats = at::empty({w.floats}, out.options());
  at::Tensor ints = at::zeros({w.ints}, out.options().dtype(at::kInt));
  check(d2v::launch_instance(p, count_pad, out.data_ptr<float>(), final_norm, keep_pad,
                             floats.data_ptr<float>(), ints.data_ptr<int>(), stream),
        "instance norm");
}

int norm_code(int64_t code, const char* name) {
  TORCH_CHECK(code >= d2v::kNormNone && code <= d2v::kNormInstance, "d2v_cuda.teacher_targets: ",
              name, " must be 0 (none), 1 (layer) or 2 (instance), got ", code);
  return static_cast<int>(code);
}

at::Tensor teacher_targets(const std::vector<at::Tensor>& layers,
                           const c10::optional<at::Tensor>& padding_mask, int64_t layer_norm,
                           int64_t final_norm, double eps, bool include_pad) {
  const int norm = norm_code(layer_norm, "layer_norm");
  const int final = norm_code(final_norm, "final_norm");
  TORCH_CHECK(eps > 0, "d2v_cuda.teacher_targets: eps must be positive, got ", eps);
  std::vector<at::Tensor> ys = checked_layers(layers);
  const at::Tensor& first = ys[0];
  const int64_t B = first.size(0), T = first.size(1), C = first.size(2);
  TORCH_CHECK(B <= 65535, "d2v_cuda.teacher_targets: batch must be at most 65535, got ", B);
  const c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor pad;
  const uint8_t* pad_ptr = nullptr;
  if (padding_mask.has_value() && padding_mask->defined()) {
    TORCH_CHECK(padding_mask->scalar_type() == at::kBool &&
                    padding_mask->sizes() == first.sizes().slice(0, 2) &&
                    padding_mask->device() == first.device(),
                "d2v_cuda.teacher_targets: padding_mask must be bool B x T = (", B, ", ", T,
                ") on ", first.device(), ", got ", padding_mask->scalar_type(), " ",
                padding_mask->sizes(), " on ", padding_mask->device());
    pad = padding_mask->contiguous();
    pad_ptr = reinterpret_cast<const uint8_t*>(pad.data_ptr<bool>());
  }

  at::Tensor out = at::empty({B, T, C}, first.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const d2v::TargetsProblem p = problem_of(ys, pad_ptr, eps);
  TORCH_CHECK(C <= d2v::max_channels(p.dtype, d2v::can_vectorize(p)),
              "d2v_cuda.teacher_targets: C = ", C, " is above the kernel's limit of ",
              d2v::max_channels(p.dtype, d2v::can_vectorize(p)), " channels");

  // A final instance norm needs complete statistics of the average: a second pass with the fp32
  // average as the only layer, normalized in place. Padded steps of the average are computed (not
  // zeroed) only when they count in those statistics.
  const bool final_instance = final == d2v::kNormInstance;
  combine_pass(p, out, norm, final_instance ? d2v::kNormNone : final, include_pad,
               include_pad && final_instance, stream);
  if (final_instance) {
    const d2v::TargetsProblem avg = problem_of({out}, pad_ptr, eps);
    combine_pass(avg, out, d2v::kNormInstance, d2v::kNormNone, include_pad, false, stream);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "d2v-engine CUDA kernels: fused top-K teacher targets";
  m.attr("MAX_LAYERS") = d2v::kMaxLayers;
  m.def("teacher_targets", &teacher_targets, "K layers B x T x C -> B x T x C fp32 targets",
        py::arg("layers"), py::arg("padding_mask"), py::arg("layer_norm"), py::arg("final_norm"),
        py::arg("eps"), py::arg("include_pad"));
  m.def("supports", &supports,
        "Whether teacher_targets takes these layers (count, dtype, channels, batch)",
        py::arg("layers"));
  m.def("max_channels", [](int64_t dtype_code, bool vectorized) {
    return d2v::max_channels(static_cast<d2v::DType>(dtype_code), vectorized);
  });
}
