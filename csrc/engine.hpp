// The one small interface every executor implements (OpenVINO, TensorRT, Python callables).
#pragma once

#include <cstdint>
#include <string>

namespace adadiff {

// The `uem` exit loop run inside one executable (see Engine::run_exit).
struct ExitGraphSpec {
  bool per_row = false;  // each row exits on its own (granularity sample); false: all rows on the batch mean
  int patience = 1;
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual std::string name() const = 0;
  // Largest batch a single run accepts.
  virtual int max_batch() const = 0;
  // Whether runs replay CUDA graphs (TensorRT), and how many the engine has captured so far.
  virtual bool cuda_graphs() const { return false; }
  virtual int64_t graphs_captured() const { return 0; }
  // Runs manifest segment `seg` on `batch` rows. `in` / `out` hold one pointer per tensor of the
  // segment, in manifest order; the memory is the runtime's (host or device, as its Ops say) and
  // stays valid for the call. Throws std::runtime_error naming the segment on failure.
  virtual void run(int seg, int batch, void* const* in, void* const* out) = 0;
  // Optional: stem -> layers 1..`layers` -> head as one executable, for the `static` policy, where
  // no decision falls between the segments. `in` holds the stem's inputs in manifest order, `eps`
  // the head's output. Returns false when the engine cannot fuse (the runtime then chains the
  // segments); a per-segment call costs tens of microseconds that one graph does not pay.
  virtual bool run_static(int /*layers*/, int /*batch*/, void* const* /*in*/, void* /*eps*/) { return false; }
  // Optional: the `uem` exit loop with its decisions inside the engine: after each layer i < N the
  // executable tests u against thresholds[i] itself and skips the layers left once every row has
  // exited, so a forward is one call instead of one per segment. `thresholds` is layer-major:
  // [N - 1][batch] for per-row exit, [N - 1] for the batch mean; -1 means "no exit here" (a
  // minimum layer) and 2 "exit here" (a maximum layer), since u lies in [0, 1]. Rows that exit
  // while others run keep their hidden state (their later layers are computed and discarded).
  // Writes eps [B, C, H, W], u [B, N] (NaN where a layer did not run for that row, and for the
  // last layer, as the chained loop records) and each row's exit layer (int64 [B]). `in` as for
  // run_static. Returns false when the engine declines; the runtime then chains the segments.
  virtual bool run_exit(const ExitGraphSpec& /*spec*/, int /*batch*/, void* const* /*in*/,
                        const float* /*thresholds*/, void* /*eps*/, void* /*u*/, void* /*exit_layer*/) {
    return false;
  }
};

}  // namespace adadiff
