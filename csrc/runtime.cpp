// The runtime: exit policies resolved and run, denoise and full (the buffers and their size are
// runtime_buffers.cpp, the sampling loop runtime_sample.cpp).
#include "runtime.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace adadiff {

namespace {

[[noreturn]] void invalid(const std::string& what) { throw std::invalid_argument(what); }

}  // namespace

void Runtime::run(int seg, int n, void* const* in, void* const* out) {
  ++calls_;
  engine_->run(seg, n, in, out);
}

Runtime::Resolved Runtime::resolve(const DenoiseOptions& o) {
  const ExitDefaults& d = m_.exit;
  Resolved r;
  ExitParams& p = r.p;
  r.policy = o.policy.value_or(d.policy);
  const std::string& pol = r.policy;
  if (pol == "uem" || pol == "uem-time") p.policy = Policy::Uem;
  else if (pol == "static") p.policy = Policy::Static;
  else if (pol == "saturation") p.policy = Policy::Saturation;
  else if (pol == "schedule") p.policy = Policy::Schedule;
  else if (pol == "uem-authors") p.policy = Policy::UemAuthors;
  else invalid("policy must be one of 'uem', 'uem-time', 'schedule', 'static', 'saturation', 'uem-authors', got '" +
               pol + "'");
  const bool authors = pol == "uem-authors";
  // uem-authors decides for the batch: a call that names no granularity means that, not the folder's default.
  const std::string gran = o.granularity.value_or(authors ? "batch" : d.granularity);
  if (gran == "sample") p.granularity = Granularity::Sample;
  else if (gran == "batch") p.granularity = Granularity::Batch;
  else invalid("granularity must be 'sample' or 'batch', got '" + gran + "'");
  const double thr = o.threshold.value_or(d.threshold);
  // As the oracle: u is a probability, so uem thresholds live in [0, 1]; a relative change may exceed 1.
  if ((pol == "uem" || authors) && !(thr >= 0.0 && thr <= 1.0)) invalid("threshold must be in [0, 1], got " + std::to_string(thr));
  if (!(thr >= 0.0) || !std::isfinite(thr)) invalid("threshold must be a finite number >= 0, got " + std::to_string(thr));
  p.threshold = float(thr);
  p.patience = o.patience.value_or(authors ? 1 : d.patience);
  if (p.patience < 1) invalid("patience must be >= 1, got " + std::to_string(p.patience));
  if (authors && p.granularity != Granularity::Batch)
    invalid("policy 'uem-authors' decides for the batch (the authors' rule); use granularity 'batch'");
  if (authors && p.patience != 1)
    invalid("policy 'uem-authors' has the authors' own patience (two triggers in the in blocks, one from the mid "
            "block on); leave patience at 1");
  const int layer = o.static_layer.value_or(d.layer);
  if (layer < 0 || layer > n_layers_)
    invalid("static_layer must be in 0.." + std::to_string(n_layers_) + " (0 = full depth), got " +
            std::to_string(layer));
  p.static_layer = layer > 0 ? layer : n_layers_;
  p.n_layers = n_layers_;
  if (o.table && pol != "schedule" && pol != "uem-time")
    invalid("a time table is used by policy 'schedule' or 'uem-time', not '" + pol + "'");
  if (pol == "schedule" || pol == "uem-time") {
    const bool uem = pol == "uem-time";
    if (uem && p.granularity == Granularity::Batch)
      invalid("policy 'uem-time' decides per sample; granularity 'batch' is the paper's rule (policy 'uem')");
    const TimeTable& stored = uem ? d.uem_time : d.schedule;
    if (!o.table && stored.empty())
      invalid("policy '" + pol + "' needs a time table: none was given and the engines folder's manifest has no exit." +
              (uem ? "uem_time" : "schedule") + " (calibrate the folder: python -m adadiff_export calibrate ENGINES)");
    table_ = o.table ? *o.table : stored;
    if (o.table) check_time_table(table_, n_layers_, uem, uem ? "uem-time table" : "schedule");
    r.table = &table_;
  }
  return r;
}

void Runtime::bind_table(Resolved& r) {
  if (!r.table) return;
  const TimeTable& t = *r.table;
  const int k = t.bins();
  if (!t.bounds.empty()) ops_->upload(tb_bounds_.as(), t.bounds.data(), t.bounds.size() * sizeof(double));
  ops_->upload(tb_min_.as(), t.min_layer.data(), size_t(k) * sizeof(int));
  ops_->upload(tb_max_.as(), t.max_layer.data(), size_t(k) * sizeof(int));
  if (!t.threshold.empty()) ops_->upload(tb_thr_.as(), t.threshold.data(), size_t(k) * sizeof(float));
  r.p.table = TimeTableView{tb_bounds_.as<double>(), tb_min_.as<int>(), tb_max_.as<int>(),
                            t.threshold.empty() ? nullptr : tb_thr_.as<float>(), k};
}

