// The native ONNX Runtime library of the mosaic ops: every op's CPU kernel, registered in the
// "mosaic" domain. A session that registers it (SessionOptions.register_custom_ops_library) runs
// these kernels; one that does not inlines the ops' ONNX function bodies instead.
#include "associative_memory/ort_kernel.h"
#include "gated_key_scan/ort_kernel.h"

namespace {
mosaic::GatedKeyScanOp gated_key_scan_op;
mosaic::AssociativeMemoryOp associative_memory_op;
mosaic::AssociativeMemoryInt8Op associative_memory_int8_op;
mosaic::AssociativeMemoryFp8Op associative_memory_fp8_op;
}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  return mosaic::guarded([&] {
    static Ort::CustomOpDomain domain{"mosaic"};  // must outlive every session that uses it
    static bool filled = false;
    if (!filled) {
      domain.Add(&gated_key_scan_op);
      domain.Add(&associative_memory_op);
      domain.Add(&associative_memory_int8_op);
      domain.Add(&associative_memory_fp8_op);
      filled = true;
    }
    Ort::UnownedSessionOptions(options).Add(domain);
  });
}
