// mosaic::RowScan: the batcher's one look at a step's logits (runtime/sampling.py scan_rows) as
// one native ONNX Runtime CPU kernel, from the logits (..., V) to (...) int64: each row's greedy
// token (the first of its largest values, as numpy's argmax) where the row holds no NaN or inf,
// else -1. It exists only in this library: the runtime adds it to a fused last-only step graph
// (runtime/ort_fusion.py add_row_scan), where it reads the logits while they are in the caches,
// instead of the host's reading them from memory after the run.
#pragma once

#include <cstdint>
#include <vector>

#include "ort_common.h"

namespace mosaic {

// The first index of the largest of row[0:V], or -1 when the row holds a NaN or an infinity.
inline int64_t scan_row(const float* row, int64_t V) {
  bool bad = false;
  for (int64_t i = 0; i < V; ++i) bad |= not_finite(row[i]);
  if (bad || V == 0) return -1;
  int64_t best = 0;
  for (int64_t i = 1; i < V; ++i)
    if (row[i] > row[best]) best = i;  // strictly larger: the first of equal values stays
  return best;
}

// Each row's scan_row of the logits (..., V), as (...) int64.
inline void row_scan(Ort::KernelContext& ctx) {
  auto input = ctx.GetInput(0);
  std::vector<int64_t> shape = input.GetTensorTypeAndShapeInfo().GetShape();  // (..., V)
  if (shape.empty()) throw Ort::Exception("RowScan: the logits need a vocabulary axis", ORT_FAIL);
  const int64_t V = shape.back(), rows = leading_rows(shape);
  shape.pop_back();
  const float* logits = input.GetTensorData<float>();
  int64_t* out = ctx.GetOutput(0, shape).GetTensorMutableData<int64_t>();
  for (int64_t r = 0; r < rows; ++r) out[r] = scan_row(logits + r * V, V);
}

using RowScanOp = OneInputOp<row_scan, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64>;

}  // namespace mosaic
