// TensorRT 10 plans on the runtime's CUDA stream. Written against the TensorRT 10 C++ API
// documentation (IRuntime::deserializeCudaEngine, ICudaEngine's I/O and profile queries,
// createExecutionContext(kUSER_MANAGED) + setDeviceMemoryV2 as NVIDIA's demo/Diffusion shares one
// scratch area, IErrorRecorder, enqueueV3). It has NOT run: CI has no TensorRT and no GPU; it is
// compile-checked against the TensorRT 10.9 headers where they are found (scripts/gpu_check.sh runs
// it on a GPU). The rules it applies (plan I/O against the manifest, version and compute
// capability) live in plan_check.cpp and are tested on CPU.
#include "tensorrt_engine.hpp"

#include <stdexcept>
#include <string>

#include "plan_check.hpp"

#ifdef ADADIFF_WITH_TENSORRT
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <utility>
#include <vector>
#endif

namespace adadiff {

MessageLog& tensorrt_log() {
  static MessageLog log(/*echo=*/true);
  return log;
}

#ifndef ADADIFF_WITH_TENSORRT

bool tensorrt_compiled() { return false; }
int tensorrt_version() { return 0; }
std::unique_ptr<Engine> make_tensorrt_engine(const Manifest&, Ops*) {
  throw std::runtime_error(
      "engine='tensorrt': this adadiff_rt was built without TensorRT (NvInfer.h / libnvinfer not found at build "
      "time); on device='cuda' pass segments={...} to use Python callables (engine='dlpack') instead");
}

#else

bool tensorrt_compiled() { return true; }
int tensorrt_version() { return getInferLibVersion(); }

namespace {

// The one logger of the process: TensorRT keeps the first ILogger it is given for the process, so
// a per-Runtime logger would outlive its Runtime inside TensorRT. MessageLog locks.
class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override { tensorrt_log().add(int(severity), msg); }
};

Logger& logger() {
  static Logger l;
  return l;
}

// Errors of this engine's TensorRT objects (the runtime hands it to the engines and contexts it
// creates). Cleared before every call, so the message raised is that call's.
class Recorder final : public nvinfer1::IErrorRecorder {
 public:
  int32_t getNbErrors() const noexcept override { return errors.size(); }
  nvinfer1::ErrorCode getErrorCode(int32_t i) const noexcept override {
    return static_cast<nvinfer1::ErrorCode>(errors.code(i));
  }
  ErrorDesc getErrorDesc(int32_t i) const noexcept override { return errors.desc(i); }
  bool hasOverflowed() const noexcept override { return errors.overflowed(); }
  void clear() noexcept override { errors.clear(); }
  bool reportError(nvinfer1::ErrorCode code, ErrorDesc desc) noexcept override {
    errors.add(int(code), desc);
    return false;  // not fatal to TensorRT: the call returns its failure and we throw
  }
  RefCount incRefCount() noexcept override { return ++refs_; }
  RefCount decRefCount() noexcept override { return --refs_; }
  ErrorList errors;

