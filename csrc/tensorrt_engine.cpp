// TensorRT 10 plans on the runtime's CUDA stream. Written against the TensorRT 10 C++ API
// documentation (IRuntime::deserializeCudaEngine, ICudaEngine's I/O and profile queries,
// createExecutionContext(kUSER_MANAGED) + setDeviceMemoryV2 as NVIDIA's demo/Diffusion shares one
// scratch area, IErrorRecorder, enqueueV3). It has NOT run: CI has no TensorRT and no GPU; it is
// compile-checked against the TensorRT 10.9 headers where they are found (scripts/gpu_check.sh runs
// it on a GPU). The rules it applies (plan I/O against the manifest, version and compute
// capability) live in plan_check.cpp and are tested on CPU. CUDA graphs: each plan's enqueueV3 is
// captured once per (batch, tensor addresses) after one plain run with them (TensorRT's own advice:
// the first enqueue after a shape change does work a capture must not see) and replayed after; the
// chained loop binds the same few buffers step after step, so a handful of graphs per plan serve a
// whole sampling run. A capture TensorRT refuses turns graphs off for that plan, with a warning.
#include "tensorrt_engine.hpp"

#include <stdexcept>
#include <string>

#include "plan_check.hpp"

#ifdef ADADIFF_WITH_TENSORRT
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "tensorrt_common.hpp"
#endif

