// The early-exit runtime: buffers, the exit loop with compaction, and the sampling loop.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine.hpp"
#include "manifest.hpp"
#include "ops.hpp"

namespace adadiff {

// Every field left empty takes the manifest's exit defaults (docs/MANIFEST.md, `exit`).
struct DenoiseOptions {
  std::optional<std::string> policy;  // uem | uem-time | schedule | static | saturation
  std::optional<double> threshold;
  std::optional<int> patience;
  std::optional<std::string> granularity;
  std::optional<int> static_layer;
  std::optional<TimeTable> table;  // schedule / uem-time: none = the manifest's exit.schedule / exit.uem_time
};

struct SampleOptions {
  std::string sampler = "dpm++";
  int steps = 0;          // 0: the sampler's default (dpm++ 50, ddim 100, euler 1000)
  std::optional<double> guidance;  // none: the manifest's default
  double eta = 0.0;
  uint64_t seed = 0;
  bool final_x0 = true;  // the last step returns x0 = (x - sigma eps) / alpha (samplers.py's final_x0)
  DenoiseOptions exit;
};

class Runtime {
 public:
  // The buffers hold min(2 x max_batch, engine->max_batch()) rows (2 x max_batch so guided sampling
  // fits one call). Throws naming the memory they need when the device has less free (see
  // require_memory), before allocating any.
  Runtime(Manifest manifest, std::unique_ptr<Ops> ops, std::unique_ptr<Engine> engine);
  ~Runtime();

  // Bytes a Runtime for `model` allocates for `capacity` rows: its constructor's own list of
  // buffers, added up without allocating them.
  static uint64_t memory_needed(const ModelDesc& model, int capacity, bool u_map);

  const Manifest& manifest() const { return m_; }
  int capacity() const { return cap_; }
  const Engine& engine() const { return *engine_; }
  bool is_cuda() const { return ops_->is_cuda(); }

  // Arrays in and out: host memory, or with `device_io` memory of the Runtime's own device (CUDA),
  // copied device to device on its stream with no wait at the end (the caller orders its stream
  // after it: Ops::hand_off). Device inputs are not scanned for NaN; t and y are read back (a few
  // bytes) for their checks and the host's exit decisions. eps [B, C, H, W], exit_layer [B], u [B, N].
  void denoise(int batch, const float* x, const float* t, const int64_t* y, const DenoiseOptions& o, float* eps,
               int64_t* exit_layer, float* u, bool device_io = false);
  // images [B, C, H, W]; layers [steps, B_eff] (host) with B_eff = 2B under guidance.
  void sample(int batch, const float* noise, const int64_t* y, const SampleOptions& o, float* images,
              std::vector<int64_t>& layers, int& steps_out, int& batch_eff_out, bool device_io = false);
  // The `full` graph (the speed baseline).
  void full(int batch, const float* x, const float* t, const int64_t* y, float* eps, bool device_io = false);
  Ops& ops() { return *ops_; }

  // Engine executions the last denoise / sample / full call made (a chained forward: one per
  // segment run; a fused static or exit-graph forward: one).
  int64_t engine_calls() const { return calls_; }

  // Resolved values, for the Python layer's shape bookkeeping.
  int resolve_steps(const SampleOptions& o) const;
  double resolve_guidance(const SampleOptions& o) const;

