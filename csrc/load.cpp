// Opening an engines folder: the options against the folder, the memory, the engine, the Runtime.
#include "load.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <utility>

#include "openvino_engine.hpp"
#include "tensorrt_build.hpp"
#include "tensorrt_engine.hpp"

namespace adadiff {

namespace {

[[noreturn]] void invalid(const std::string& what) { throw std::invalid_argument(what); }

void check_device(const std::string& device) {
  if (device != "cpu" && device != "cuda") invalid("device must be 'cpu' or 'cuda', got '" + device + "'");
}

std::unique_ptr<Ops> make_ops(const std::string& device, int device_id) {
  check_device(device);
  return device == "cpu" ? make_cpu_ops() : make_cuda_ops(device_id);
}

// The engine `o` asks for on this folder, after refusing what it cannot honour. A plain ignored
// option is worse than an error: precision="fp32" on fp16 plans would silently run fp16.
std::string choose_engine(const Manifest& m, const RuntimeOptions& o, bool caller_engine) {
  std::string kind = o.engine;
  if (kind == "auto") kind = caller_engine ? "dlpack" : (o.device == "cpu" ? "openvino" : "tensorrt");
  if (kind != "openvino" && kind != "tensorrt" && kind != "dlpack")
    invalid("engine must be 'auto', 'openvino', 'tensorrt' or 'dlpack', got '" + o.engine + "'");
  if (kind == "dlpack" && !caller_engine)
    invalid("engine='dlpack' runs the caller's callables (Python: segments={name: callable})");
  if (kind != "dlpack" && caller_engine)
    invalid("segments= is only used by engine='dlpack' (or 'auto'), not '" + kind + "'");
  if (kind == "openvino" && o.device != "cpu") invalid("engine='openvino' runs on device='cpu' only");
  if (kind == "tensorrt" && o.device != "cuda") invalid("engine='tensorrt' runs on device='cuda' only");
  if (o.build_plans != "auto" && o.build_plans != "never")
    invalid("build_plans must be 'auto' or 'never', got '" + o.build_plans + "'");
  // Known from the manifest alone, so refused before any device is touched (plans_to_build decides
  // the rest, which needs the GPU: another TensorRT version or compute capability).
  if (kind == "tensorrt" && !m.tensorrt.present && o.build_plans == "never")
    throw std::runtime_error("engine='tensorrt': the engines folder has no TensorRT plans (manifest \"tensorrt\" is "
                             "null) and build_plans='never'");
  if (kind != "tensorrt" && o.cuda_graphs.value_or(false))
    invalid("cuda_graphs=True cannot be honoured by engine='" + kind + "': CUDA graphs replay TensorRT plans " +
            "(leave it unset)");
  if (kind != "openvino" && o.threads != 0)
    invalid("threads=" + std::to_string(o.threads) + " cannot be honoured by engine='" + kind +
            "': threads sets OpenVINO's CPU threads (leave it 0)");
  if (!o.precision) return kind;
  const std::string& p = *o.precision;
  if (kind == "openvino" && p != "fp32" && p != "bf16")
    invalid("precision must be 'fp32' or 'bf16' for OpenVINO, got '" + p + "'");
  if (kind == "dlpack")
    invalid("precision='" + p + "' cannot be honoured by engine='dlpack': the callables compute in their own " +
            "precision (leave precision unset)");
  if (kind == "tensorrt") {
    if (!m.tensorrt.present) {
      if (p != "fp32" && p != "fp16" && p != "bf16")
        invalid("precision must be 'fp32', 'fp16' or 'bf16' for the TensorRT plans built here, got '" + p + "'");
    } else if (p != m.tensorrt.precision)
      invalid("precision='" + p + "' cannot be honoured by engine='tensorrt': the folder's plans were built in " +
              m.tensorrt.precision + " (leave precision unset, or rebuild with python -m adadiff_export build " +
              "--precision " + p + ")");
  }
  return kind;
}

// Rows the Runtime's buffers hold with engine `kind` (Runtime's constructor: 2 x max_batch, capped
// by the engine's own largest batch, which for TensorRT is its plans' profile: the plans to be built
// when `build` is given, else the folder's).
int capacity_for(const Manifest& m, const std::string& kind, const std::optional<PlanBuildRequest>& build = {}) {
  const int rows = 2 * m.max_batch;
  if (kind != "tensorrt") return rows;
  if (build) return std::min(rows, build->profile_max);
  return m.tensorrt.present ? std::min(rows, m.tensorrt.profile_max) : rows;
}

// Where plans built on this machine go (RuntimeOptions::cache_dir).
std::string plan_cache_dir(const Manifest& m, const RuntimeOptions& o) {
  if (o.cache_dir) {
    if (o.cache_dir->empty())
      invalid("the TensorRT plans in " + m.dir + " must be built on this machine, and cache_dir='' leaves nowhere " +
              "to keep them: pass a cache_dir, or build_plans='never' to be refused instead");
    return *o.cache_dir;
  }
  if (access(m.dir.c_str(), W_OK) == 0) return m.dir + "/tensorrt_cache";
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  if (xdg && *xdg) return std::string(xdg) + "/adadiff/tensorrt";
  if (home && *home) return std::string(home) + "/.cache/adadiff/tensorrt";
  throw std::runtime_error("TensorRT plans must be built for " + m.dir + ", which is read-only, and neither " +
                           "XDG_CACHE_HOME nor HOME is set: pass cache_dir");
}

// The plans a TensorRT Runtime on `m` runs: the folder's own where they run here; else (build_plans
// 'auto') a request for plans built into the cache, with the folder's profile and precision when it
// has plans, else build's defaults (profile 1 / min(16, max_batch) / 2 x max_batch, fp32).
std::optional<PlanBuildRequest> plans_to_build(const Manifest& m, const RuntimeOptions& o) {
  const std::string problem = tensorrt_plans_problem(m, o.device_id);
  if (problem.empty()) return std::nullopt;
  if (o.build_plans == "never")
    throw std::runtime_error("TensorRT plans in " + m.dir + " cannot run here: " + problem +
                             " (build_plans='never'; 'auto' builds them from the folder's ONNX segments)");
  if (!tensorrt_can_build())
    throw std::runtime_error("TensorRT plans in " + m.dir + " cannot run here (" + problem + ") and this adadiff_rt "
                             "cannot build them (no TensorRT ONNX parser at build time)");
  PlanBuildRequest r;
  r.cache_dir = plan_cache_dir(m, o);
  r.device_id = o.device_id;
  if (m.tensorrt.present) {
    r.precision = m.tensorrt.precision;
    r.profile_min = m.tensorrt.profile_min;
    r.profile_opt = m.tensorrt.profile_opt;
    r.profile_max = m.tensorrt.profile_max;
  } else {
    r.precision = o.precision.value_or("fp32");
    r.profile_min = 1;
    r.profile_opt = std::min(16, m.max_batch);
    r.profile_max = 2 * m.max_batch;
  }
  return r;
}

bool has_maps(const Manifest& m) { return m.segments[1].outputs.size() == 3; }

MemoryCheck memory_check(const ModelDesc& model, int max_batch, int capacity, bool u_map, const Ops& ops) {
  require_memory(model, max_batch, capacity, u_map, ops);
  return MemoryCheck{capacity, Runtime::memory_needed(model, capacity, u_map), ops.free_memory()};
}

// The same for a folder, the message naming the manifest whose max_batch is at fault.
MemoryCheck memory_check(const Manifest& m, int capacity, const Ops& ops) {
  try {
    return memory_check(m.model, m.max_batch, capacity, has_maps(m), ops);
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(m.dir + "/manifest.json: " + e.what());
  }
}

}  // namespace

EnginesCheck check_engines(const std::string& dir, const std::string& device, int device_id) {
  check_device(device);
  EnginesCheck c;
  c.manifest = load_manifest(dir);
  const Manifest& m = c.manifest;
  for (const SegmentDesc& s : m.segments) {
    m.verified_path("segment " + s.name, s.file, s.sha256);
    ++c.files;
  }
  for (const auto& [name, plan] : m.tensorrt.plans) {
    m.verified_path("TensorRT plan of segment " + name, plan.file, plan.sha256);
    ++c.files;
  }
  const std::unique_ptr<Ops> ops = make_ops(device, device_id);
  c.memory = memory_check(m, capacity_for(m, device == "cuda" && m.tensorrt.present ? "tensorrt" : "openvino"), *ops);
  return c;
}

MemoryCheck check_memory(const ModelDesc& model, int64_t max_batch, bool u_map, const std::string& device,
                         int device_id) {
  if (max_batch < 1 || max_batch > 1000000000)  // the manifest's integers stop at 10^9
    invalid("max_batch must be in 1..1000000000, got " + std::to_string(max_batch));
  const std::unique_ptr<Ops> ops = make_ops(device, device_id);
  return memory_check(model, int(max_batch), int(2 * max_batch), u_map, *ops);
}

std::unique_ptr<Runtime> open_runtime(const std::string& dir, const RuntimeOptions& o, const EngineMaker& make_engine) {
  if (o.threads < 0) invalid("threads must be >= 0, got " + std::to_string(o.threads));
  check_device(o.device);
  Manifest m = load_manifest(dir);
  const std::string kind = choose_engine(m, o, bool(make_engine));
  std::unique_ptr<Ops> ops = make_ops(o.device, o.device_id);
  // TensorRT deserializes onto the current device: the Runtime's, for this call only.
  DeviceScope on(*ops);
  // Before anything is built: whether TensorRT plans must be, which fixes the capacity.
  std::optional<PlanBuildRequest> build;
  if (kind == "tensorrt" && tensorrt_compiled()) build = plans_to_build(m, o);
  const int capacity = capacity_for(m, kind, build);
  // Before an engine compiles: OpenVINO's compile takes seconds (TensorRT's plan builds minutes), and
  // the answer does not depend on it.
  memory_check(m, capacity, *ops);
  std::unique_ptr<Engine> engine;
  if (kind == "dlpack") {
    engine = make_engine(m, ops.get(), capacity);
  } else if (kind == "openvino") {
    OpenVinoOptions ov;
    ov.precision = o.precision.value_or("fp32");
    ov.threads = o.threads;
    ov.max_batch = capacity;
    ov.fuse_static = o.fuse_static;
    ov.fuse_exit = o.fuse_exit;
    if (o.cache_dir) {
      ov.cache_dir = *o.cache_dir;
    } else if (access(m.dir.c_str(), W_OK) == 0) {
      ov.cache_dir = m.dir + "/openvino_cache";
    }
    engine = make_openvino_engine(m, ov);
  } else {
    TensorRtOptions trt;
    if (build) trt.plans = tensorrt_cached_plans(m, *build);
    trt.cuda_graphs = o.cuda_graphs.value_or(true);
    engine = make_tensorrt_engine(m, ops.get(), trt);
  }
  return std::make_unique<Runtime>(std::move(m), std::move(ops), std::move(engine));
}

}  // namespace adadiff
