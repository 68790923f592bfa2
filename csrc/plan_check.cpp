#include "plan_check.hpp"

#include <algorithm>
#include <cstdio>
#include <stdexcept>

namespace adadiff {

namespace {

std::string dims_str(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + (d[i] < 0 ? std::string("-1") : std::to_string(d[i]));
  return s + "]";
}

// The manifest's shape with the batch dimension at `batch` (-1: dynamic, as TensorRT reports it).
std::vector<int64_t> with_batch(const TensorDesc& t, int64_t batch) {
  std::vector<int64_t> d = t.shape;
  d[0] = batch;
  return d;
}

}  // namespace

void check_plan(const SegmentDesc& s, const TensorRtDesc& t, const PlanInfo& plan, const std::string& file) {
  const std::string where = "TensorRT plan " + file + " (segment " + s.name + "): ";
  auto fail = [&](const std::string& what) { throw std::runtime_error(where + what); };
  if (plan.profiles < 1) fail("it has no optimization profile (the batch is dynamic, so the plan needs one)");
  const size_t want = s.inputs.size() + s.outputs.size();
  if (plan.tensors.size() != want)
    fail("it has " + std::to_string(plan.tensors.size()) + " I/O tensors, manifest.json lists " + std::to_string(want) +
         " (the plan was built from another segment's ONNX file)");
  // By name, and a name the manifest does not know is refused: TensorRT answers a lookup of an
  // unknown name with defaults (kFLOAT), which is how the old check passed anything.
  for (const PlanTensor& p : plan.tensors) {
    const bool is_in = s.input_index(p.name) >= 0, is_out = s.output_index(p.name) >= 0;
    if (!is_in && !is_out) fail("tensor '" + p.name + "' is not one of the manifest's tensors of this segment");
    const TensorDesc& m = is_in ? s.input(p.name) : s.output(p.name);
    const char* mode = is_in ? "input" : "output";
    if (p.input != is_in)
      fail("tensor '" + p.name + "' is an " + (p.input ? "input" : "output") + " of the plan, an " + mode +
           " in manifest.json");
    if (p.dtype != dtype_name(m.dtype))
      fail("tensor '" + p.name + "' has dtype " + p.dtype + ", manifest.json says " + dtype_name(m.dtype));
    if (p.shape != with_batch(m, -1))
      fail("tensor '" + p.name + "' has shape " + dims_str(p.shape) + ", manifest.json says " + m.shape_str(0) +
           " (B dynamic: -1 in the plan)");
    if (!p.input) continue;
    const std::pair<const std::vector<int64_t>*, std::pair<const char*, int>> range[] = {
        {&p.min, {"min", t.profile_min}}, {&p.opt, {"opt", t.profile_opt}}, {&p.max, {"max", t.profile_max}}};
    for (const auto& [got, which] : range)
      if (*got != with_batch(m, which.second))
        fail("input '" + p.name + "': the profile's " + which.first + " shape is " + dims_str(*got) +
             ", manifest.json's tensorrt.profile." + which.first + " makes it " + m.shape_str(which.second) +
             " (the plan and the manifest come from different builds)");
  }
}

void parse_gpu_arch(const std::string& arch, int& major, int& minor) {
  const bool digits = arch.size() >= 5 && arch.size() <= 6 && arch.compare(0, 3, "sm_") == 0 &&
                      arch.find_first_not_of("0123456789", 3) == std::string::npos;
  if (!digits) throw std::runtime_error("tensorrt.gpu_arch '" + arch + "' is not of the form sm_XY (e.g. sm_90, sm_120)");
  major = std::stoi(arch.substr(3, arch.size() - 4));
  minor = arch.back() - '0';
}

std::string plan_target_problem(const TensorRtDesc& t, int lib_version, int cc_major, int cc_minor) {
  const int run[3] = {lib_version / 10000, lib_version / 100 % 100, lib_version % 100};
  const std::string running = std::to_string(run[0]) + "." + std::to_string(run[1]) + "." + std::to_string(run[2]);
  int built[3] = {-1, -1, -1};
  const int parts = std::sscanf(t.version.c_str(), "%d.%d.%d", &built[0], &built[1], &built[2]);
  if (parts < 2)
    return "manifest.json's tensorrt.version '" + t.version + "' is not a TensorRT version (major.minor[.patch])";
  for (int i = 0; i < std::min(parts, 3); ++i)
    if (built[i] != run[i])
      return "the plans were built by TensorRT " + t.version + ", this is TensorRT " + running +
             " (a plan runs only with the version that built it)";
  if (t.gpu_arch.empty())
    return "manifest.json does not record the GPU the plans were built for (tensorrt.gpu_arch), so they cannot be "
           "checked against this one";
  int maj = 0, min = 0;
  try {
    parse_gpu_arch(t.gpu_arch, maj, min);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  if (maj != cc_major || min != cc_minor)
    return "the plans were built for compute capability " + std::to_string(maj) + "." + std::to_string(min) + " (" +
           t.gpu_arch + "), this GPU is " + std::to_string(cc_major) + "." + std::to_string(cc_minor) +
           " (a plan runs only on the compute capability it was built for)";
  return "";
}

void MessageLog::add(int severity, const char* msg) noexcept {
  if (severity > 2) return;  // info and verbose: TensorRT's chatter, not kept
  static const char* names[] = {"internal error", "error", "warning"};
  try {
    std::string line = std::string(names[severity < 0 ? 0 : severity]) + ": " + (msg ? msg : "");
    std::lock_guard<std::mutex> lock(mu_);
    ++count_;
    if (echo_) std::fprintf(stderr, "[TensorRT] %s\n", line.c_str());
    recent_.push_back(std::move(line));
    while (recent_.size() > keep_) recent_.pop_front();
  } catch (...) {
    // A logger must not throw into TensorRT; a message lost to a failed allocation is acceptable.
  }
}

std::vector<std::string> MessageLog::recent() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {recent_.begin(), recent_.end()};
}

uint64_t MessageLog::count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return count_;
}

void ErrorList::add(int code, const char* desc) noexcept {
  try {
    std::lock_guard<std::mutex> lock(mu_);
    if (errors_.size() >= kMax) {
      overflow_ = true;
      return;
    }
    errors_.emplace_back(code, desc ? desc : "");
  } catch (...) {
    overflow_ = true;
  }
}

void ErrorList::clear() noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  errors_.clear();
  overflow_ = false;
}

int ErrorList::size() const noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  return int(errors_.size());
}

int ErrorList::code(int i) const noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  return i >= 0 && size_t(i) < errors_.size() ? errors_[size_t(i)].first : 0;
}

const char* ErrorList::desc(int i) const noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  return i >= 0 && size_t(i) < errors_.size() ? errors_[size_t(i)].second.c_str() : "";
}

bool ErrorList::overflowed() const noexcept {
  std::lock_guard<std::mutex> lock(mu_);
  return overflow_;
}

std::string ErrorList::message(const std::string& fallback) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (errors_.empty()) return fallback;
  std::string s;
  for (const auto& [code, desc] : errors_) s += (s.empty() ? "" : "; ") + ("code " + std::to_string(code) + ": " + desc);
  if (overflow_) s += "; (more errors were dropped)";
  return s;
}

}  // namespace adadiff
