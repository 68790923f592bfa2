#pragma once

#include <memory>

#include "engine.hpp"
#include "manifest.hpp"
#include "ops.hpp"

namespace adadiff {

bool tensorrt_compiled();
// Loads the manifest's TensorRT plans; enqueues on ops->stream(). Needs CUDA ops.
std::unique_ptr<Engine> make_tensorrt_engine(const Manifest& m, Ops* ops);

}  // namespace adadiff
