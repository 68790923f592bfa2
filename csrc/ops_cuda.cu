// CudaOps: the runtime's buffers in device memory, its own non-blocking stream, and kernels for
// everything between engine calls (exit decision, compaction, sampler updates, CFG). The only
// host-device round trip per layer is the exit count (4 bytes into pinned memory).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "ops.hpp"

namespace adadiff {

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}

constexpr int kThreads = 256;
inline int blocks(int64_t n) { return int((n + kThreads - 1) / kThreads < 65535 ? (n + kThreads - 1) / kThreads : 65535); }

__global__ void fill_kernel(float* dst, int64_t n, float v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) dst[i] = v;
}

__global__ void iota_kernel(int* idx, int* count, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    idx[i] = i;
    count[i] = 0;
  }
}

// One block per row, 4-byte words (every row here is a multiple of 4 bytes).
__global__ void gather_kernel(uint32_t* dst, const uint32_t* src, const int* idx, int64_t words, bool scatter) {
  const int j = blockIdx.x;
  const int64_t from = scatter ? j : idx[j];
  const int64_t to = scatter ? idx[j] : j;
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) dst[to * words + w] = src[from * words + w];
}

__global__ void decide_kernel(ExitParams p, ExitBuffers b, int n) { decide_exits(p, b, n); }

__global__ void relative_change_kernel(float* score, const float* h, const float* prev, int64_t row) {
  __shared__ double diff_s[kThreads], base_s[kThreads];
  const int j = blockIdx.x;
  double diff = 0, base = 0;
  for (int64_t i = threadIdx.x; i < row; i += blockDim.x) {
    double a = h[j * row + i], b = prev[j * row + i];
    diff += (a - b) * (a - b);
    base += b * b;
  }
  diff_s[threadIdx.x] = diff;
  base_s[threadIdx.x] = base;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      diff_s[threadIdx.x] += diff_s[threadIdx.x + s];
      base_s[threadIdx.x] += base_s[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) score[j] = float(sqrt(diff_s[0]) / fmax(sqrt(base_s[0]), 1e-12));
}

__global__ void sampler_kernel(StepCoefs c, float* x, const float* eps, float* x0_prev, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = sampler_element(c, x[i], eps[i], x0_prev + i, uint64_t(i));
}

__global__ void cfg_kernel(float* out, const float* eps, int64_t half, float w) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < half; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = cfg_element(eps[i], eps[half + i], w);
}

__global__ void clamp_kernel(float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = clamp_unit(x[i]);
}