namespace adadiff {

MessageLog& tensorrt_log() {
  static MessageLog log(/*echo=*/true);
  return log;
}

#ifndef ADADIFF_WITH_TENSORRT

bool tensorrt_compiled() { return false; }
int tensorrt_version() { return 0; }
std::unique_ptr<Engine> make_tensorrt_engine(const Manifest&, Ops*, const TensorRtOptions&) {
  throw std::runtime_error(
      "engine='tensorrt': this adadiff_rt was built without TensorRT (NvInfer.h / libnvinfer not found at build "
      "time); on device='cuda' pass segments={...} to use Python callables (engine='dlpack') instead");
}

#else

bool tensorrt_compiled() { return true; }
int tensorrt_version() { return getInferLibVersion(); }

namespace trt {

namespace {
class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override { tensorrt_log().add(int(severity), msg); }
};
}  // namespace

nvinfer1::ILogger& logger() {
  static Logger l;
  return l;
}

std::string version_string() {
  const int v = getInferLibVersion();
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

Gpu gpu(int device_id) {
  cudaDeviceProp prop{};
  const cudaError_t e = cudaGetDeviceProperties(&prop, device_id);
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA: cudaGetDeviceProperties: ") + cudaGetErrorString(e));
  return Gpu{prop.name, prop.major, prop.minor};
}

std::string target_problem(const TensorRtDesc& t, const Gpu& g) {
  const std::string problem = plan_target_problem(t, getInferLibVersion(), g.major, g.minor);
  return problem.empty() ? problem : problem + " (GPU " + g.name + ")";
}

}  // namespace trt

namespace {

using trt::logger;
using trt::Recorder;

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

struct GraphExecFree {
  void operator()(cudaGraphExec_t g) const noexcept { cudaGraphExecDestroy(g); }
};
using GraphExec = std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, GraphExecFree>;

// What one run bound: the batch and the tensor addresses (inputs then outputs).
struct Binding {
  int batch = -1;
  std::vector<void*> bound;
  bool operator==(const Binding& o) const { return batch == o.batch && bound == o.bound; }
};

// One captured enqueue: valid for the batch and the addresses it was captured with.
struct Captured {
  Binding key;
  GraphExec exec;
};

// Graphs kept per plan: the chained loop's ping-pong buffers give each layer a few address sets.
constexpr size_t kGraphsPerPlan = 8;
// Graphs a plan may drop before it stops capturing: batches and addresses that keep changing (per-row
// exit shrinking the batch layer by layer) would capture more than they replay, and a capture with
// its instantiation costs far more than the enqueue it replaces.
constexpr int kEvictionsBeforeGivingUp = 32;

struct Plan {
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  // What the context was last given: shapes and addresses are set only when they change, since
  // the chained loop calls each segment with the same buffers step after step. Also the key of
  // the CUDA graph that replays this run.
  Binding now;
  // CUDA graphs: bindings run plainly once (the warm-up a capture waits for), the graphs captured,
  // and how many were dropped for newer ones.
  std::vector<Binding> warm;
  std::vector<Captured> graphs;
  int evicted = 0;
  bool no_graphs = false;  // a capture failed, or bindings keep changing: this plan runs plain from then on
};

class TensorRtEngine final : public Engine {
 public:
  TensorRtEngine(const Manifest& m, Ops* ops, const TensorRtOptions& o)
      : m_(m), ops_(ops), t_(o.plans ? *o.plans : m.tensorrt), cached_(bool(o.plans)), graphs_(o.cuda_graphs),
        plans_(m.segments.size()) {
    if (!ops->is_cuda()) throw std::invalid_argument("engine='tensorrt' needs device='cuda'");
    if (!t_.present)
      throw std::runtime_error("engine='tensorrt': the engines folder has no TensorRT plans (manifest \"tensorrt\" is null)");
    check_target();
    runtime_.reset(nvinfer1::createInferRuntime(logger()));
    if (!runtime_) throw std::runtime_error("TensorRT: createInferRuntime failed: " + last_error("no error recorded"));
    runtime_->setErrorRecorder(&recorder_);  // inherited by the engines and contexts it creates
    int64_t scratch = 0;
    for (size_t i = 0; i < m.segments.size(); ++i) {
      const SegmentDesc& s = m.segments[i];
      auto it = t_.plans.find(s.name);
      if (it == t_.plans.end()) {
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
    // Graphs and contexts first (they hold the scratch area and the recorder), then the runtime.
    plans_.clear();
    runtime_.reset();
  }

  std::string name() const override { return "tensorrt"; }
  int max_batch() const override { return t_.profile_max; }
  bool cuda_graphs() const override { return graphs_; }
  int64_t graphs_captured() const override { return captured_; }

  void run(int seg, int batch, void* const* in, void* const* out) override {
    const SegmentDesc& s = m_.segments[seg];
    Plan& p = plans_[seg];
    if (!p.context) throw std::runtime_error("TensorRT: no plan for segment " + s.name);
    if (batch < t_.profile_min || batch > t_.profile_max)
      throw std::runtime_error("TensorRT: segment " + s.name + ": batch " + std::to_string(batch) +
                               " is outside the plan's profile " + std::to_string(t_.profile_min) + ".." +
                               std::to_string(t_.profile_max));
    recorder_.clear();
    if (batch != p.now.batch) {
      p.now.batch = -1;  // a failure half way leaves shapes unknown
      for (const TensorDesc& t : s.inputs) {
        if (!p.context->setInputShape(t.name.c_str(), trt::dims_at(t, batch))) fail(s, "setInputShape(" + t.name + ", " + t.shape_str(batch) + ")");
      }
      p.now.batch = batch;
    }
    // Chaining: segment k's output buffer is bound as segment k+1's input address, no copies.
    const size_t n_in = s.inputs.size();
    for (size_t i = 0; i < n_in + s.outputs.size(); ++i) {
      void* ptr = i < n_in ? in[i] : out[i - n_in];
      if (p.now.bound[i] == ptr) continue;
      const std::string& name = i < n_in ? s.inputs[i].name : s.outputs[i - n_in].name;
      p.now.bound[i] = nullptr;
      if (!p.context->setTensorAddress(name.c_str(), ptr)) fail(s, "setTensorAddress(" + name + ")");
      p.now.bound[i] = ptr;
    }
    const cudaStream_t stream = static_cast<cudaStream_t>(ops_->stream());
    if (!graphs_ || p.no_graphs) {
      if (!p.context->enqueueV3(stream)) fail(s, "enqueueV3");
      return;
    }
    // Compared in place: a key is copied (allocated) only on a binding's first runs, never on replay.
    for (Captured& g : p.graphs)
      if (g.key == p.now) return launch(s, g, stream);
    const auto warm = std::find(p.warm.begin(), p.warm.end(), p.now);
    if (warm != p.warm.end()) {
      Binding key = std::move(*warm);
      p.warm.erase(warm);
      if (capture(s, p, std::move(key), stream)) return;
    }
    if (!p.context->enqueueV3(stream)) fail(s, "enqueueV3");
    if (p.warm.size() == kGraphsPerPlan) p.warm.erase(p.warm.begin());
    p.warm.push_back(p.now);
  }

 private:
  std::string last_error(const std::string& fallback) const { return recorder_.message(fallback); }

  [[noreturn]] void fail(const SegmentDesc& s, const std::string& call) const {
    throw std::runtime_error("TensorRT: segment " + s.name + ": " + call + " failed: " +
                             last_error("TensorRT recorded no error for this call"));
  }

  void launch(const SegmentDesc& s, const Captured& g, cudaStream_t stream) {
    const cudaError_t e = cudaGraphLaunch(g.exec.get(), stream);
    if (e != cudaSuccess)
      throw std::runtime_error("CUDA: segment " + s.name + ": cudaGraphLaunch: " + cudaGetErrorString(e));
  }

  // Captures p's enqueue with its current shape and addresses into a graph, then launches it (the
  // captured work has not run). False, with graphs off for this plan, where TensorRT or CUDA refuses:
  // the caller then enqueues plainly. ThreadLocal mode: other threads' CUDA calls (another Runtime,
  // torch) go on while this stream captures.
  bool capture(const SegmentDesc& s, Plan& p, Binding key, cudaStream_t stream) {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    std::string why;
    if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
      why = "cudaStreamBeginCapture";
    } else {
      const bool ok = p.context->enqueueV3(stream);
      const cudaError_t end = cudaStreamEndCapture(stream, &graph);  // always: the stream leaves capture mode
      if (!ok) why = "enqueueV3 under capture: " + last_error("no error recorded");
      else if (end != cudaSuccess) why = std::string("cudaStreamEndCapture: ") + cudaGetErrorString(end);
      // WithFlags: one signature from CUDA 11.4 to 13 (plain cudaGraphInstantiate changed its own in 12).
      else if (cudaGraphInstantiateWithFlags(&exec, graph, 0) != cudaSuccess) why = "cudaGraphInstantiateWithFlags";
    }
    if (graph) cudaGraphDestroy(graph);
    if (!why.empty() || !exec) {
      (void)cudaGetLastError();  // a refused capture is not this stream's error from here on
      recorder_.clear();
      stop_graphs(s, p, why);
      return false;
    }
    if (p.graphs.size() == kGraphsPerPlan) {
      p.graphs.erase(p.graphs.begin());
      if (++p.evicted == kEvictionsBeforeGivingUp)
        stop_graphs(s, p, "its batch and buffers changed more often than graphs could be reused");
    }
    p.graphs.push_back(Captured{std::move(key), GraphExec(exec)});
    ++captured_;
    launch(s, p.graphs.back(), stream);
    return true;
  }

  void stop_graphs(const SegmentDesc& s, Plan& p, const std::string& why) {
    p.no_graphs = true;
    const std::string msg = "adadiff_rt: segment " + s.name + " runs without CUDA graphs from now on: " + why;
    tensorrt_log().add(int(nvinfer1::ILogger::Severity::kWARNING), msg.c_str());
  }

  // Before any plan is read: a plan from another TensorRT version or GPU fails deep inside
  // deserializeCudaEngine (or worse, not at all until a kernel is missing); say so up front.
  void check_target() const {
    const std::string problem = trt::target_problem(t_, trt::gpu(ops_->device_id()));
    if (!problem.empty())
      throw std::runtime_error("TensorRT plans " + std::string(cached_ ? "in the plan cache" : "in " + m_.dir) +
                               " cannot run here: " + problem + ". Let the runtime build them " +
                               "here (build_plans='auto'), or run trtexec.sh in the folder and then python -m " +
                               "adadiff_export register-plans " + m_.dir);
  }

  void load(int seg, const PlanDesc& plan) {
    const SegmentDesc& s = m_.segments[seg];
    // A cached plan is this runtime's own file (its name holds its ONNX hash); a folder's plan must
    // lie in the folder and have the manifest's sha256.
    const std::string path =
        cached_ ? plan.file : m_.verified_path("TensorRT plan of segment " + s.name, plan.file, plan.sha256);
    std::vector<char> blob;
    if (!trt::read_file(path, blob)) throw std::runtime_error("TensorRT: cannot read " + path);
    Plan& p = plans_[seg];
    recorder_.clear();
    p.engine.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!p.engine)
      throw std::runtime_error("TensorRT: cannot deserialize " + path + " (built by TensorRT " + t_.version + " for " +
                               t_.gpu_arch + "): " + last_error("no error recorded") +
                               (cached_ ? "; delete it and the runtime builds it again" : ""));
    check_plan(s, t_, plan_info(*p.engine), plan.file);
    p.context.reset(p.engine->createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy::kUSER_MANAGED));
    if (!p.context)
      throw std::runtime_error("TensorRT: createExecutionContext failed for " + s.name + ": " + last_error("no error recorded"));
    p.now.bound.assign(s.inputs.size() + s.outputs.size(), nullptr);
  }

  Manifest m_;
  Ops* ops_;
  TensorRtDesc t_;  // the plans run: the folder's, or the plan cache's
  bool cached_;
  bool graphs_;
  int64_t captured_ = 0;
  Recorder recorder_;  // declared before the TensorRT objects: outlives them
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::vector<Plan> plans_;
  Buffer scratch_;  // the destructor drops the contexts and graphs before this is freed
};

}  // namespace

std::unique_ptr<Engine> make_tensorrt_engine(const Manifest& m, Ops* ops, const TensorRtOptions& o) {
  return std::make_unique<TensorRtEngine>(m, ops, o);
}

#endif

}  // namespace adadiff