void Runtime::check_inputs(const char* fn, int batch, const float* x, const float* t, const int64_t* y,
                           int limit) const {
  if (batch < 1 || batch > limit)
    invalid(std::string(fn) + ": batch " + std::to_string(batch) + " is outside 1.." + std::to_string(limit) +
            " (the engines' max_batch)");
  const int64_t nx = x ? int64_t(batch) * img_ : 0;  // x null: device memory, not scanned
  for (int64_t i = 0; i < nx; ++i)
    if (!std::isfinite(x[i]))
      invalid(std::string(fn) + ": input x holds NaN or Inf (first at flat index " + std::to_string(i) + ")");
  if (t) {
    for (int i = 0; i < batch; ++i)
      if (!std::isfinite(t[i])) invalid(std::string(fn) + ": input t holds NaN or Inf at " + std::to_string(i));
  }
  const ModelDesc& c = m_.model;
  if (c.conditional()) {
    if (!y) invalid(std::string(fn) + ": this model is class-conditional; y (int64 [B]) is required");
    for (int i = 0; i < batch; ++i)
      if (y[i] < 0 || y[i] > c.num_classes)
        invalid(std::string(fn) + ": y[" + std::to_string(i) + "] = " + std::to_string(y[i]) + " is outside 0.." +
                std::to_string(c.num_classes) + " (" + std::to_string(c.null_class) + " is the null class)");
  } else if (y) {
    invalid(std::string(fn) + ": this model is unconditional; pass y=None");
  }
}

void Runtime::model_inputs(const SegmentDesc& s, const void* x, void* in[3]) {
  in[0] = in[1] = in[2] = nullptr;
  in[s.input_index("x")] = const_cast<void*>(x);
  in[s.input_index("t")] = t_in_.as();
  if (m_.model.conditional()) in[s.input_index("y")] = y_in_.as();
}

bool Runtime::run_schedule_fused(int n, void* const* in, const float* t_host, const Resolved& r,
                                 int64_t* exit_layer) {
  const int layer = r.table->min_layer[size_t(r.table->bin(t_host[0]))];
  for (int j = 1; j < n; ++j)
    if (r.table->min_layer[size_t(r.table->bin(t_host[j]))] != layer) return false;
  if (!engine_->run_static(layer, n, in, eps_out_.as())) return false;
  ++calls_;
  std::fill_n(static_layers_.begin(), n, int64_t(layer));
  ops_->upload(exit_layer, static_layers_.data(), size_t(n) * sizeof(int64_t));
  return true;
}

bool Runtime::run_exit_graph(int n, void* const* in, const float* t_host, const Resolved& r, int64_t* exit_layer) {
  const ExitParams& p = r.p;
  const bool per_row = p.granularity == Granularity::Sample && n > 1;
  // -1 and 2 stand for "no exit here" and "exit here" (u lies in [0, 1]); a forced exit that way
  // would need patience 1, so uem-time with more patience takes the chain.
  if (r.table && p.patience != 1) return false;
  const int cols = per_row ? n : 1;
  for (int i = 0; i + 1 < n_layers_; ++i) {
    for (int j = 0; j < cols; ++j) {
      float v = p.threshold;
      if (r.table) {
        const int k = r.table->bin(t_host[j]);
        const int here = i + 1;
        v = here >= r.table->max_layer[size_t(k)]   ? 2.0f
            : here < r.table->min_layer[size_t(k)] ? -1.0f
                                                   : r.table->threshold[size_t(k)];
      }
      graph_thr_[size_t(i) * size_t(cols) + size_t(j)] = v;
    }
  }
  const ExitGraphSpec spec{per_row, p.patience};
  if (!engine_->run_exit(spec, n, in, graph_thr_.data(), eps_out_.as(), u_all_.as(), exit_layer)) return false;
  ++calls_;
  return true;
}

int Runtime::known_exits(const Resolved& r, int layer, int n, int rows, const float* t_host) const {
  const ExitParams& p = r.p;
  const int here = layer + 1;
  if (here == n_layers_) return n;
  switch (p.policy) {
    case Policy::Static: return here >= p.static_layer ? n : 0;
    case Policy::Schedule: {
      // Rows scheduled for an earlier layer have left: those exiting now are the ones scheduled here.
      int m = 0;
      for (int j = 0; j < rows; ++j) m += r.table->min_layer[size_t(r.table->bin(t_host[j]))] == here ? 1 : 0;
      return m;
    }
    case Policy::Uem:
    case Policy::Saturation:
      // u is a mean of sigmoids and the relative change a ratio of norms: neither is below 0.
      return !r.table && p.threshold <= 0.0f ? 0 : -1;
    case Policy::UemAuthors:
      return -1;  // one decision per batch (or half), with a second trigger in the in blocks: read it back
  }
  return -1;
}

