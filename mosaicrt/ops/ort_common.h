// What the native ONNX Runtime kernels of the mosaic ops share: the memory geometry (written from
// mosaicrt/ops/geometry.py), errors as OrtStatus, shapes, and ONNX Runtime's thread pool.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <type_traits>
#include <vector>

namespace mosaic {

// A score no visible pair can have (finite, so fast-math code never meets an infinity).
constexpr float kNoScore = -1e30f;

// The window of a memory without one (geometry.NO_WINDOW); a memory with a window keeps its pairs
// in a ring of window - 1 slots.
constexpr int64_t kNoWindow = 2147483647;

// NaN by its bits: the kernels are compiled with -ffast-math, under which std::isnan may be
// assumed false.
inline bool is_nan(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7fffffffu) > 0x7f800000u;
}

// NaN or an infinity, by its bits too.
inline bool not_finite(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x7f800000u) == 0x7f800000u;
}

// Is pair tau in S(t)? tau < 0 marks an empty slot (geometry.visible).
inline bool visible(int64_t t, int64_t tau, int64_t window, int64_t delay) {
  const int64_t age = t - tau;
  return tau >= 0 && age >= delay && age <= window - 1;
}

// n_t = |S(t)| = max(0, min(t - delay + 1, window - delay)) (geometry.visible_count).
inline int64_t visible_count(int64_t t, int64_t window, int64_t delay) {
  const int64_t n = t - delay + 1;
  return n < 0 ? 0 : (n > window - delay ? window - delay : n);
}

// `n` floats of the calling thread's scratch buffer `slot` (< kScratchSlots), kept from call to
// call, holding whatever the last call left: a prefill chunk's temporaries are tens of MB, and
// fresh ones were faulted in (and zeroed by the OS) at every call, 14-17 % of a prefill step of
// 8 x 512 tokens. The buffers keep the largest call's size, on each thread that runs a session.
constexpr int kScratchSlots = 8;
inline float* scratch(int slot, size_t n) {
  thread_local std::vector<float> buffers[kScratchSlots];
  std::vector<float>& buffer = buffers[slot];
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// Runs f, turning an exception into the OrtStatus ONNX Runtime reports for the node.
template <typename F>
OrtStatusPtr guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
}

// The shape of an input, which must have `rank` dimensions.
inline std::vector<int64_t> shape_of(const Ort::ConstValue& value, size_t rank, const char* name) {
  auto shape = value.GetTensorTypeAndShapeInfo().GetShape();
  if (shape.size() != rank)
    throw Ort::Exception(std::string("mosaic op: input ") + name + " must have rank " +
                             std::to_string(rank),
                         ORT_INVALID_ARGUMENT);
  return shape;
}

// The rows of a (..., n) tensor: the product of its shape's leading dimensions.
inline int64_t leading_rows(const std::vector<int64_t>& shape) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  return rows;
}

// The kernel of a stateless op: ComputeV2 runs compute(ctx), an exception becoming the node's
// error status.
template <void (*compute)(Ort::KernelContext&)>
struct FunctionKernel {
  explicit FunctionKernel(const OrtKernelInfo*) {}
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      compute(ctx);
    });
  }
};

// The custom op of a stateless kernel that maps one fp32 tensor to one of type `Out` on the CPU
// (SwiGLU, RowScan), compute(ctx) run per call.
template <void (*compute)(Ort::KernelContext&), ONNXTensorElementDataType Out>
struct OneInputOp : Ort::CustomOpBase<OneInputOp<compute, Out>, FunctionKernel<compute>, true> {
  const char* name;
  explicit OneInputOp(const char* name) : name(name) {}
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new FunctionKernel<compute>(info); });
  }
  const char* GetName() const { return name; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return Out; }
};

// f(i) for i in [0, total) on ONNX Runtime's intra-op pool; inline when the work (about `cost`
// multiply-adds in all) is too small to pay for waking the pool.
template <typename F>
void parallel_for(const Ort::KernelContext& ctx, int64_t total, int64_t cost, F&& f) {
  using Fn = std::remove_reference_t<F>;
  if (total <= 1 || cost < (1 << 15)) {
    for (int64_t i = 0; i < total; ++i) f(static_cast<size_t>(i));
    return;
  }
  auto call = [](void* data, size_t i) { (*static_cast<Fn*>(data))(i); };
  ctx.ParallelFor(call, static_cast<size_t>(total), 0, const_cast<Fn*>(&f));
}

}  // namespace mosaic