 private:
  struct Resolved {
    ExitParams p;             // p.table points into the runtime's table buffers once bound
    const TimeTable* table = nullptr;  // host copy: schedule / uem-time
    std::string policy;
  };
  // Checks the options against the manifest; the table (when any) is copied to table_.
  Resolved resolve(const DenoiseOptions& o);
  // Uploads table_ to the table buffers and points r.p.table at them.
  void bind_table(Resolved& r);
  void check_inputs(const char* fn, int batch, const float* x, const float* t, const int64_t* y, int limit) const;
  // Device inputs: t and y read back to host memory (t_host_, y_host_) for check_inputs and the host's
  // decisions; returns the host pointers (nullptr stays nullptr).
  std::pair<const float*, const int64_t*> read_back(int batch, const float* t, const int64_t* y);
  // Into / out of the runtime's buffers: upload / download, or device copies with `device_io`.
  void put(void* dst, const void* src, size_t bytes, bool device_io);
  void get(void* dst, const void* src, size_t bytes, bool device_io);
  // The exit loop: x/t/y in runtime buffers (n rows); eps into eps_out_, layers into exit_layer
  // (runtime memory, n entries), u into u_all_.
  // t_host: each row's time on the host, which picks the fused paths of the time-table policies.
  void run_exit_loop(int n, const void* x, const float* t_host, const Resolved& r, int64_t* exit_layer);
  // The table policies' fused forms: one static layer for every row, or per-layer thresholds for
  // the exit graph. Return false when the engine declines or rows differ (the chain then runs).
  bool run_schedule_fused(int n, void* const* in, const float* t_host, const Resolved& r, int64_t* exit_layer);
  bool run_exit_graph(int n, void* const* in, const float* t_host, const Resolved& r, int64_t* exit_layer);
  // Rows (of the n working ones) that exit after 0-based `layer` when the host knows without the
  // scores; -1 when a score decides. `rows`, t_host: the call's rows and their times.
  int known_exits(const Resolved& r, int layer, int n, int rows, const float* t_host) const;
  // The model's inputs (x, t_in_, y_in_ when conditional) in `s`'s input order: stem and full share them.
  void model_inputs(const SegmentDesc& s, const void* x, void* in[3]);
  // Sizes only (memory_needed): nothing is allocated, no engine.
  Runtime(const ModelDesc& model, int capacity, bool u_map);
  void set_sizes(const ModelDesc& model, int capacity, bool u_map);
  // Every buffer and host array sized by the capacity, each handed to `f(storage, bytes)` once:
  // the one list that memory_needed counts and the constructor allocates.
  template <class F>
  void each_allocation(F&& f);
  int take();
  void give(int id);
  void run(int seg, int n, void* const* in, void* const* out);  // engine_->run, counted

  Manifest m_;
  std::unique_ptr<Ops> ops_;
  std::unique_ptr<Engine> engine_;
  std::mutex mu_;  // one call at a time per Runtime; separate Runtimes run in parallel
  int64_t calls_ = 0;

  int cap_ = 0, n_layers_ = 0, k_ = 0;
  bool maps_ = false;  // the layers emit u_map
  int64_t img_ = 0, hid_ = 0, dim_ = 0;
  int seg_head_ = 0, seg_full_ = 0;

  Buffer x_in_, t_in_, y_in_, u_, score_, eps_head_, eps_out_, u_all_, exit_layer_;
  Buffer temb_[2];
  std::vector<int64_t> static_layers_;  // host: the exit layers a fused static run reports
  std::vector<float> t_rows_;           // host: one step's time for every row (sample)
  std::vector<float> graph_thr_;        // host: the exit graph's per-layer (per-row) thresholds
  TimeTable table_;                     // host: the table of the current call
  Buffer tb_bounds_, tb_min_, tb_max_, tb_thr_;  // the same, where decide_exits reads it
  Buffer active_[2], count_[2], exit_idx_, exit_dest_, keep_idx_, exit_count_;
  Buffer x_state_, x0_prev_, eps_cfg_, u_map_;
  Buffer history_;
  std::vector<float> t_host_;    // device_io: t read back
  std::vector<int64_t> y_host_;  // device_io: y read back  // sample(): each step's exit layers; grows to the largest steps x rows asked
  std::vector<Buffer> hidden_;
  std::vector<int> free_;
  std::vector<int> saved_;
};

// Throws std::runtime_error when a Runtime of `capacity` rows for `model` (built for `max_batch`)
// needs more memory than `ops`' device has free, naming both figures and the largest max_batch that
// fits; the OOM killer would otherwise end the process while the buffers are zeroed.
void require_memory(const ModelDesc& model, int max_batch, int capacity, bool u_map, const Ops& ops);

}  // namespace adadiff
