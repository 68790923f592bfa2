// Opening an engines folder: the C++ entry point (the Python module's Runtime(...) is a thin layer
// over it). Installed as <adadiff/load.hpp>; examples/cpp/sample.cpp shows the whole path.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "engine.hpp"
#include "manifest.hpp"
#include "ops.hpp"
#include "runtime.hpp"

namespace adadiff {

struct RuntimeOptions {
  std::string device = "cpu";   // "cpu" | "cuda"
  int device_id = 0;            // cuda: which GPU
  // "auto" (OpenVINO on cpu, TensorRT on cuda; "dlpack" when a caller's engine is given),
  // "openvino", "tensorrt", or "dlpack" (the caller's engine, see EngineMaker).
  std::string engine = "auto";
  // Unset: the engine's own (OpenVINO fp32, TensorRT its plans'). OpenVINO takes "fp32" or "bf16";
  // TensorRT only the precision its plans were built in; a caller's engine none (it chooses).
  std::optional<std::string> precision;
  int threads = 0;  // OpenVINO's CPU threads (0: its default); the other engines have none and take 0
  // OpenVINO's compiled-model cache and TensorRT's plan cache (plans built here, build_plans).
  // Unset: <dir>/openvino_cache or <dir>/tensorrt_cache where the folder is writable, else (TensorRT)
  // $XDG_CACHE_HOME/adadiff/tensorrt or ~/.cache/adadiff/tensorrt; "": none (TensorRT then cannot build).
  std::optional<std::string> cache_dir;
  // TensorRT: "auto" builds plans from the folder's ONNX segments into the plan cache when the
  // folder's own are missing or were built for another TensorRT version or GPU (minutes, once per
  // machine); "never" refuses such a folder. Other engines ignore it (they build nothing).
  std::string build_plans = "auto";
  // TensorRT: replay each plan's enqueue as a CUDA graph (unset: yes). true with another engine is refused.
  std::optional<bool> cuda_graphs;
  bool fuse_static = true;  // OpenVINO: see OpenVinoOptions
  bool fuse_exit = true;
};

// An engine the caller brings (the Python module's callables over DLPack), made once the manifest
// and the device are known; `capacity` is the most rows one run gets.
using EngineMaker = std::function<std::unique_ptr<Engine>(const Manifest& m, Ops* ops, int capacity)>;

struct MemoryCheck {
  int capacity = 0;     // rows a Runtime's buffers hold (2 x max_batch, but for TensorRT its plans' profile)
  uint64_t needed = 0;  // bytes of those buffers
  FreeMemory free;      // what the device has free
};

struct EnginesCheck {
  Manifest manifest;
  int files = 0;  // files checked (plain name, real path inside the folder, sha256)
  MemoryCheck memory;
};

// What loading `dir` checks before any engine compiles, without compiling: the manifest (schema,
// version, wiring against the model config, exit defaults), every file it names (the ONNX segments
// and the TensorRT plans), and the memory the Runtime's buffers would take on `device` ("cpu":
// the host; "cuda": GPU `device_id`). Throws naming what is wrong. `python -m adadiff_export
// verify` runs it, so verify and the runtime refuse the same folders.
EnginesCheck check_engines(const std::string& dir, const std::string& device = "cpu", int device_id = 0);

// The memory a Runtime for `model`, built for `max_batch` (1..10^9), needs on `device`
// (2 x max_batch rows, as OpenVINO and the callables run), against what is free there; throws as
// require_memory does when it does not fit. `build --max-batch` asks it before a folder exists.
MemoryCheck check_memory(const ModelDesc& model, int64_t max_batch, bool u_map, const std::string& device = "cpu",
                         int device_id = 0);

// Loads `dir` for inference: the options checked against the folder (an option the chosen engine
// cannot honour is refused, not ignored), the memory checked, then the engine (compiled from the
// folder, or `make_engine`'s) and the Runtime. Throws std::invalid_argument for a bad option and
// std::runtime_error for a folder, file, device or memory problem, each naming it.
std::unique_ptr<Runtime> open_runtime(const std::string& dir, const RuntimeOptions& options = {},
                                      const EngineMaker& make_engine = nullptr);

}  // namespace adadiff
