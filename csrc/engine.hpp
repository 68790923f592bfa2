// The one small interface every executor implements (OpenVINO, TensorRT, Python callables).
#pragma once

#include <string>

namespace adadiff {

class Engine {
 public:
  virtual ~Engine() = default;
  virtual std::string name() const = 0;
  // Largest batch a single run accepts.
  virtual int max_batch() const = 0;
  // Runs manifest segment `seg` on `batch` rows. `in` / `out` hold one pointer per tensor of the
  // segment, in manifest order; the memory is the runtime's (host or device, as its Ops say) and
  // stays valid for the call. Throws std::runtime_error naming the segment on failure.
  virtual void run(int seg, int batch, void* const* in, void* const* out) = 0;
  // Optional: stem -> layers 1..`layers` -> head as one executable, for the `static` policy, where
  // no decision falls between the segments. `in` holds the stem's inputs in manifest order, `eps`
  // the head's output. Returns false when the engine cannot fuse (the runtime then chains the
  // segments); a per-segment call costs tens of microseconds that one graph does not pay.
  virtual bool run_static(int /*layers*/, int /*batch*/, void* const* /*in*/, void* /*eps*/) { return false; }
};

}  // namespace adadiff