class CudaOps final : public Ops {
 public:
  explicit CudaOps(int device) : device_(device) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0)
      throw std::runtime_error(std::string("device='cuda': no CUDA device available (") +
                               (e != cudaSuccess ? cudaGetErrorString(e) : "0 devices") + ")");
    if (device < 0 || device >= count)
      throw std::invalid_argument("device_id " + std::to_string(device) + " is outside 0.." + std::to_string(count - 1));
    check(cudaSetDevice(device), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "cudaEventCreate");
    check(cudaMallocHost(&m_host_, sizeof(int)), "cudaMallocHost");
  }
  ~CudaOps() override {
    // Destructors must not throw; a failing teardown leaves nothing to recover.
    cudaSetDevice(device_);
    if (stream_) cudaStreamSynchronize(stream_);
    if (m_host_) cudaFreeHost(m_host_);
    if (event_) cudaEventDestroy(event_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  CudaOps(const CudaOps&) = delete;
  CudaOps& operator=(const CudaOps&) = delete;

  bool is_cuda() const override { return true; }
  void* stream() const override { return stream_; }
  int device_id() const override { return device_; }
  void activate() override { check(cudaSetDevice(device_), "cudaSetDevice"); }

  FreeMemory free_memory() const override {
    check(cudaSetDevice(device_), "cudaSetDevice");
    size_t free = 0, total = 0;
    check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
    return FreeMemory{uint64_t(free), "cudaMemGetInfo's free memory on cuda:" + std::to_string(device_)};
  }

  void hand_off(intptr_t consumer) override {
    if (consumer == -1) return;
    cudaStream_t s = consumer == 1 ? cudaStreamLegacy : consumer == 2 ? cudaStreamPerThread
                                                                      : reinterpret_cast<cudaStream_t>(consumer);
    if (s == stream_) return;
    check(cudaEventRecord(event_, stream_), "cudaEventRecord");
    check(cudaStreamWaitEvent(s, event_, 0), "cudaStreamWaitEvent");
  }

  void* alloc(size_t bytes) override {
    void* p = nullptr;
    check(cudaSetDevice(device_), "cudaSetDevice");
    check(cudaMalloc(&p, bytes), "cudaMalloc");  // 256-byte aligned, as TensorRT asks
    check(cudaMemsetAsync(p, 0, bytes, stream_), "cudaMemset");
    return p;
  }
  void release(void* p) noexcept override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaFree(p);
  }

  void upload(void* dst, const void* src, size_t bytes) override {
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "upload");
    // Pageable host memory: the copy has been staged when this returns, so the caller may reuse src.
  }
  void download(void* dst, const void* src, size_t bytes) override {
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "download");
    check(cudaStreamSynchronize(stream_), "download sync");
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (dst != src) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy");
  }
  void fill_f32(float* dst, int64_t n, float v) override {
    if (n <= 0) return;
    fill_kernel<<<blocks(n), kThreads, 0, stream_>>>(dst, n, v);
    check(cudaGetLastError(), "fill kernel");
  }
  // A launch of zero blocks is an error in CUDA, not a no-op: every launcher returns early on empty work.
  void iota_zero(int* idx, int* count, int n) override {
    if (n <= 0) return;
    iota_kernel<<<blocks(n), kThreads, 0, stream_>>>(idx, count, n);
    check(cudaGetLastError(), "iota kernel");
  }
  void gather_rows(void* dst, const void* src, const int* idx, int m, size_t row) override {
    if (m <= 0) return;
    gather_kernel<<<m, kThreads, 0, stream_>>>(static_cast<uint32_t*>(dst), static_cast<const uint32_t*>(src), idx,
                                               int64_t(row / 4), false);
    check(cudaGetLastError(), "gather kernel");
  }
  void scatter_rows(void* dst, const void* src, const int* idx, int m, size_t row) override {
    if (m <= 0) return;
    gather_kernel<<<m, kThreads, 0, stream_>>>(static_cast<uint32_t*>(dst), static_cast<const uint32_t*>(src), idx,
                                               int64_t(row / 4), true);
    check(cudaGetLastError(), "scatter kernel");
  }
  int decide(const ExitParams& p, const ExitBuffers& b, int n) override {
    decide_kernel<<<1, 1, 0, stream_>>>(p, b, n);
    check(cudaGetLastError(), "decide kernel");
    check(cudaMemcpyAsync(m_host_, b.m_out, sizeof(int), cudaMemcpyDeviceToHost, stream_), "exit count");
    check(cudaStreamSynchronize(stream_), "exit count sync");
    return *m_host_;
  }
  void relative_change(float* score, const float* h, const float* prev, int n, int64_t row) override {
    if (n <= 0) return;
    relative_change_kernel<<<n, kThreads, 0, stream_>>>(score, h, prev, row);
    check(cudaGetLastError(), "relative change kernel");
  }
  void sampler_step(const StepCoefs& c, float* x, const float* eps, float* x0_prev, int64_t n) override {
    if (n <= 0) return;
    sampler_kernel<<<blocks(n), kThreads, 0, stream_>>>(c, x, eps, x0_prev, n);
    check(cudaGetLastError(), "sampler kernel");
  }
  void cfg_combine(float* out, const float* eps, int64_t half, float w) override {
    if (half <= 0) return;
    cfg_kernel<<<blocks(half), kThreads, 0, stream_>>>(out, eps, half, w);
    check(cudaGetLastError(), "cfg kernel");
  }
  void clamp_unit(float* x, int64_t n) override {
    if (n <= 0) return;
    clamp_kernel<<<blocks(n), kThreads, 0, stream_>>>(x, n);
    check(cudaGetLastError(), "clamp kernel");
  }
  void synchronize() override { check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

 private:
  int device_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t event_ = nullptr;
  int* m_host_ = nullptr;
};

}  // namespace

bool cuda_compiled() { return true; }
std::unique_ptr<Ops> make_cuda_ops(int device_index) { return std::make_unique<CudaOps>(device_index); }

}  // namespace adadiff
