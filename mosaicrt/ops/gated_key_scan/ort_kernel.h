// mosaic::GatedKeyScan as a native ONNX Runtime CPU kernel (the contract: __init__.py).
//
// One work item per (row b, head h): the recurrence token by token in its log-space stabilised
// form, as reference.py runs it; padding tokens leave the state unchanged. LayerMemories
// (ort_layer_memories.h) runs the same scan_keys.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../ort_common.h"

namespace mosaic {

constexpr float kScanFloor = -1e30f;  // running-max floor (gated_key_scan.FLOOR): no -inf - -inf
constexpr float kMaxExponent = 80.f;  // exp(80) is finite in fp32; the key is ~0 past it anyway

// The scan's tensors: k_raw rows of H * hs floats, k_row floats apart from one token (b, c) to the
// next (H * hs for the op's own input; LayerMemories reads them inside its projection), the gates
// (B, C, H) and the rest as in the contract.
struct KeyScanArgs {
  const float* k_raw;
  int64_t k_row;
  const float* log_g;
  const float* log_lam;
  const bool* valid;   // (B, C)
  const float* s_in;   // (B, H, hs)
  const float* mx_in;  // (B, H)
  float* keys;         // (B, C, H, hs)
  float* s_out;
  float* mx_out;
};

// One work item per (row b, head h): the recurrence token by token, then each token's key.
inline void scan_keys(const Ort::KernelContext& ctx, const KeyScanArgs& a, int64_t B, int64_t C,
                      int64_t H, int64_t hs, float eps) {
  parallel_for(ctx, B * H, B * C * H * hs * 4, [&](size_t i) {
    const int64_t b = i / H, h = i % H;
    float* s = a.s_out + i * hs;  // s_out may be s_in itself (the state bound in place)
    if (s != a.s_in + i * hs) std::copy(a.s_in + i * hs, a.s_in + (i + 1) * hs, s);
    float mx = std::max(a.mx_in[i], kScanFloor);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t at = (b * C + c) * H + h;
      if (a.valid[b * C + c]) {
        const float carried = mx + a.log_lam[at];  // log-weight of the old state
        const float m = std::max(carried, a.log_g[at]);
        const float keep = std::exp(carried - m), take = std::exp(a.log_g[at] - m);
        const float* x = a.k_raw + (b * C + c) * a.k_row + h * hs;
#pragma omp simd
        for (int64_t d = 0; d < hs; ++d) s[d] = keep * s[d] + take * x[d];
        mx = m;
      }
      // k = k_bar / max(||k_bar||, eps) with k_bar = exp(mx) s.
      float norm2 = 0.f;
#pragma omp simd reduction(+ : norm2)
      for (int64_t d = 0; d < hs; ++d) norm2 += s[d] * s[d];
      const float bound = eps * std::exp(std::min(-mx, kMaxExponent));
      const float inv = 1.f / std::max(std::sqrt(norm2), bound);
      float* out = a.keys + at * hs;
#pragma omp simd
      for (int64_t d = 0; d < hs; ++d) out[d] = s[d] * inv;
    }
    a.mx_out[i] = mx;
  });
}

struct GatedKeyScanKernel {
  float eps;

  explicit GatedKeyScanKernel(const OrtKernelInfo* info) {
    eps = Ort::ConstKernelInfo(info).GetAttribute<float>("eps");
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] { compute(context); });
  }

  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto k_raw = ctx.GetInput(0);
    const auto shape = shape_of(k_raw, 4, "k_raw");  // (B, C, H, hs)
    const int64_t B = shape[0], C = shape[1], H = shape[2], hs = shape[3];
    const KeyScanArgs args{
        k_raw.GetTensorData<float>(),
        H * hs,
        ctx.GetInput(1).GetTensorData<float>(),  // log_g (B, C, H)
        ctx.GetInput(2).GetTensorData<float>(),  // log_lam (B, C, H)
        ctx.GetInput(3).GetTensorData<bool>(),
        ctx.GetInput(4).GetTensorData<float>(),
        ctx.GetInput(5).GetTensorData<float>(),
        ctx.GetOutput(0, shape).GetTensorMutableData<float>(),
        ctx.GetOutput(1, {B, H, hs}).GetTensorMutableData<float>(),
        ctx.GetOutput(2, {B, H}).GetTensorMutableData<float>(),
    };
    scan_keys(ctx, args, B, C, H, hs, eps);
  }
};

struct GatedKeyScanOp : Ort::CustomOpBase<GatedKeyScanOp, GatedKeyScanKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new GatedKeyScanKernel(info); });
  }
  const char* GetName() const { return "GatedKeyScan"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

}  // namespace mosaic
