#pragma once

#include <memory>
#include <optional>

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
struct TensorRtOptions {
  // The plans to run: unset, the manifest's (files in the folder, with their sha256); set, plans
  // built on this machine (tensorrt_build.hpp: absolute paths into the plan cache).
  std::optional<TensorRtDesc> plans;
  // Each plan's enqueue replayed as a CUDA graph, captured after one plain run per batch and set
  // of tensor addresses.
  bool cuda_graphs = true;
};

// Loads the TensorRT plans; enqueues on ops->stream(). Needs CUDA ops.
std::unique_ptr<Engine> make_tensorrt_engine(const Manifest& m, Ops* ops, const TensorRtOptions& o = {});

}  // namespace adadiff