 private:
  std::atomic<int32_t> refs_{0};
};

std::string dtype_str(nvinfer1::DataType d) {
  switch (d) {
    case nvinfer1::DataType::kFLOAT: return "float32";
    case nvinfer1::DataType::kHALF: return "float16";
    case nvinfer1::DataType::kBF16: return "bfloat16";
    case nvinfer1::DataType::kINT64: return "int64";
    case nvinfer1::DataType::kINT32: return "int32";
    case nvinfer1::DataType::kINT8: return "int8";
    case nvinfer1::DataType::kUINT8: return "uint8";
    case nvinfer1::DataType::kBOOL: return "bool";
    case nvinfer1::DataType::kFP8: return "fp8";
    default: return "TensorRT type " + std::to_string(int(d));
  }
}

std::vector<int64_t> dims(const nvinfer1::Dims& d) {
  return d.nbDims < 0 ? std::vector<int64_t>{} : std::vector<int64_t>(d.d, d.d + d.nbDims);
}

// The plan's I/O as plan_check sees it: every tensor the plan has, found by index, so a name the
// manifest does not know is seen (a lookup by the manifest's names alone would miss it).
PlanInfo plan_info(const nvinfer1::ICudaEngine& e) {
  PlanInfo p;
  p.profiles = e.getNbOptimizationProfiles();
  for (int32_t i = 0; i < e.getNbIOTensors(); ++i) {
    const char* n = e.getIOTensorName(i);
    PlanTensor t;
    t.name = n;
    t.input = e.getTensorIOMode(n) == nvinfer1::TensorIOMode::kINPUT;
    t.dtype = dtype_str(e.getTensorDataType(n));
    t.shape = dims(e.getTensorShape(n));
    if (t.input && p.profiles > 0) {
      t.min = dims(e.getProfileShape(n, 0, nvinfer1::OptProfileSelector::kMIN));
      t.opt = dims(e.getProfileShape(n, 0, nvinfer1::OptProfileSelector::kOPT));
      t.max = dims(e.getProfileShape(n, 0, nvinfer1::OptProfileSelector::kMAX));
    }
    p.tensors.push_back(std::move(t));
  }
  return p;
}

struct Plan {
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  // What the context was last given: shapes and addresses are set only when they change, since
  // the chained loop calls each segment with the same buffers step after step.
  int batch = -1;
  std::vector<void*> bound;  // inputs then outputs, manifest order
};

class TensorRtEngine final : public Engine {
 public:
  TensorRtEngine(const Manifest& m, Ops* ops) : m_(m), ops_(ops), plans_(m.segments.size()) {
    if (!ops->is_cuda()) throw std::invalid_argument("engine='tensorrt' needs device='cuda'");
    if (!m.tensorrt.present)
      throw std::runtime_error("engine='tensorrt': the engines folder has no TensorRT plans (manifest \"tensorrt\" is null)");
    check_target();
    runtime_.reset(nvinfer1::createInferRuntime(logger()));
    if (!runtime_) throw std::runtime_error("TensorRT: createInferRuntime failed: " + last_error("no error recorded"));
    runtime_->setErrorRecorder(&recorder_);  // inherited by the engines and contexts it creates
    int64_t scratch = 0;
    for (size_t i = 0; i < m.segments.size(); ++i) {
      const SegmentDesc& s = m.segments[i];
      auto it = m.tensorrt.plans.find(s.name);
      if (it == m.tensorrt.plans.end()) {
        if (s.kind == "full") continue;  // the baseline is optional for a runtime
        throw std::runtime_error("manifest.json: tensorrt.plans has no plan for segment " + s.name);
      }
      load(int(i), it->second);
      scratch = std::max(scratch, plans_[i].engine->getDeviceMemorySizeV2());
    }
    // Segments run one after another on one stream, so one scratch area serves every context
    // (each allocating its own would hold ~16 times the memory).
    scratch_ = Buffer(ops_, size_t(std::max<int64_t>(scratch, 1)));
    recorder_.clear();
    for (Plan& p : plans_)
      if (p.context) p.context->setDeviceMemoryV2(scratch_.as(), scratch);  // void: failures reach the recorder
    if (recorder_.getNbErrors() > 0) throw std::runtime_error("TensorRT: setDeviceMemoryV2 failed: " + last_error(""));
  }

  ~TensorRtEngine() override {
    // Contexts and engines first (they hold the recorder), then the runtime.
    plans_.clear();
    runtime_.reset();
  }

  std::string name() const override { return "tensorrt"; }
  int max_batch() const override { return m_.tensorrt.profile_max; }

