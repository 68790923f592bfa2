// Where the runtime's buffers live and the few operations it performs on them between engine
// calls. CpuOps: plain loops over host memory. CudaOps: kernels on the runtime's own stream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kernels_common.hpp"

namespace adadiff {

// Memory a device can still give, and where the figure comes from (for messages).
struct FreeMemory {
  uint64_t bytes = UINT64_MAX;  // UINT64_MAX: unknown
  std::string source;
};

// Host memory: /proc/meminfo's MemAvailable, lowered to the cgroup's memory.max less its
// memory.current where a container sets a limit (unknown outside Linux).
FreeMemory host_free_memory();

class Ops {
 public:
  virtual ~Ops() = default;
  virtual bool is_cuda() const = 0;
  // The cudaStream_t engines must enqueue on (nullptr on CPU).
  virtual void* stream() const { return nullptr; }
  virtual int device_id() const { return 0; }
  // Makes this Ops' device current for the calling thread: a Runtime on device 1 may be called
  // from a thread whose current device is 0, and kernels, copies and engines must land on its own.
  virtual void activate() {}
  // DLPack hand-off: make the consumer's stream (DLPack's integer convention: 1 legacy default,
  // 2 per-thread default, -1 none, else a cudaStream_t) wait for the work queued so far.
  virtual void hand_off(intptr_t /*consumer_stream*/) {}

  // What alloc can still take on this device (the runtime checks its buffers against it first).
  virtual FreeMemory free_memory() const = 0;
  virtual void* alloc(size_t bytes) = 0;
  virtual void release(void* p) noexcept = 0;

  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  // Waits for the work queued so far, then copies to host memory.
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill_f32(float* dst, int64_t n, float v) = 0;
  virtual void iota_zero(int* idx, int* count, int n) = 0;  // idx = 0..n-1, count = 0

  // dst row j = src row idx[j]
  virtual void gather_rows(void* dst, const void* src, const int* idx, int m, size_t row_bytes) = 0;
  // dst row idx[j] = src row j
  virtual void scatter_rows(void* dst, const void* src, const int* idx, int m, size_t row_bytes) = 0;

  // Runs decide_exits where the data lives; the host learns only the number exiting.
  virtual int decide(const ExitParams& p, const ExitBuffers& b, int n) = 0;
  // score[j] = ||h[j] - prev[j]|| / max(||prev[j]||, 1e-12) (the saturation policy)
  virtual void relative_change(float* score, const float* h, const float* prev, int n, int64_t row) = 0;

  virtual void sampler_step(const StepCoefs& c, float* x, const float* eps, float* x0_prev, int64_t n) = 0;
  // out[i] = cfg(eps[i], eps[half + i], w) for i < half
  virtual void cfg_combine(float* out, const float* eps, int64_t half, float w) = 0;
  virtual void clamp_unit(float* x, int64_t n) = 0;
  virtual void synchronize() = 0;
};

std::unique_ptr<Ops> make_cpu_ops();
// Throws std::runtime_error("... no CUDA device ...") when the build has CUDA but the machine has
// no usable GPU or driver, and a different message when the module was built without CUDA.
std::unique_ptr<Ops> make_cuda_ops(int device_index);
bool cuda_compiled();

// Memory owned by an Ops; freed when it goes out of scope.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Ops* ops, size_t bytes) : ops_(ops), bytes_(bytes), p_(bytes ? ops->alloc(bytes) : nullptr) {}
  ~Buffer() { reset(); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : ops_(o.ops_), bytes_(o.bytes_), p_(o.p_) { o.p_ = nullptr; }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      reset();
      ops_ = o.ops_;
      bytes_ = o.bytes_;
      p_ = o.p_;
      o.p_ = nullptr;
    }
    return *this;
  }
  void reset() noexcept {
    if (p_) ops_->release(p_);
    p_ = nullptr;
  }
  template <class T = void>
  T* as() const { return static_cast<T*>(p_); }
  size_t bytes() const { return bytes_; }

 private:
  Ops* ops_ = nullptr;
  size_t bytes_ = 0;
  void* p_ = nullptr;
};

}  // namespace adadiff