void Runtime::run_exit_loop(int n, const void* x, const float* t_host, const Resolved& r, int64_t* exit_layer) {
  const ExitParams& base = r.p;
  const int rows = n;
  free_.clear();
  for (int i = int(hidden_.size()) - 1; i >= 0; --i) free_.push_back(i);
  saved_.clear();
  int tb = 0, ab = 0;

  const SegmentDesc& stem = m_.segments[0];
  void* in[3];
  model_inputs(stem, x, in);
  if (base.policy == Policy::Static && engine_->run_static(base.static_layer, n, in, eps_out_.as())) {
    ++calls_;
    std::fill_n(static_layers_.begin(), n, int64_t(base.static_layer));
    ops_->upload(exit_layer, static_layers_.data(), size_t(n) * sizeof(int64_t));
    return;
  }
  if (base.policy == Policy::Schedule && run_schedule_fused(n, in, t_host, r, exit_layer)) return;
  if (base.policy == Policy::Uem && run_exit_graph(n, in, t_host, r, exit_layer)) return;
  int hcur = take();
  {
    void* out[2] = {nullptr, nullptr};
    out[stem.output_index("h")] = hidden_[hcur].as();
    out[stem.output_index("temb")] = temb_[tb].as();
    run(0, n, in, out);
  }
  ops_->iota_zero(active_[ab].as<int>(), count_[ab].as<int>(), n);
  if (base.policy == Policy::Uem || base.policy == Policy::UemAuthors)
    ops_->fill_f32(u_all_.as<float>(), int64_t(n) * n_layers_, NAN);

  bool identity = true;  // no sample has left yet: row j is still sample j
  const size_t hrow = hid_ * sizeof(float), erow = img_ * sizeof(float), trow = dim_ * sizeof(float);
  for (int i = 0; i < n_layers_; ++i) {
    const SegmentDesc& seg = m_.segments[1 + i];
    const int hout = take();
    void* in[3] = {nullptr, nullptr, nullptr};
    void* out[3] = {nullptr, nullptr, nullptr};
    in[seg.input_index("h_in")] = hidden_[hcur].as();
    in[seg.input_index("temb")] = temb_[tb].as();
    if (seg.skip_from) in[seg.input_index("skip")] = hidden_[saved_[seg.skip_from - 1]].as();
    out[seg.output_index("h_out")] = hidden_[hout].as();
    out[seg.output_index("u")] = u_.as();
    if (seg.outputs.size() == 3) out[seg.output_index("u_map")] = u_map_.as();
    run(1 + i, n, in, out);

    const bool last = i == n_layers_ - 1;
    const float* score = u_.as<float>();
    if (base.policy == Policy::Saturation && !last) {
      ops_->relative_change(score_.as<float>(), hidden_[hout].as<float>(), hidden_[hcur].as<float>(), n, hid_);
      score = score_.as<float>();
    }
    bool cur_saved = false;
    for (int s : saved_) cur_saved |= s == hcur;
    if (!cur_saved) give(hcur);
    hcur = hout;
    if (i < k_) saved_.push_back(hout);

    ExitParams p = base;
    p.layer = i;
    const int known = known_exits(r, i, n, rows, t_host);
    if (known == 0) p.forced = 0;  // the device follows the host's answer, whatever a score holds
    ExitBuffers b{score,
                  t_in_.as<float>(),
                  active_[ab].as<int>(),
                  count_[ab].as<int>(),
                  active_[1 - ab].as<int>(),
                  count_[1 - ab].as<int>(),
                  exit_idx_.as<int>(),
                  exit_dest_.as<int>(),
                  keep_idx_.as<int>(),
                  exit_layer,
                  u_all_.as<float>(),
                  exit_count_.as<int>()};
    const int m = ops_->decide(p, b, n, known);
    ab = 1 - ab;  // decide wrote the kept rows' samples and counters into the other pair
    if (m == 0) continue;

    void* head_in[1];
    void* head_out[1];
    if (m == n) {
      head_in[0] = hidden_[hcur].as();
      head_out[0] = identity ? eps_out_.as() : eps_head_.as();
      run(seg_head_, n, head_in, head_out);
      if (!identity) ops_->scatter_rows(eps_out_.as(), eps_head_.as(), exit_dest_.as<int>(), m, erow);
      break;
    }
    const int hx = take();
    ops_->gather_rows(hidden_[hx].as(), hidden_[hcur].as(), exit_idx_.as<int>(), m, hrow);
    head_in[0] = hidden_[hx].as();
    head_out[0] = eps_head_.as();
    run(seg_head_, m, head_in, head_out);
    ops_->scatter_rows(eps_out_.as(), eps_head_.as(), exit_dest_.as<int>(), m, erow);
    give(hx);

    // Compaction: the samples still running move to the front of fresh buffers (out of place,
    // so the CUDA gather never reads a row another thread is writing).
    const int keep = n - m;
    const int* kidx = keep_idx_.as<int>();
    bool cur_done = false;
    for (int& s : saved_) {
      const int dst = take();
      ops_->gather_rows(hidden_[dst].as(), hidden_[s].as(), kidx, keep, hrow);
      if (s == hcur) {
        hcur = dst;
        cur_done = true;
      }
      give(s);
      s = dst;
    }
    if (!cur_done) {
      const int dst = take();
      ops_->gather_rows(hidden_[dst].as(), hidden_[hcur].as(), kidx, keep, hrow);
      give(hcur);
      hcur = dst;
    }
    ops_->gather_rows(temb_[1 - tb].as(), temb_[tb].as(), kidx, keep, trow);
    tb = 1 - tb;
    identity = false;
    n = keep;
  }
}

