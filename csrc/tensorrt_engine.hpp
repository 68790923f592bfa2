#pragma once

#include <memory>

#include "engine.hpp"
#include "manifest.hpp"
#include "ops.hpp"

namespace adadiff {

class MessageLog;

bool tensorrt_compiled();
// getInferLibVersion() of the linked TensorRT (major * 10000 + minor * 100 + patch); 0 without it.
int tensorrt_version();
// The process-wide TensorRT log (warnings and errors; see MessageLog in plan_check.hpp).
MessageLog& tensorrt_log();
// Loads the manifest's TensorRT plans; enqueues on ops->stream(). Needs CUDA ops.
std::unique_ptr<Engine> make_tensorrt_engine(const Manifest& m, Ops* ops);

}  // namespace adadiff
