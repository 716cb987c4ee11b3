// mosaic::LayerMemories: every memory of one layer as one native ONNX Runtime CPU kernel. It
// exists only in this library: the runtime puts it in the step graph in place of a layer's
// nodes from its memory projection to out_proj's input (runtime/ort_fusion.py), and the artifact
// keeps the portable nodes (GatedKeyScan, AssociativeMemory and standard ops) for every other
// runtime. What it computes is what those nodes compute (export/builder.py StepGraphBuilder.
// memories): the key scan (scan_keys), the chunk's new pairs (eq. 9), one retrieval per memory
// (retrieve) and the pending key and value.
//
// Inputs (N = heads of all memories, nM*H; P = 2*N*hs + 2*N):
//   0 proj (B, C, P): k~ (N*hs), v~ (N*hs), log g (N), lambda (N) of each token
//   1 valid (B, C) bool   2 t (B, C)   3 new_tau (B, C)
//   4 s (B, N, hs)   5 mx (B, N)   6 k_pend (B, N, hs)   7 v_pend (B, N, hs)
//   8 + 4m .. 11 + 4m: memory m's store_k, store_v (P, H, S, hs; fp32), store_blocks, store_tau
// Attributes: eps (the key scan's), norm_eps (the values' L2 normalization), per head (N floats)
// gamma, one_minus_gamma, alpha_psi, beta0, beta1, alpha, per memory (nM ints) window, delay.
// Outputs: y (B, C, N*hs) out_proj's input; s, mx, k_pend, v_pend as the inputs; new_keys and
// new_values (B, C, N, hs). The runtime binds s, mx, k_pend and v_pend over the inputs 4-7
// themselves (the state updated in place): every input element is read before it is written.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "associative_memory/ort_kernel.h"
#include "gated_key_scan/ort_kernel.h"
#include "ort_common.h"

namespace mosaic {

constexpr size_t kLayerInputs = 8;  // before the memories' 4 inputs each
constexpr size_t kMaxMemories = 2;
// The temporaries of a call, each in its scratch buffer (ort_common.h): the gates and keys of the
// key scan, and one memory's heads of the queries, new pairs and retrievals.
enum ScratchSlot : int {
  kLogGSlot, kLogLamSlot, kKeysSlot, kQuerySlot, kNewKeySlot, kNewValueSlot, kRetrievedSlot
};
static_assert(kRetrievedSlot < kScratchSlots, "a scratch buffer per temporary");

struct LayerMemoriesKernel {
  float eps, norm_eps;
  std::vector<float> gamma, one_minus_gamma, alpha_psi, beta0, beta1, alpha;
  std::vector<int64_t> window, delay;
  bool append;  // write each memory's new pairs into its stores (AssociativeMemory's append)

