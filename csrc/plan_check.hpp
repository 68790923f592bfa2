// What the runtime checks of a TensorRT plan before trusting it, and the messages TensorRT reports,
// kept free of TensorRT's types: the TensorRT engine fills these from an ICudaEngine, `python -m
// adadiff_export register-plans` from the `tensorrt` package, and the tests from plain data, so the
// rules run (and are tested) on machines without TensorRT or a GPU.
#pragma once

#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "manifest.hpp"

namespace adadiff {

// One I/O tensor of a plan as TensorRT describes it.
struct PlanTensor {
  std::string name;
  bool input = true;
  std::string dtype;           // "float32", "float16", "bfloat16", "int64", else TensorRT's own name
  std::vector<int64_t> shape;  // -1 where the dimension is dynamic
  // Optimization profile 0's min / opt / max shapes (inputs only).
  std::vector<int64_t> min, opt, max;
};

struct PlanInfo {
  int profiles = 0;  // optimization profiles in the plan
  std::vector<PlanTensor> tensors;
};

// Throws std::runtime_error naming `file` and the tensor unless the plan is the manifest's segment
// `s`: the same number of I/O tensors, each manifest tensor present under its name with its mode
// (input/output), dtype and shape (batch dynamic, the rest static), no tensor the manifest does not
// name, and profile 0's batch range equal to tensorrt.profile (min, opt, max) with the static
// dimensions fixed.
void check_plan(const SegmentDesc& s, const TensorRtDesc& t, const PlanInfo& plan, const std::string& file);

// The compute capability "sm_XY" names (sm_90 -> 9.0, sm_120 -> 12.0); throws on anything else.
void parse_gpu_arch(const std::string& arch, int& major, int& minor);

// Why plans recorded in `t` cannot run with TensorRT `lib_version` (getInferLibVersion():
// major * 10000 + minor * 100 + patch) on a GPU of compute capability cc_major.cc_minor; "" when
// they can. A plan runs only with the TensorRT version that built it (compared up to the patch
// level the manifest records) on GPUs of the compute capability it was built for.
std::string plan_target_problem(const TensorRtDesc& t, int lib_version, int cc_major, int cc_minor);

// The process-wide TensorRT log (TensorRT documents one ILogger per process, called from any of
// its threads): locked; keeps the most recent warnings and errors for messages and tests, and
// echoes them to stderr when `echo` is set (warnings used to be dropped).
class MessageLog {
 public:
  explicit MessageLog(bool echo, size_t keep = 64) : echo_(echo), keep_(keep) {}
  // severity as TensorRT's ILogger::Severity: 0 internal error, 1 error, 2 warning, 3 info, 4 verbose.
  void add(int severity, const char* msg) noexcept;
  std::vector<std::string> recent() const;
  uint64_t count() const;

 private:
  mutable std::mutex mu_;
  bool echo_;
  size_t keep_;
  uint64_t count_ = 0;
  std::deque<std::string> recent_;
};

// The errors one object's TensorRT calls recorded (what an IErrorRecorder stores): cleared before
// each call, so the message raised for a failure is that failure's, never an older one.
class ErrorList {
 public:
  static constexpr size_t kMax = 32;
  void add(int code, const char* desc) noexcept;
  void clear() noexcept;
  int size() const noexcept;
  int code(int i) const noexcept;
  const char* desc(int i) const noexcept;  // valid until the next clear
  bool overflowed() const noexcept;
  // "code N: desc; ..." or `fallback` when nothing was recorded.
  std::string message(const std::string& fallback) const;

 private:
  mutable std::mutex mu_;
  std::deque<std::pair<int, std::string>> errors_;  // a deque: add never moves the strings desc() handed out
  bool overflow_ = false;
};

}  // namespace adadiff
