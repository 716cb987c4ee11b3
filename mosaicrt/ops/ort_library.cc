// The native ONNX Runtime library of the mosaic ops: every op's CPU kernel, registered in the
// "mosaic" domain. A session that registers it (SessionOptions.register_custom_ops_library) runs
// these kernels; one that does not inlines the ops' ONNX function bodies instead.
//
// A session whose options hold the config entry kAppendPairs = "1" (the runtime's, which binds the
// stores in place: mosaicrt/ops/ort_library.py APPEND_PAIRS) gets the AssociativeMemory kernel that
// also writes each step's new pairs into its fp32/fp16 stores (append_pairs); any other session
// gets the one that only reads them. The same holds for LayerMemories, which the runtime puts in
// a step graph in place of each layer's memory nodes, SwiGLU, which it puts in place of each
// feed-forward's activation, and RowScan, which it adds after a last-only graph's logits
// (runtime/ort_fusion.py). RowMatMul, a one-row product that streams its weight, is for the
// benchmarks (bench/read_rates.py).
#include <string>

#include "associative_memory/ort_kernel.h"
#include "gated_key_scan/ort_kernel.h"
#include "ort_layer_memories.h"
#include "ort_row_matmul.h"
#include "ort_row_scan.h"
#include "ort_swiglu.h"

namespace {
constexpr const char* kAppendPairs = "mosaic.append_pairs";
mosaic::GatedKeyScanOp gated_key_scan_op;
mosaic::AssociativeMemoryOp associative_memory_op;
mosaic::AssociativeMemoryOp appending_memory_op{true};
mosaic::AssociativeMemoryInt8Op associative_memory_int8_op;
mosaic::AssociativeMemoryFp8Op associative_memory_fp8_op;
mosaic::LayerMemoriesOp layer_memories_op;
mosaic::LayerMemoriesOp appending_layer_memories_op{true};
mosaic::SwiGLUOp swiglu_op{"SwiGLU"};
mosaic::RowScanOp row_scan_op{"RowScan"};
mosaic::RowMatMulOp row_matmul_op;

// The "mosaic" domain with the reading or the appending AssociativeMemory kernel (built once: a
// domain must outlive every session that uses it).
Ort::CustomOpDomain& domain(bool append) {
  static Ort::CustomOpDomain* domains[2] = {nullptr, nullptr};
  Ort::CustomOpDomain*& found = domains[append];
  if (found == nullptr) {
    found = new Ort::CustomOpDomain("mosaic");
    found->Add(&gated_key_scan_op);
    found->Add(append ? &appending_memory_op : &associative_memory_op);
    found->Add(&associative_memory_int8_op);
    found->Add(&associative_memory_fp8_op);
    found->Add(append ? &appending_layer_memories_op : &layer_memories_op);
    found->Add(&swiglu_op);
    found->Add(&row_scan_op);
    found->Add(&row_matmul_op);
  }
  return *found;
}
}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  return mosaic::guarded([&] {
    Ort::UnownedSessionOptions session(options);
    const bool append = session.GetConfigEntryOrDefault(kAppendPairs, "0") == "1";
    session.Add(domain(append));
  });
}
