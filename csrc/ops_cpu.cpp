#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <stdexcept>
#include <string>

#include "ops.hpp"

namespace adadiff {

namespace {

// The first number in `path` (after `key` when given); false when the file or key is absent.
bool read_number(const char* path, const std::string& key, uint64_t& out) {
  std::ifstream f(path);
  std::string word;
  while (f >> word) {
    if (!key.empty() && word != key) continue;
    if (!key.empty() && !(f >> word)) return false;
    if (word.empty() || word.find_first_not_of("0123456789") != std::string::npos) return false;
    out = std::stoull(word);
    return true;
  }
  return false;
}

}  // namespace

FreeMemory host_free_memory() {
  FreeMemory m;
  uint64_t kib = 0;
  if (read_number("/proc/meminfo", "MemAvailable:", kib)) {
    m.bytes = kib * 1024;
    m.source = "MemAvailable in /proc/meminfo";
  }
  // cgroup v2: memory.max is "max" when unlimited, which read_number refuses.
  uint64_t limit = 0, used = 0;
  if (read_number("/sys/fs/cgroup/memory.max", "", limit) && read_number("/sys/fs/cgroup/memory.current", "", used)) {
    const uint64_t left = limit > used ? limit - used : 0;
    if (left < m.bytes) {
      m.bytes = left;
      m.source = "the cgroup's memory.max less memory.current";
    }
  }
  return m;
}

namespace {

class CpuOps final : public Ops {
 public:
  bool is_cuda() const override { return false; }
  FreeMemory free_memory() const override { return host_free_memory(); }

  void* alloc(size_t bytes) override {
    // 64-byte alignment: what OpenVINO's CPU plugin wants to use a user tensor without a copy.
    size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, rounded);
    return p;
  }
  void release(void* p) noexcept override { std::free(p); }

  void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (dst != src) std::memmove(dst, src, bytes);
  }
  void fill_f32(float* dst, int64_t n, float v) override {
    for (int64_t i = 0; i < n; ++i) dst[i] = v;
  }
  void iota_zero(int* idx, int* count, int n) override {
    for (int i = 0; i < n; ++i) {
      idx[i] = i;
      count[i] = 0;
    }
  }

  void gather_rows(void* dst, const void* src, const int* idx, int m, size_t row) override {
    auto* d = static_cast<char*>(dst);
    auto* s = static_cast<const char*>(src);
    for (int j = 0; j < m; ++j) std::memcpy(d + j * row, s + size_t(idx[j]) * row, row);
  }
  void scatter_rows(void* dst, const void* src, const int* idx, int m, size_t row) override {
    auto* d = static_cast<char*>(dst);
    auto* s = static_cast<const char*>(src);
    for (int j = 0; j < m; ++j) std::memcpy(d + size_t(idx[j]) * row, s + j * row, row);
  }

  int decide(const ExitParams& p, const ExitBuffers& b, int n) override {
    decide_exits(p, b, n);
    return *b.m_out;
  }

  void relative_change(float* score, const float* h, const float* prev, int n, int64_t row) override {
    for (int j = 0; j < n; ++j) {
      double diff = 0, base = 0;
      const float* a = h + j * row;
      const float* b = prev + j * row;
      for (int64_t i = 0; i < row; ++i) {
        double d = double(a[i]) - double(b[i]);
        diff += d * d;
        base += double(b[i]) * double(b[i]);
      }
      score[j] = float(std::sqrt(diff) / std::max(std::sqrt(base), 1e-12));
    }
  }

  void sampler_step(const StepCoefs& c, float* x, const float* eps, float* x0_prev, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) x[i] = sampler_element(c, x[i], eps[i], x0_prev + i, uint64_t(i));
  }
  void cfg_combine(float* out, const float* eps, int64_t half, float w) override {
    for (int64_t i = 0; i < half; ++i) out[i] = cfg_element(eps[i], eps[half + i], w);
  }
  void clamp_unit(float* x, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) x[i] = adadiff::clamp_unit(x[i]);
  }
  void synchronize() override {}
};

}  // namespace

std::unique_ptr<Ops> make_cpu_ops() { return std::make_unique<CpuOps>(); }

#ifndef ADADIFF_WITH_CUDA
bool cuda_compiled() { return false; }
std::unique_ptr<Ops> make_cuda_ops(int) {
  throw std::runtime_error("device='cuda': this adadiff_rt was built without CUDA (nvcc was not found at build time)");
}
#endif

}  // namespace adadiff
