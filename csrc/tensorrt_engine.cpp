// TensorRT 10 plans on the runtime's CUDA stream. Written against the TensorRT 10 C++ API
// documentation (IRuntime::deserializeCudaEngine, ICudaEngine::getProfileShape,
// IExecutionContext::setInputShape / setTensorAddress / enqueueV3); it has NOT run in our CI (no
// TensorRT there; it compiles against the TensorRT 10.9 headers).
#include "tensorrt_engine.hpp"

#include <stdexcept>
#include <string>

#ifdef ADADIFF_WITH_TENSORRT
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <fstream>
#include <utility>
#include <vector>
#endif

namespace adadiff {

#ifndef ADADIFF_WITH_TENSORRT

bool tensorrt_compiled() { return false; }
std::unique_ptr<Engine> make_tensorrt_engine(const Manifest&, Ops*) {
  throw std::runtime_error(
      "engine='tensorrt': this adadiff_rt was built without TensorRT (NvInfer.h / libnvinfer not found at build "
      "time); on device='cuda' pass segments={...} to use Python callables (engine='dlpack') instead");
}

#else

bool tensorrt_compiled() { return true; }

namespace {

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) last_error = msg ? msg : "";
  }
  std::string last_error;
};

nvinfer1::DataType trt_type(DType d) {
  switch (d) {
    case DType::Float32: return nvinfer1::DataType::kFLOAT;
    case DType::Float16: return nvinfer1::DataType::kHALF;
    case DType::BFloat16: return nvinfer1::DataType::kBF16;
    case DType::Int64: return nvinfer1::DataType::kINT64;
  }
  return nvinfer1::DataType::kFLOAT;
}

struct Plan {
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
};

class TensorRtEngine final : public Engine {
 public:
  TensorRtEngine(const Manifest& m, Ops* ops) : m_(m), ops_(ops), plans_(m.segments.size()) {
    if (!ops->is_cuda()) throw std::invalid_argument("engine='tensorrt' needs device='cuda'");
    if (!m.tensorrt.present)
      throw std::runtime_error("engine='tensorrt': the engines folder has no TensorRT plans (manifest \"tensorrt\" is null)");
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw std::runtime_error("TensorRT: createInferRuntime failed");
    for (size_t i = 0; i < m.segments.size(); ++i) {
      const SegmentDesc& s = m.segments[i];
      auto it = m.tensorrt.plans.find(s.name);
      if (it == m.tensorrt.plans.end()) {
        if (s.kind == "full") continue;  // the baseline is optional for a runtime
        throw std::runtime_error("manifest.json: tensorrt.plans has no plan for segment " + s.name);
      }
      load(int(i), it->second);
    }
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
    for (size_t i = 0; i < s.inputs.size(); ++i) {
      const TensorDesc& t = s.inputs[i];
      nvinfer1::Dims d{};
      d.nbDims = int32_t(t.shape.size());
      d.d[0] = batch;
      for (size_t k = 1; k < t.shape.size(); ++k) d.d[k] = t.shape[k];
      if (!p.context->setInputShape(t.name.c_str(), d))
        fail(s, "setInputShape(" + t.name + ", " + t.shape_str(batch) + ")");
      // Chaining: segment k's output buffer is bound as segment k+1's input address, no copies.
      if (!p.context->setTensorAddress(t.name.c_str(), in[i])) fail(s, "setTensorAddress(" + t.name + ")");
    }
    for (size_t i = 0; i < s.outputs.size(); ++i)
      if (!p.context->setTensorAddress(s.outputs[i].name.c_str(), out[i]))
        fail(s, "setTensorAddress(" + s.outputs[i].name + ")");
    if (!p.context->enqueueV3(static_cast<cudaStream_t>(ops_->stream()))) fail(s, "enqueueV3");
  }

 private:
  [[noreturn]] void fail(const SegmentDesc& s, const std::string& call) const {
    throw std::runtime_error("TensorRT: segment " + s.name + ": " + call + " failed: " + logger_.last_error);
  }

  // The plan's optimization profile must be the one manifest.json records (tensorrt.profile): the
  // runtime trusts its min/max for the batches it sends, and opt tells which batch the kernels were
  // chosen for; a mismatch means the plan and the manifest come from different builds.
  void check_profile(const Plan& p, const SegmentDesc& s, const PlanDesc& plan) const {
    if (p.engine->getNbOptimizationProfiles() < 1)
      throw std::runtime_error("TensorRT: " + plan.file + " has no optimization profile (the batch is dynamic)");
    const TensorRtDesc& t = m_.tensorrt;
    const std::pair<nvinfer1::OptProfileSelector, int> want[] = {{nvinfer1::OptProfileSelector::kMIN, t.profile_min},
                                                                  {nvinfer1::OptProfileSelector::kOPT, t.profile_opt},
                                                                  {nvinfer1::OptProfileSelector::kMAX, t.profile_max}};
    const char* names[] = {"min", "opt", "max"};
    const std::string& input = s.inputs.at(0).name;
    for (int k = 0; k < 3; ++k) {
      const nvinfer1::Dims d = p.engine->getProfileShape(input.c_str(), 0, want[k].first);
      if (d.nbDims < 1 || d.d[0] != want[k].second)
        throw std::runtime_error("TensorRT: " + plan.file + ": its profile's " + names[k] + " batch is " +
                                 (d.nbDims < 1 ? std::string("undefined") : std::to_string(d.d[0])) +
                                 ", manifest.json's tensorrt.profile." + names[k] + " is " +
                                 std::to_string(want[k].second) + " (the plan and the manifest come from different builds)");
    }
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
    p.engine.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!p.engine)
      throw std::runtime_error("TensorRT: cannot deserialize " + plan.file + ": manifest.json says the plans were built by TensorRT " +
                               m_.tensorrt.version + " for " + (m_.tensorrt.gpu_arch.empty() ? "an unrecorded GPU" : m_.tensorrt.gpu_arch) +
                               ", and a plan runs only with that TensorRT version on that GPU architecture (this is TensorRT " +
                               std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) + "): " +
                               logger_.last_error);
    for (const auto* list : {&s.inputs, &s.outputs})
      for (const TensorDesc& t : *list)
        if (p.engine->getTensorDataType(t.name.c_str()) != trt_type(t.dtype))
          throw std::runtime_error("TensorRT: " + plan.file + ": tensor " + t.name + " has another dtype than the manifest's " +
                                   dtype_name(t.dtype));
    check_profile(p, s, plan);
    p.context.reset(p.engine->createExecutionContext());
    if (!p.context) throw std::runtime_error("TensorRT: createExecutionContext failed for " + s.name);
  }

  Manifest m_;
  Ops* ops_;
  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;  // declared before plans_: destroyed after them
  std::vector<Plan> plans_;
};

}  // namespace

std::unique_ptr<Engine> make_tensorrt_engine(const Manifest& m, Ops* ops) {
  return std::make_unique<TensorRtEngine>(m, ops);
}

#endif

}  // namespace adadiff
