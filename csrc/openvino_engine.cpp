// OpenVINO on CPU: each ONNX segment compiled with a bounded dynamic batch, plus static-batch
// variants for recurring batch sizes; every run binds ov::Tensor views over the runtime's own
// buffers, so segments hand data to each other in place. Where no decision needs the host, whole
// forwards stitched from the segments (openvino_stitch.cpp) run as one compiled graph: static exit
// (fuse) and the uem exit loop with its tests inside the graph (exit_graph).
#include "openvino_engine.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <tuple>
#include <unordered_map>
#include <vector>

#ifdef ADADIFF_WITH_OPENVINO
#include <openvino/runtime/core.hpp>
#include <openvino/runtime/intel_cpu/properties.hpp>
#include <openvino/runtime/properties.hpp>

#include "openvino_stitch.hpp"
#endif

namespace adadiff {

#ifndef ADADIFF_WITH_OPENVINO

bool openvino_compiled() { return false; }
std::unique_ptr<Engine> make_openvino_engine(const Manifest&, const OpenVinoOptions&) {
  throw std::runtime_error("engine='openvino': this adadiff_rt was built without OpenVINO");
}

#else

bool openvino_compiled() { return true; }

namespace {

ov::element::Type ov_type(DType d) {
  switch (d) {
    case DType::Float32: return ov::element::f32;
    case DType::Float16: return ov::element::f16;
    case DType::BFloat16: return ov::element::bf16;
    case DType::Int64: return ov::element::i64;
  }
  return ov::element::dynamic;
}

struct Port {
  ov::Output<const ov::Node> port;
  ov::element::Type type;
  ov::Shape shape;  // batch dimension rewritten per run; sized once here
  void* bound = nullptr;  // what the request holds now: rebinding the same view is skipped
  size_t bound_batch = 0;
};

// One compiled form of a segment with its own request and bindings.
struct Variant {
  ov::CompiledModel model;
  ov::InferRequest request;
  std::vector<Port> inputs, outputs;  // manifest order
};

// A segment: the bounded dynamic-batch model that runs any batch, plus static-batch variants for
// the batch sizes that recur. A dynamic model pays shape inference and intermediate re-allocation
// on every infer and the CPU plugin picks shape-agnostic kernels; over 15 small segments per
// denoise that per-call cost is what separated the segmented loop from the one `full` graph.
struct Segment {
  std::string name;
  std::vector<TensorDesc> inputs, outputs;  // the tensors a run binds, in manifest order
  std::shared_ptr<ov::Model> source;  // kept to reshape into static variants
  std::unique_ptr<Variant> dynamic;
  std::map<int, std::unique_ptr<Variant>> fixed;
  // Runs per batch size seen, until that size is promoted: a map, since a vector indexed by batch
  // would cost memory in proportion to max_batch in every segment.
  std::unordered_map<int, uint32_t> hits;
  bool ready = false;
};

// A batch size gets its own static compilation on its kPromoteAfter-th run; a fixed batch (the
// usual serving case) is promoted during warm-up while the sizes compaction produces once or
// twice stay on the dynamic model, so sampling never pays a compile per row count.
constexpr uint32_t kPromoteAfter = 3;
// Each variant costs a compile (about 50-400 ms here, cached on disk with cache_dir) and memory.
constexpr size_t kMaxStatic = 4;
// One compiled uem exit graph (exit_graph) and the tensors run_exit reaches past the manifest's
// bindings: the per-layer thresholds input and the raw u output, which stay in the request's own memory.
struct ExitGraph {
  Segment graph;  // one static-batch variant, in `fixed`
  ov::Tensor thr, u;
};

// The exit graph carries rows that have exited to the end of the forward (computed, discarded).
// For one or two rows (batch-1 sampling under guidance: both rows share t, on which the UEM's
// decision mostly depends) that waste is small beside the 15 engine calls it saves; for more rows
// compaction in the chained loop saves more.
constexpr int kExitGraphRows = 2;
// Exit graphs are compiled per (rows exit alone, patience, batch), each about 1 s and a model's
// weights in memory; past this many the runtime chains the segments instead.
constexpr size_t kMaxExitGraphs = 8;

class OpenVinoEngine final : public Engine {
 public:
  OpenVinoEngine(const Manifest& m, const OpenVinoOptions& o) : m_(m), o_(o), segs_(m.segments.size()) {
    if (o.precision != "fp32" && o.precision != "bf16")
      throw std::invalid_argument("precision must be 'fp32' or 'bf16' for OpenVINO, got '" + o.precision + "'");
    if (o.max_batch < 1) throw std::invalid_argument("OpenVINO max_batch must be >= 1");
    if (!o.cache_dir.empty()) core_.set_property(ov::cache_dir(o.cache_dir));
    // The same properties for every compiled model, `full` included, so the overhead benchmark
    // compares like with like: one stream (latency), f32 unless asked, the same thread count.
    config_ = ov::AnyMap{
        ov::hint::inference_precision(o_.precision == "bf16" ? ov::element::bf16 : ov::element::f32),
        ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY), ov::num_streams(1)};
    if (o_.threads > 0) config_.emplace(ov::inference_num_threads(o_.threads));
    // `full` is compiled on first use: only the benchmark and parity checks need it.
    for (size_t i = 0; i + 1 < m.segments.size(); ++i) load(int(i));
  }

