// mosaic::SwiGLU: the feed-forward's gated activation as one native ONNX Runtime CPU kernel,
//   y = silu(gate) * up = gate * sigmoid(gate) * up,   (gate, up) = x[..., :f], x[..., f:]
// from the gate-and-up projection x (..., 2f) to y (..., f). Like LayerMemories it exists only in
// this library: the runtime puts it in a step graph in place of a layer's Split, Sigmoid and two
// Muls (runtime/ort_fusion.py fuse_swiglu), and the artifact keeps those nodes for every other
// runtime. ONNX Runtime's own com.microsoft SwiGLU has no CPU kernel.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "ort_common.h"

namespace mosaic {

// y[0:f] = silu(x[0:f]) * x[f:2f] for one row. exp's argument is capped at 88 (where sigmoid is
// below 1e-38): the vector exp takes a slow scalar path for any lane that overflows. A NaN in
// the row stays a NaN in y (it multiplies the result).
inline void swiglu_row(const float* x, int64_t f, float* y) {
  const float* up = x + f;
#pragma omp simd
  for (int64_t i = 0; i < f; ++i) {
    const float gate = x[i];
    const float sigmoid = 1.f / (1.f + std::exp(std::min(-gate, 88.f)));
    y[i] = gate * sigmoid * up[i];
  }
}

// y (..., f) from the gate-and-up projection x (..., 2f), its rows on the thread pool.
inline void swiglu(Ort::KernelContext& ctx) {
  auto input = ctx.GetInput(0);
  std::vector<int64_t> shape = input.GetTensorTypeAndShapeInfo().GetShape();  // (..., 2f)
  if (shape.empty() || shape.back() % 2 != 0)
    throw Ort::Exception("SwiGLU: the input's last axis must hold gate and up, 2f wide",
                         ORT_FAIL);
  const int64_t f = shape.back() / 2, rows = leading_rows(shape);
  shape.back() = f;
  const float* x = input.GetTensorData<float>();
  float* y = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
  parallel_for(ctx, rows, rows * f, [&](size_t r) { swiglu_row(x + r * 2 * f, f, y + r * f); });
}

using SwiGLUOp = OneInputOp<swiglu, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT>;

}  // namespace mosaic
