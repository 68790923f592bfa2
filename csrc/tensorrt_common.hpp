// What the TensorRT engine and the plan builder share: the process-wide logger and the error
// recorder. Internal (not installed); only compiled where TensorRT's headers are.
#pragma once

#include <NvInferRuntime.h>

#include <atomic>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "plan_check.hpp"

namespace adadiff {

MessageLog& tensorrt_log();

namespace trt {

// The one logger of the process: TensorRT keeps the first ILogger it is given for the process, so
// a per-Runtime logger would outlive its Runtime inside TensorRT. MessageLog locks.
nvinfer1::ILogger& logger();

// Errors of one owner's TensorRT objects (a runtime hands its recorder to the engines and contexts
// it creates, a builder to its network and config). Cleared before every call, so the message
// raised is that call's.
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
  std::string message(const std::string& fallback) const { return errors.message(fallback); }
  ErrorList errors;

 private:
  std::atomic<int32_t> refs_{0};
};

// A manifest tensor's shape at `batch` rows, as TensorRT takes shapes.
inline nvinfer1::Dims dims_at(const TensorDesc& t, int batch) {
  nvinfer1::Dims d{};
  d.nbDims = int32_t(t.shape.size());
  d.d[0] = batch;
  for (size_t k = 1; k < t.shape.size(); ++k) d.d[k] = t.shape[k];
  return d;
}

// A whole file in one sized read (plans run to gigabytes, which a character-by-character iterator
// crawls through); false when it cannot be read.
inline bool read_file(const std::string& path, std::vector<char>& blob) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  blob.assign(f ? size_t(f.tellg()) : 0, 0);
  return f && f.seekg(0).read(blob.data(), std::streamsize(blob.size()));
}

// "10.16.1": the running TensorRT's version as manifests record it.
std::string version_string();
// GPU `device_id` as plans see it; throws naming the CUDA error.
struct Gpu {
  std::string name;
  int major = 0, minor = 0;  // compute capability
  std::string arch() const { return "sm_" + std::to_string(major) + std::to_string(minor); }  // as manifests record it
};
Gpu gpu(int device_id);

// Why plans described by `t` cannot run with the linked TensorRT on `g` (plan_target_problem, the
// GPU named); "" when they can. The engine's check before loading and the runtime's decision to
// build plans both ask it.
std::string target_problem(const TensorRtDesc& t, const Gpu& g);

}  // namespace trt
}  // namespace adadiff