  std::string name() const override { return "openvino"; }
  int max_batch() const override { return o_.max_batch; }

  void run(int seg, int batch, void* const* in, void* const* out) override {
    Segment& sg = segs_[seg];
    if (!sg.ready) load(seg);
    infer(sg, batch, in, out);
  }

  bool run_static(int layers, int batch, void* const* in, void* eps) override {
    if (!o_.fuse_static) return false;
    auto it = fused_.find(layers);
    if (it == fused_.end()) it = fused_.emplace(layers, fuse(layers)).first;
    void* out[1] = {eps};
    infer(it->second, batch, in, out);
    return true;
  }

 private:
  void infer(Segment& sg, int batch, void* const* in, void* const* out) {
    try {
      Variant& v = pick(sg, batch);
      for (size_t i = 0; i < v.inputs.size(); ++i) bind(v, v.inputs[i], batch, in[i]);
      for (size_t i = 0; i < v.outputs.size(); ++i) bind(v, v.outputs[i], batch, out[i]);
      v.request.infer();
    } catch (const std::exception& e) {
      throw std::runtime_error("OpenVINO: segment " + sg.name + " at batch " + std::to_string(batch) +
                               " failed: " + e.what());
    }
  }

  static void bind(Variant& v, Port& p, int batch, void* data) {
    // The exit loop hands the same buffers to the same segment call after call; set_tensor's
    // validation is a measurable part of a small segment's run time, so only changes are bound.
    if (p.bound == data && p.bound_batch == size_t(batch)) return;
    p.bound = nullptr;
    p.shape[0] = size_t(batch);
    // Outputs too are views: the plugin writes straight into the runtime's buffer.
    v.request.set_tensor(p.port, ov::Tensor(p.type, p.shape, data));
    p.bound = data;
    p.bound_batch = size_t(batch);
  }

  Variant& pick(Segment& sg, int batch) {
    if (batch < 1 || batch > o_.max_batch)
      throw std::runtime_error("batch outside 1.." + std::to_string(o_.max_batch));
    auto it = sg.fixed.find(batch);
    if (it != sg.fixed.end()) return *it->second;
    if (sg.fixed.size() < kMaxStatic && ++sg.hits[batch] >= kPromoteAfter) {
      return *sg.fixed.emplace(batch, compile(sg, batch)).first->second;
    }
    return *sg.dynamic;
  }

  void load(int seg) {
    const SegmentDesc& s = m_.segments[seg];
    const std::string path = m_.verified_path("segment " + s.name, s.file, s.sha256);
    Segment& sg = segs_[seg];
    sg.name = s.name;
    sg.inputs = s.inputs;
    sg.outputs = s.outputs;
    try {
      sg.source = core_.read_model(path);
      prepare(sg);
    } catch (const std::exception& e) {
      throw std::runtime_error("OpenVINO: cannot compile segment " + s.name + " from " + s.file + ": " + e.what());
    }
  }

  void prepare(Segment& sg) {
    sg.dynamic = compile(sg, 0);
    sg.hits.clear();
    sg.ready = true;
  }

  // The static policy's whole path as one compiled model (openvino_stitch.hpp).
  Segment fuse(int layers) {
    const int n_layers = m_.model.depth;
    if (layers < 1 || layers > n_layers)
      throw std::invalid_argument("static layer must be in 1.." + std::to_string(n_layers));
    Segment out;
    out.name = "static_" + std::to_string(layers) + " (stem, layer_1..layer_" + std::to_string(layers) + ", head fused)";
    try {
      out.source = stitch_static(m_, models(), layers);
      out.inputs = m_.segments[0].inputs;
      out.outputs = {head().outputs.at(0)};
      prepare(out);
    } catch (const std::exception& e) {
      throw std::runtime_error("OpenVINO: cannot fuse " + out.name + ": " + e.what());
    }
    return out;
  }