  LayerMemoriesKernel(const OrtKernelInfo* info, bool append) : append(append) {
    Ort::ConstKernelInfo kernel_info(info);
    eps = kernel_info.GetAttribute<float>("eps");
    norm_eps = kernel_info.GetAttribute<float>("norm_eps");
    gamma = kernel_info.GetAttributes<float>("gamma");
    one_minus_gamma = kernel_info.GetAttributes<float>("one_minus_gamma");
    alpha_psi = kernel_info.GetAttributes<float>("alpha_psi");
    beta0 = kernel_info.GetAttributes<float>("beta0");
    beta1 = kernel_info.GetAttributes<float>("beta1");
    alpha = kernel_info.GetAttributes<float>("alpha");
    window = kernel_info.GetAttributes<int64_t>("window");
    delay = kernel_info.GetAttributes<int64_t>("delay");
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] { compute(context); });
  }

  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto proj = ctx.GetInput(0);
    const auto shape = shape_of(proj, 3, "proj");                   // (B, C, P)
    const auto state = shape_of(ctx.GetInput(4), 3, "s");          // (B, N, hs)
    const int64_t B = shape[0], C = shape[1], P = shape[2], N = state[1], hs = state[2];
    const int64_t nM = static_cast<int64_t>(window.size());
    if (nM < 1 || nM > static_cast<int64_t>(kMaxMemories) || N % nM != 0 ||
        P != 2 * N * hs + 2 * N || static_cast<int64_t>(gamma.size()) != N ||
        ctx.GetInputCount() < kLayerInputs + 4 * window.size())
      throw Ort::Exception("LayerMemories: inputs and attributes disagree on the heads", ORT_FAIL);
    const int64_t H = N / nM;
    const float* x = proj.GetTensorData<float>();
    const bool* valid = ctx.GetInput(1).GetTensorData<bool>();
    const int64_t* t = ctx.GetInput(2).GetTensorData<int64_t>();
    const int64_t* new_tau = ctx.GetInput(3).GetTensorData<int64_t>();
    const float* k_pend = ctx.GetInput(6).GetTensorData<float>();
    const float* v_pend = ctx.GetInput(7).GetTensorData<float>();
    float* y = ctx.GetOutput(0, {B, C, N * hs}).GetTensorMutableData<float>();
    float* k_pend_out = ctx.GetOutput(3, {B, N, hs}).GetTensorMutableData<float>();
    float* v_pend_out = ctx.GetOutput(4, {B, N, hs}).GetTensorMutableData<float>();
    float* new_k = ctx.GetOutput(5, {B, C, N, hs}).GetTensorMutableData<float>();
    float* new_v = ctx.GetOutput(6, {B, C, N, hs}).GetTensorMutableData<float>();

    // The key scan, over k~ inside the projection; its gates as (B, C, N), log lambda = -|lambda|.
    float* log_g = scratch(kLogGSlot, B * C * N);
    float* log_lam = scratch(kLogLamSlot, B * C * N);
    float* keys = scratch(kKeysSlot, B * C * N * hs);
    for (int64_t r = 0; r < B * C; ++r)
      for (int64_t n = 0; n < N; ++n) {
        log_g[r * N + n] = x[r * P + 2 * N * hs + n];
        log_lam[r * N + n] = -std::fabs(x[r * P + 2 * N * hs + N + n]);
      }
    const KeyScanArgs scan{x, P, log_g, log_lam, valid, ctx.GetInput(4).GetTensorData<float>(),
                           ctx.GetInput(5).GetTensorData<float>(), keys,
                           ctx.GetOutput(1, {B, N, hs}).GetTensorMutableData<float>(),
                           ctx.GetOutput(2, {B, N}).GetTensorMutableData<float>()};
    scan_keys(ctx, scan, B, C, N, hs, eps);

    new_pairs(x, keys, k_pend, v_pend, B, C, N, hs, new_k, new_v);
    for (int64_t m = 0; m < nM; ++m) retrieve_memory(ctx, m, keys, new_k, new_v, t,
                                                     new_tau, B, C, H, hs, y);
    // The last real token's key and v~ stay pending (rows of length 0 keep theirs: where the
    // present state is bound over the past, as the runtime binds it, there is nothing to copy).
    for (int64_t b = 0; b < B; ++b) {
      int64_t length = 0;
      while (length < C && valid[b * C + length]) ++length;
      const int64_t row = b * C + std::max<int64_t>(length - 1, 0);
      const float* k_last = length > 0 ? keys + row * N * hs : k_pend + b * N * hs;
      if (k_last != k_pend_out + b * N * hs)
        std::copy(k_last, k_last + N * hs, k_pend_out + b * N * hs);
      for (int64_t n = 0; n < N; ++n) {
        const float* v_last = length > 0 ? x + row * P + N * hs + n * hs
                                         : v_pend + (b * N + n) * hs;
        if (v_last != v_pend_out + (b * N + n) * hs)
          std::copy(v_last, v_last + hs, v_pend_out + (b * N + n) * hs);
      }
    }
  }

  // Pair j of a row: the key of the token before chunk token j (the pending one for j = 0), and
  // alpha_psi * normalize(gamma * v~ before + (1 - gamma) * v~ of token j).
  void new_pairs(const float* x, const float* keys, const float* k_pend, const float* v_pend,
                 int64_t B, int64_t C, int64_t N, int64_t hs, float* new_k, float* new_v) const {
    const int64_t P = 2 * N * hs + 2 * N;
    std::vector<float> mixed(hs);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t n = 0; n < N; ++n) {
          const int64_t at = ((b * C + c) * N + n) * hs;
          const float* k_prev = c > 0 ? keys + at - N * hs : k_pend + (b * N + n) * hs;
          const float* v_prev = c > 0 ? x + (b * C + c - 1) * P + N * hs + n * hs
                                      : v_pend + (b * N + n) * hs;
          const float* v_now = x + (b * C + c) * P + N * hs + n * hs;
          std::copy(k_prev, k_prev + hs, new_k + at);
          float norm2 = 0.f;
          for (int64_t d = 0; d < hs; ++d) {
            mixed[d] = gamma[n] * v_prev[d] + one_minus_gamma[n] * v_now[d];
            norm2 += mixed[d] * mixed[d];
          }
          const float scale = alpha_psi[n] / std::max(std::sqrt(norm2), norm_eps);
          for (int64_t d = 0; d < hs; ++d) new_v[at + d] = mixed[d] * scale;
        }
  }

  // Memory m's heads [m*H, (m+1)*H) of the queries and new pairs, gathered into (B, C, H, hs)
  // (as the step graph's Split gives them to AssociativeMemory), retrieved, and scattered into y.
  void retrieve_memory(const Ort::KernelContext& ctx, int64_t m, const float* keys,
                       const float* new_k, const float* new_v, const int64_t* t,
                       const int64_t* new_tau, int64_t B, int64_t C, int64_t H, int64_t hs,
                       float* y) const {
    const int64_t N = H * static_cast<int64_t>(window.size()), rows = B * C, width = H * hs;
    float* q = scratch(kQuerySlot, rows * width);
    float* k = scratch(kNewKeySlot, rows * width);
    float* v = scratch(kNewValueSlot, rows * width);
    float* out = scratch(kRetrievedSlot, rows * width);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t from = r * N * hs + m * width;
      std::copy(keys + from, keys + from + width, q + r * width);
      std::copy(new_k + from, new_k + from + width, k + r * width);
      std::copy(new_v + from, new_v + from + width, v + r * width);
    }
    const size_t first = kLayerInputs + 4 * static_cast<size_t>(m);
    auto store_k = ctx.GetInput(first), store_v = ctx.GetInput(first + 1);
    auto blocks = ctx.GetInput(first + 2);
    const int64_t* table = blocks.GetTensorData<int64_t>();
    const MemoryShape s = memory_shape({B, C, H, hs}, shape_of(store_k, 4, "store_k"),
                                       shape_of(blocks, 2, "store_blocks"), table);
    const auto type = store_k.GetTensorTypeAndShapeInfo().GetElementType();
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ||
        store_v.GetTensorTypeAndShapeInfo().GetElementType() != type)
      throw Ort::Exception("LayerMemories: stores must be float32", ORT_FAIL);
    const MemoryInputs in{q, t, store_k.GetTensorRawData(), store_v.GetTensorRawData(), table,
                          ctx.GetInput(first + 3).GetTensorData<int64_t>(), k, v, new_tau,
                          beta0.data() + m * H, beta1.data() + m * H, alpha.data() + m * H,
                          nullptr, nullptr};
    retrieve(ctx, in, s, window[m], delay[m], Stores::kFloat, type, append, out);
    for (int64_t r = 0; r < rows; ++r)
      std::copy(out + r * width, out + (r + 1) * width, y + r * N * hs + m * width);
  }
};

struct LayerMemoriesOp : Ort::CustomOpBase<LayerMemoriesOp, LayerMemoriesKernel, true> {
  bool append;
  explicit LayerMemoriesOp(bool append = false) : append(append) {}
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] { *kernel = new LayerMemoriesKernel(info, append); });
  }
  const char* GetName() const { return "LayerMemories"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kLayerInputs + 4 * kMaxMemories; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    if (i == 2 || i == 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    if (i >= kLayerInputs && (i - kLayerInputs) % 4 >= 2)  // store_blocks, store_tau
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < kLayerInputs + 4 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 7; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

}  // namespace mosaic
