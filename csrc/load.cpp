// Opening an engines folder: the options against the folder, the memory, the engine, the Runtime.
#include "load.hpp"

#include <unistd.h>

#include <algorithm>
#include <stdexcept>
#include <utility>

#include "openvino_engine.hpp"
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
    if (!m.tensorrt.present)
      throw std::runtime_error("engine='tensorrt': the engines folder has no TensorRT plans (manifest \"tensorrt\" is null)");
    if (p != m.tensorrt.precision)
      invalid("precision='" + p + "' cannot be honoured by engine='tensorrt': the folder's plans were built in " +
              m.tensorrt.precision + " (leave precision unset, or rebuild with python -m adadiff_export build " +
              "--precision " + p + ")");
  }
  return kind;
}

// Rows the Runtime's buffers hold with engine `kind` (Runtime's constructor: 2 x max_batch, capped
// by the engine's own largest batch, which for TensorRT is its plans' profile).
int capacity_for(const Manifest& m, const std::string& kind) {
  const int rows = 2 * m.max_batch;
  return kind == "tensorrt" && m.tensorrt.present ? std::min(rows, m.tensorrt.profile_max) : rows;
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
  const int capacity = capacity_for(m, kind);
  // Before an engine compiles: OpenVINO's compile takes seconds, and the answer does not depend on it.
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
    engine = make_tensorrt_engine(m, ops.get());
  }
  return std::make_unique<Runtime>(std::move(m), std::move(ops), std::move(engine));
}

}  // namespace adadiff