std::pair<const float*, const int64_t*> Runtime::read_back(int batch, const float* t, const int64_t* y) {
  if (t) {
    t_host_.resize(size_t(batch));
    ops_->download(t_host_.data(), t, size_t(batch) * sizeof(float));
  }
  if (y) {
    y_host_.resize(size_t(batch));
    ops_->download(y_host_.data(), y, size_t(batch) * sizeof(int64_t));
  }
  return {t ? t_host_.data() : nullptr, y ? y_host_.data() : nullptr};
}

void Runtime::put(void* dst, const void* src, size_t bytes, bool device_io) {
  if (device_io) ops_->copy(dst, src, bytes);
  else ops_->upload(dst, src, bytes);
}

void Runtime::get(void* dst, const void* src, size_t bytes, bool device_io) {
  if (device_io) ops_->copy(dst, src, bytes);
  else ops_->download(dst, src, bytes);
}

void Runtime::denoise(int batch, const float* x, const float* t, const int64_t* y, const DenoiseOptions& o,
                      float* eps, int64_t* exit_layer, float* u, bool device_io) {
  std::lock_guard<std::mutex> lock(mu_);
  DeviceScope on(*ops_);
  calls_ = 0;
  Resolved r = resolve(o);
  const auto [th, yh] = device_io ? read_back(batch, t, y) : std::make_pair(t, y);
  check_inputs("denoise", batch, device_io ? nullptr : x, th, yh, std::min(m_.max_batch, cap_));
  bind_table(r);
  put(x_in_.as(), x, size_t(batch) * img_ * sizeof(float), device_io);
  put(t_in_.as(), t, size_t(batch) * sizeof(float), device_io);
  if (y) put(y_in_.as(), y, size_t(batch) * sizeof(int64_t), device_io);
  run_exit_loop(batch, x_in_.as(), th, r, exit_layer_.as<int64_t>());
  get(eps, eps_out_.as(), size_t(batch) * img_ * sizeof(float), device_io);
  get(exit_layer, exit_layer_.as(), size_t(batch) * sizeof(int64_t), device_io);
  if (r.p.policy != Policy::Uem && r.p.policy != Policy::UemAuthors)
    ops_->fill_f32(u_all_.as<float>(), int64_t(batch) * n_layers_, NAN);
  get(u, u_all_.as(), size_t(batch) * n_layers_ * sizeof(float), device_io);
}

void Runtime::full(int batch, const float* x, const float* t, const int64_t* y, float* eps, bool device_io) {
  std::lock_guard<std::mutex> lock(mu_);
  DeviceScope on(*ops_);
  calls_ = 0;
  const auto [th, yh] = device_io ? read_back(batch, t, y) : std::make_pair(t, y);
  check_inputs("full", batch, device_io ? nullptr : x, th, yh, std::min(m_.max_batch, cap_));
  put(x_in_.as(), x, size_t(batch) * img_ * sizeof(float), device_io);
  put(t_in_.as(), t, size_t(batch) * sizeof(float), device_io);
  if (y) put(y_in_.as(), y, size_t(batch) * sizeof(int64_t), device_io);
  void* in[3];
  void* out[1] = {eps_out_.as()};
  model_inputs(m_.segments[seg_full_], x_in_.as(), in);
  run(seg_full_, batch, in, out);
  get(eps, eps_out_.as(), size_t(batch) * img_ * sizeof(float), device_io);
}

}  // namespace adadiff
