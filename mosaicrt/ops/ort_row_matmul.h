// mosaic::RowMatMul: y = x W as one native ONNX Runtime CPU kernel that streams W's rows in their
// own order, for x (..., K) and a weight W (K, N), both fp32: each row of W, times its element of
// x, is added to an accumulator row that stays in the L1 cache, which is the access pattern of a
// plain sum over W. A one-row product does one multiply-add per weight it reads, so its time is
// that of reading W; ONNX Runtime's MatMul reads its packed panels instead. It exists only in
// this library, for bench/read_rates.py, which times the two against a plain sum of the same
// bytes; no step graph uses it: in a session it reads at most a few per cent faster than the
// MatMul (the measurements: the README, "Where the CPU path stands against its targets").
//
// Attribute: parts (int, default 1), the contiguous ranges of W's rows summed separately on the
// thread pool (its threads, for a step of one row), each into its own accumulator row.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ort_common.h"
#include "ort_simd.h"

namespace mosaic {

// The accumulator's columns at a time (16 KB of floats: in the L1 cache beside the stream).
constexpr int64_t kRowMatMulColumns = 4096;
// The scratch buffer of the accumulators (ort_layer_memories.h takes the others).
constexpr int kRowMatMulSlot = kScratchSlots - 1;

// acc[0:n] = sum over k < rows of x[k] * w[k * stride : k * stride + n]: a weight row at a time,
// four vectors per step (the first row sets acc).
inline void accumulate_rows(const float* x, const float* w, int64_t rows, int64_t stride,
                            int64_t n, float* acc) {
  const int64_t whole = n - n % (4 * kLanes);
  for (int64_t k = 0; k < rows; ++k) {
    const float* row = w + k * stride;
    const Vec xk = Vec{} + x[k];
    for (int64_t j = 0; j < whole; j += 4 * kLanes)
      for (int64_t at = j; at < j + 4 * kLanes; at += kLanes) {
        Vec sum = xk * load_vec(row + at);
        if (k > 0) sum += load_vec(acc + at);
        std::memcpy(acc + at, &sum, sizeof sum);
      }
    for (int64_t j = whole; j < n; ++j) acc[j] = (k > 0 ? acc[j] : 0.f) + x[k] * row[j];
  }
}

struct RowMatMulKernel {
  int64_t parts;

  explicit RowMatMulKernel(const OrtKernelInfo* info) {
    try {
      parts = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("parts");
    } catch (const Ort::Exception&) {  // no such attribute
      parts = 1;
    }
    if (parts < 1) throw Ort::Exception("RowMatMul: parts must be at least 1", ORT_FAIL);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] { compute(Ort::KernelContext(context)); });
  }

  // y (..., N) = x (..., K) W (K, N), one row of x after another.
  void compute(Ort::KernelContext ctx) const {
    auto input = ctx.GetInput(0), weight = ctx.GetInput(1);
    std::vector<int64_t> shape = input.GetTensorTypeAndShapeInfo().GetShape();  // (..., K)
    const std::vector<int64_t> w_shape = shape_of(weight, 2, "W");                 // (K, N)
    if (shape.empty() || shape.back() != w_shape[0])
      throw Ort::Exception("RowMatMul: x's last axis must be W's first", ORT_INVALID_ARGUMENT);
    const int64_t K = w_shape[0], N = w_shape[1], rows = leading_rows(shape);
    shape.back() = N;
    const float* x = input.GetTensorData<float>();
    const float* w = weight.GetTensorData<float>();
    float* y = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
    const int64_t count = std::max<int64_t>(1, std::min(parts, K));  // ranges of W's rows
    const int64_t per_part = (K + count - 1) / count;
    const int64_t padded = (N + 15) / 16 * 16;  // an accumulator row: whole cache lines
    float* acc = scratch(kRowMatMulSlot, static_cast<size_t>(count * padded + 16));
    acc += (-(reinterpret_cast<uintptr_t>(acc) / sizeof(float))) % 16;  // on a 64-byte line
    for (int64_t r = 0; r < rows; ++r) {
      parallel_for(ctx, count, K * N, [&](size_t part) {
        const int64_t k0 = static_cast<int64_t>(part) * per_part;
        const int64_t k_rows = std::min(per_part, K - k0);
        float* part_acc = acc + part * padded;
        if (k_rows <= 0) std::fill(part_acc, part_acc + N, 0.f);
        for (int64_t j = 0; j < N && k_rows > 0; j += kRowMatMulColumns)
          accumulate_rows(x + r * K + k0, w + k0 * N + j, k_rows, N,
                          std::min(kRowMatMulColumns, N - j), part_acc + j);
      });
      float* yr = y + r * N;
      std::copy(acc, acc + N, yr);
      for (int64_t p = 1; p < count; ++p)
        for (int64_t j = 0; j < N; ++j) yr[j] += acc[p * padded + j];
    }
  }
};

struct RowMatMulOp : Ort::CustomOpBase<RowMatMulOp, RowMatMulKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new RowMatMulKernel(info); });
  }
  const char* GetName() const { return "RowMatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

}  // namespace mosaic
