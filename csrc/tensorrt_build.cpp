// Plans built on the target (see tensorrt_build.hpp). The steps are those of the exporter's
// Python builder (adadiff_export/export/tensorrt_build.py), so a plan built here equals one built
// by `build --tensorrt on` on the same machine: TF32 off for fp32 parity, one optimization
// profile over the batch, one timing cache shared by every segment.
#include "tensorrt_build.hpp"

#include <cstdio>
#include <stdexcept>

#ifdef ADADIFF_WITH_TENSORRT
#include <NvInfer.h>
#include <NvOnnxParser.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <vector>

#include "tensorrt_common.hpp"
#endif

namespace adadiff {

std::string plan_cache_name(const SegmentDesc& s, const std::string& trt_version, const std::string& gpu_arch,
                            const std::string& precision, int pmin, int popt, int pmax) {
  // 16 hex digits of the ONNX sha256 (64 bits) tell apart every segment file a cache will meet.
  return s.name + "-" + s.sha256.substr(0, 16) + "-trt" + trt_version + "-" + gpu_arch + "-" + precision + "-b" +
         std::to_string(pmin) + "_" + std::to_string(popt) + "_" + std::to_string(pmax) + ".plan";
}

#ifndef ADADIFF_WITH_TENSORRT

bool tensorrt_can_build() { return false; }
std::string tensorrt_plans_problem(const Manifest&, int) {
  return "this adadiff_rt was built without TensorRT (NvInfer.h / libnvinfer not found at build time)";
}
TensorRtDesc tensorrt_cached_plans(const Manifest&, const PlanBuildRequest&) {
  throw std::runtime_error("building TensorRT plans needs an adadiff_rt built with TensorRT and its ONNX parser");
}

#else

namespace {

namespace fs = std::filesystem;

// Written beside its final name and renamed: a reader never sees half a plan, and two processes
// building the same plan each rename a whole one.
void write_file(const fs::path& path, const void* data, size_t size) {
  const fs::path tmp = path.string() + ".tmp" + std::to_string(getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f.write(static_cast<const char*>(data), std::streamsize(size)) || !f.flush())
      throw std::runtime_error("cannot write " + tmp.string());
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw std::runtime_error("cannot rename " + tmp.string() + " to " + path.string());
  }
}

class Builder {
 public:
  Builder(const PlanBuildRequest& r, std::string timing_path) : r_(r), timing_path_(std::move(timing_path)) {
    builder_.reset(nvinfer1::createInferBuilder(trt::logger()));
    if (!builder_) throw std::runtime_error("TensorRT: createInferBuilder failed");
    builder_->setErrorRecorder(&recorder_);
    if (!trt::read_file(timing_path_, timing_)) timing_.clear();  // none yet: a first build
  }

  // One plan, serialized; the timing cache is carried from plan to plan and saved after each.
  std::vector<char> build(const SegmentDesc& s, const std::string& onnx_path) {
    recorder_.clear();
    // TensorRT 10: 0 is explicit batch, the only mode; TensorRT 11: every network is strongly typed.
    std::unique_ptr<nvinfer1::INetworkDefinition> net(builder_->createNetworkV2(0));
    if (!net) fail(s, "createNetworkV2");
    std::unique_ptr<nvonnxparser::IParser> parser(nvonnxparser::createParser(*net, trt::logger()));
    if (!parser) fail(s, "createParser");
    if (!parser->parseFromFile(onnx_path.c_str(), int(nvinfer1::ILogger::Severity::kWARNING))) {
      std::string errors;
      for (int i = 0; i < parser->getNbErrors(); ++i) errors += (i ? "; " : "") + std::string(parser->getError(i)->desc());
      throw std::runtime_error("TensorRT cannot parse " + onnx_path + " (segment " + s.name + "): " + errors);
    }
    std::unique_ptr<nvinfer1::IBuilderConfig> config(builder_->createBuilderConfig());
    if (!config) fail(s, "createBuilderConfig");
    config->clearFlag(nvinfer1::BuilderFlag::kTF32);  // fp32 parity with PyTorch needs real fp32 GEMMs
    set_precision(*config);
    nvinfer1::IOptimizationProfile* profile = builder_->createOptimizationProfile();  // owned by the builder
    for (const TensorDesc& t : s.inputs) {
      const char* n = t.name.c_str();
      if (!profile->setDimensions(n, nvinfer1::OptProfileSelector::kMIN, trt::dims_at(t, r_.profile_min)) ||
          !profile->setDimensions(n, nvinfer1::OptProfileSelector::kOPT, trt::dims_at(t, r_.profile_opt)) ||
          !profile->setDimensions(n, nvinfer1::OptProfileSelector::kMAX, trt::dims_at(t, r_.profile_max)))
        fail(s, "IOptimizationProfile::setDimensions(" + t.name + ")");
    }
    if (config->addOptimizationProfile(profile) < 0) fail(s, "addOptimizationProfile");
    std::unique_ptr<nvinfer1::ITimingCache> cache(config->createTimingCache(timing_.data(), timing_.size()));
    if (!cache || !config->setTimingCache(*cache, /*ignoreMismatch=*/false)) fail(s, "setTimingCache");
    std::unique_ptr<nvinfer1::IHostMemory> plan(builder_->buildSerializedNetwork(*net, *config));
    if (!plan || plan->size() == 0) fail(s, "buildSerializedNetwork");
    save_timing(*config);
    const char* p = static_cast<const char*>(plan->data());
    return std::vector<char>(p, p + plan->size());
  }