  void run(int seg, int batch, void* const* in, void* const* out) override {
    const SegmentDesc& s = m_.segments[seg];
    Plan& p = plans_[seg];
    if (!p.context) throw std::runtime_error("TensorRT: no plan for segment " + s.name);
    if (batch < m_.tensorrt.profile_min || batch > m_.tensorrt.profile_max)
      throw std::runtime_error("TensorRT: segment " + s.name + ": batch " + std::to_string(batch) +
                               " is outside the plan's profile " + std::to_string(m_.tensorrt.profile_min) + ".." +
                               std::to_string(m_.tensorrt.profile_max));
    recorder_.clear();
    if (batch != p.batch) {
      p.batch = -1;  // a failure half way leaves shapes unknown
      for (const TensorDesc& t : s.inputs) {
        nvinfer1::Dims d{};
        d.nbDims = int32_t(t.shape.size());
        d.d[0] = batch;
        for (size_t k = 1; k < t.shape.size(); ++k) d.d[k] = t.shape[k];
        if (!p.context->setInputShape(t.name.c_str(), d)) fail(s, "setInputShape(" + t.name + ", " + t.shape_str(batch) + ")");
      }
      p.batch = batch;
    }
    // Chaining: segment k's output buffer is bound as segment k+1's input address, no copies.
    const size_t n_in = s.inputs.size();
    for (size_t i = 0; i < n_in + s.outputs.size(); ++i) {
      void* ptr = i < n_in ? in[i] : out[i - n_in];
      if (p.bound[i] == ptr) continue;
      const std::string& name = i < n_in ? s.inputs[i].name : s.outputs[i - n_in].name;
      p.bound[i] = nullptr;
      if (!p.context->setTensorAddress(name.c_str(), ptr)) fail(s, "setTensorAddress(" + name + ")");
      p.bound[i] = ptr;
    }
    if (!p.context->enqueueV3(static_cast<cudaStream_t>(ops_->stream()))) fail(s, "enqueueV3");
  }

 private:
  std::string last_error(const std::string& fallback) const { return recorder_.errors.message(fallback); }

  [[noreturn]] void fail(const SegmentDesc& s, const std::string& call) const {
    throw std::runtime_error("TensorRT: segment " + s.name + ": " + call + " failed: " +
                             last_error("TensorRT recorded no error for this call"));
  }

  // Before any plan is read: a plan from another TensorRT version or GPU fails deep inside
  // deserializeCudaEngine (or worse, not at all until a kernel is missing); say so up front.
  void check_target() const {
    cudaDeviceProp prop{};
    const cudaError_t e = cudaGetDeviceProperties(&prop, ops_->device_id());
    if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA: cudaGetDeviceProperties: ") + cudaGetErrorString(e));
    const std::string problem = plan_target_problem(m_.tensorrt, getInferLibVersion(), prop.major, prop.minor);
    if (!problem.empty())
      throw std::runtime_error("TensorRT plans in " + m_.dir + " cannot run here: " + problem + " (GPU " + prop.name +
                               "). Build them on this machine: run trtexec.sh in the folder and then python -m "
                               "adadiff_export register-plans " + m_.dir + ", or python -m adadiff_export build --tensorrt on");
  }

  void load(int seg, const PlanDesc& plan) {
    const SegmentDesc& s = m_.segments[seg];
    const std::string path = m_.verified_path("TensorRT plan of segment " + s.name, plan.file, plan.sha256);
    // One sized read: plans run to gigabytes, which a character-by-character iterator crawls through.
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    std::vector<char> blob(f ? size_t(f.tellg()) : 0);
    if (!f || !f.seekg(0).read(blob.data(), std::streamsize(blob.size())))
      throw std::runtime_error("TensorRT: cannot read " + path);
    Plan& p = plans_[seg];
    recorder_.clear();
    p.engine.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!p.engine)
      throw std::runtime_error("TensorRT: cannot deserialize " + plan.file + " (built by TensorRT " + m_.tensorrt.version +
                               " for " + m_.tensorrt.gpu_arch + "): " + last_error("no error recorded"));
    check_plan(s, m_.tensorrt, plan_info(*p.engine), plan.file);
    p.context.reset(p.engine->createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy::kUSER_MANAGED));
    if (!p.context)
      throw std::runtime_error("TensorRT: createExecutionContext failed for " + s.name + ": " + last_error("no error recorded"));
    p.bound.assign(s.inputs.size() + s.outputs.size(), nullptr);
  }

  Manifest m_;
  Ops* ops_;
  Recorder recorder_;  // declared before the TensorRT objects: outlives them
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::vector<Plan> plans_;
  Buffer scratch_;  // the destructor drops the contexts before this is freed
};

}  // namespace

std::unique_ptr<Engine> make_tensorrt_engine(const Manifest& m, Ops* ops) {
  return std::make_unique<TensorRtEngine>(m, ops);
}

#endif

}  // namespace adadiff