  bool run_exit(const ExitGraphSpec& spec, int batch, void* const* in, const float* thresholds, void* eps, void* u,
                void* exit_layer) override {
    if (!o_.fuse_exit || (spec.per_row && batch > kExitGraphRows)) return false;
    const auto key = std::make_tuple(spec.per_row, spec.patience, batch);
    auto it = exit_graphs_.find(key);
    if (it == exit_graphs_.end()) {
      if (exit_graphs_.size() >= kMaxExitGraphs) return false;
      it = exit_graphs_.emplace(key, exit_graph(spec, batch)).first;
    }
    ExitGraph& g = it->second;
    std::copy_n(thresholds, g.thr.get_size(), g.thr.data<float>());
    void* out[1] = {eps};
    infer(g.graph, batch, in, out);
    const float* ran_u = g.u.data<float>();
    // -inf marks a layer a row did not run (the graph's sentinel, see exit_graph); the chained
    // loop's record has NaN there and for the last layer, whose u no decision reads.
    const int n_layers = m_.model.depth;
    float* u_out = static_cast<float*>(u);
    int64_t* layers = static_cast<int64_t*>(exit_layer);
    for (int r = 0; r < batch; ++r) {
      int64_t ran = 0;
      for (int i = 0; i < n_layers; ++i) {
        const float value = ran_u[size_t(i) * size_t(batch) + size_t(r)];
        const bool skipped = std::isinf(value) && value < 0;
        ran += skipped ? 0 : 1;
        u_out[size_t(r) * size_t(n_layers) + size_t(i)] = skipped || i == n_layers - 1 ? NAN : value;
      }
      layers[r] = ran;
    }
    return true;
  }

  // The `uem` exit loop as one compiled model for one batch size (openvino_stitch.hpp); its
  // thresholds input and u output stay in the request's own memory (ExitGraph).
  ExitGraph exit_graph(const ExitGraphSpec& spec, int batch) {
    ExitGraph g;
    Segment& out = g.graph;
    out.name = std::string("uem exit graph (") + (spec.per_row ? "rows exit alone" : "batch mean") + ", patience " +
               std::to_string(spec.patience) + ")";
    try {
      out.source = stitch_exit(m_, models(), spec, batch);
      out.inputs = m_.segments[0].inputs;
      out.outputs = {head().outputs.at(0)};  // u: read from the request
      std::unique_ptr<Variant> v = compile(out, batch);
      g.thr = v->request.get_tensor("thr");
      g.u = v->request.get_tensor("u");
      out.fixed.emplace(batch, std::move(v));
    } catch (const std::exception& e) {
      throw std::runtime_error("OpenVINO: cannot build the " + out.name + " at batch " + std::to_string(batch) + ": " +
                               e.what());
    }
    return g;
  }

  const SegmentDesc& head() const { return m_.segments[m_.segments.size() - 2]; }

  // The segments' source models for stitching: stem, layers and head were all loaded by the
  // constructor (only `full` is loaded lazily, and no stitched graph uses it).
  SegmentModels models() const {
    SegmentModels out;
    for (const Segment& sg : segs_) out.push_back(sg.source);
    return out;
  }

  // batch 0: the bounded dynamic batch 1..max_batch; otherwise that static batch.
  std::unique_ptr<Variant> compile(Segment& sg, int batch) {
    std::map<std::string, ov::PartialShape> shapes;
    for (const TensorDesc& t : sg.inputs) {
      ov::PartialShape ps;
      ps.push_back(batch > 0 ? ov::Dimension(batch) : ov::Dimension(1, o_.max_batch));
      for (size_t d = 1; d < t.shape.size(); ++d) ps.push_back(ov::Dimension(t.shape[d]));
      shapes[t.name] = ps;
    }
    std::shared_ptr<ov::Model> model = sg.source->clone();
    model->reshape(shapes);
    auto v = std::make_unique<Variant>();
    v->model = core_.compile_model(model, "CPU", config_);
    v->request = v->model.create_infer_request();
    for (const TensorDesc& t : sg.inputs) v->inputs.push_back(port(v->model.input(t.name), t));
    for (const TensorDesc& t : sg.outputs) v->outputs.push_back(port(v->model.output(t.name), t));
    return v;
  }

  static Port port(const ov::Output<const ov::Node>& p, const TensorDesc& t) {
    if (p.get_element_type() != ov_type(t.dtype))
      throw std::runtime_error("tensor " + t.name + " is " + p.get_element_type().get_type_name() +
                               " in the ONNX file but " + dtype_name(t.dtype) + " in the manifest");
    Port out{p, ov_type(t.dtype), ov::Shape(t.shape.size())};
    for (size_t d = 1; d < t.shape.size(); ++d) out.shape[d] = size_t(t.shape[d]);
    return out;
  }

  Manifest m_;  // a copy: the Runtime owns the original
  OpenVinoOptions o_;
  ov::Core core_;
  ov::AnyMap config_;
  std::vector<Segment> segs_;
  std::map<int, Segment> fused_;  // static exit layer -> stem..layer..head as one model
  std::map<std::tuple<bool, int, int>, ExitGraph> exit_graphs_;  // (rows exit alone, patience, batch)
};

}  // namespace

std::unique_ptr<Engine> make_openvino_engine(const Manifest& m, const OpenVinoOptions& o) {
  return std::make_unique<OpenVinoEngine>(m, o);
}

#endif

}  // namespace adadiff