 private:
  void set_precision(nvinfer1::IBuilderConfig& config) const {
    if (r_.precision == "fp32") return;
#if NV_TENSORRT_MAJOR < 11
    // Deprecated since TensorRT 10.12 (weakly typed networks) and the only way an fp32 ONNX file
    // becomes an fp16 plan there; `build --precision fp16` does the same through the Python API.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    config.setFlag(r_.precision == "fp16" ? nvinfer1::BuilderFlag::kFP16 : nvinfer1::BuilderFlag::kBF16);
#pragma GCC diagnostic pop
#else
    (void)config;
    throw std::runtime_error("TensorRT " + trt::version_string() + " builds strongly typed networks only, and the " +
                             "folder's ONNX segments are fp32: build fp32 plans here (precision='fp32'), or " +
                             r_.precision + " plans with TensorRT 10");
#endif
  }

  void save_timing(const nvinfer1::IBuilderConfig& config) {
    const nvinfer1::ITimingCache* cache = config.getTimingCache();
    if (!cache) return;
    std::unique_ptr<nvinfer1::IHostMemory> blob(cache->serialize());
    if (!blob) return;
    const char* p = static_cast<const char*>(blob->data());
    timing_.assign(p, p + blob->size());
    write_file(timing_path_, timing_.data(), timing_.size());
  }

  [[noreturn]] void fail(const SegmentDesc& s, const std::string& call) const {
    throw std::runtime_error("TensorRT: building the plan of segment " + s.name + ": " + call + " failed: " +
                             recorder_.message("no error recorded; the TensorRT log above may say why"));
  }

  PlanBuildRequest r_;
  std::string timing_path_;
  trt::Recorder recorder_;  // declared before the builder: outlives it
  std::unique_ptr<nvinfer1::IBuilder> builder_;
  std::vector<char> timing_;
};

}  // namespace

bool tensorrt_can_build() { return true; }

std::string tensorrt_plans_problem(const Manifest& m, int device_id) {
  if (!m.tensorrt.present) return "the engines folder has no TensorRT plans (manifest \"tensorrt\" is null)";
  for (const SegmentDesc& s : m.segments)
    if (s.kind != "full" && !m.tensorrt.plans.count(s.name))
      return "manifest.json's tensorrt.plans has no plan for segment " + s.name;
  return trt::target_problem(m.tensorrt, trt::gpu(device_id));
}

TensorRtDesc tensorrt_cached_plans(const Manifest& m, const PlanBuildRequest& r) {
  TensorRtDesc t;
  t.present = true;
  t.version = trt::version_string();
  t.gpu_arch = trt::gpu(r.device_id).arch();
  t.precision = r.precision;
  t.profile_min = r.profile_min;
  t.profile_opt = r.profile_opt;
  t.profile_max = r.profile_max;
  std::error_code ec;
  fs::create_directories(r.cache_dir, ec);
  if (ec) throw std::runtime_error("TensorRT plan cache: cannot create " + r.cache_dir + ": " + ec.message());
  const fs::path dir = fs::absolute(r.cache_dir);
  std::unique_ptr<Builder> builder;  // made on the first missing plan only
  int built = 0;
  for (const SegmentDesc& s : m.segments) {
    const fs::path plan = dir / plan_cache_name(s, t.version, t.gpu_arch, t.precision, t.profile_min, t.profile_opt,
                                                t.profile_max);
    if (!fs::exists(plan)) {
      // The ONNX file is the one the manifest names, with its sha256: the cache key holds that hash.
      const std::string onnx = m.verified_path("segment " + s.name, s.file, s.sha256);
      if (!builder) builder = std::make_unique<Builder>(r, (dir / ("timing-trt" + t.version + "-" + t.gpu_arch + ".cache")).string());
      std::fprintf(stderr, "adadiff_rt: building the TensorRT %s plan of %s (%d of %zu) into %s\n", t.precision.c_str(),
                   s.name.c_str(), ++built, m.segments.size(), dir.c_str());
      const std::vector<char> blob = builder->build(s, onnx);
      write_file(plan, blob.data(), blob.size());
    }
    t.plans[s.name] = PlanDesc{plan.string(), ""};  // "": a cache file, no manifest hash (the engine checks its I/O)
  }
  return t;
}

#endif

}  // namespace adadiff
