// OpenVINO on CPU: each ONNX segment compiled with a bounded dynamic batch, plus static-batch
// variants for recurring batch sizes; every run binds ov::Tensor views over the runtime's own
// buffers, so segments hand data to each other in place. Where no decision needs the host, whole
// forwards are stitched from the segments into one graph: static exit (fuse) and the uem exit
// loop with its tests inside the graph (exit_graph).
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
#include <openvino/op/add.hpp>
#include <openvino/op/concat.hpp>
#include <openvino/op/constant.hpp>
#include <openvino/op/gather.hpp>
#include <openvino/op/greater_eq.hpp>
#include <openvino/op/if.hpp>
#include <openvino/op/less.hpp>
#include <openvino/op/parameter.hpp>
#include <openvino/op/reduce_logical_and.hpp>
#include <openvino/op/reduce_mean.hpp>
#include <openvino/op/reshape.hpp>
#include <openvino/op/result.hpp>
#include <openvino/op/select.hpp>
#include <openvino/op/unsqueeze.hpp>
#include <openvino/runtime/core.hpp>
#include <openvino/runtime/intel_cpu/properties.hpp>
#include <openvino/runtime/properties.hpp>
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

using Value = ov::Output<ov::Node>;

Value constant(const ov::Shape& shape, float v) {
  return ov::op::v0::Constant::create(ov::element::f32, shape, std::vector<float>{v})->output(0);
}

Value axes(std::vector<int64_t> a) { return ov::op::v0::Constant::create(ov::element::i64, {a.size()}, a)->output(0); }

// One branch of an ov If: parameters, each fed from a value of the enclosing graph, and results.
struct Branch {
  ov::ParameterVector params;
  std::vector<Value> sources;
  ov::ResultVector results;

  Value take(const Value& outer) {
    auto p = std::make_shared<ov::op::v0::Parameter>(outer.get_element_type(), outer.get_partial_shape());
    adopt(p, outer);
    return p->output(0);
  }
  void adopt(const std::shared_ptr<ov::op::v0::Parameter>& p, const Value& outer) {
    params.push_back(p);
    sources.push_back(outer);
  }
  void give(const Value& v) { results.push_back(std::make_shared<ov::op::v0::Result>(v)); }
};

// `cond` ? then : otherwise, as one If node; returns its outputs (the branches' results, in order).
std::vector<Value> branch(const Value& cond, Branch& then, Branch& otherwise) {
  auto node = std::make_shared<ov::op::v8::If>(cond);
  node->set_then_body(std::make_shared<ov::Model>(then.results, then.params));
  node->set_else_body(std::make_shared<ov::Model>(otherwise.results, otherwise.params));
  for (size_t k = 0; k < then.params.size(); ++k) node->set_input(then.sources[k], then.params[k], nullptr);
  for (size_t k = 0; k < otherwise.params.size(); ++k)
    node->set_input(otherwise.sources[k], nullptr, otherwise.params[k]);
  std::vector<Value> outs;
  for (size_t k = 0; k < then.results.size(); ++k) outs.push_back(node->set_output(then.results[k], otherwise.results[k]));
  return outs;
}

// The per-layer u [B] as one tensor of the shape [B, N] the engine binds, but laid out layer by
// layer (u of layer i for row r at flat index i * B + r): concatenating along the first axis is a
// plain append; stacking them as columns cost about 2% of a batch-1 forward in a probe.
Value layer_major(const std::vector<Value>& us, size_t batch, int n_layers) {
  const Value flat = std::make_shared<ov::op::v0::Concat>(us, 0);
  return std::make_shared<ov::op::v1::Reshape>(flat, axes({int64_t(batch), int64_t(n_layers)}), false);
}

// The branch's body inlined into the enclosing graph (the first layer: no row can have exited yet).
std::vector<Value> inline_branch(Branch& b) {
  for (size_t k = 0; k < b.params.size(); ++k) b.params[k]->output(0).replace(b.sources[k]);
  std::vector<Value> outs;
  for (const auto& r : b.results) outs.push_back(r->input_value(0));
  return outs;
}

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

  // The static policy's whole path as one ov::Model, stitched from the segments' own graphs (the
  // manifest stays the only contract: no extra ONNX file). Each layer's `u` output is left out,
  // so OpenVINO drops its UEM as dead code; what remains computes exactly what the chain does.
  Segment fuse(int layers) {
    const int n_layers = m_.model.depth;
    if (layers < 1 || layers > n_layers)
      throw std::invalid_argument("static layer must be in 1.." + std::to_string(n_layers));
    const std::string name = "static_" + std::to_string(layers);
    Segment out;
    out.name = name + " (stem, layer_1..layer_" + std::to_string(layers) + ", head fused)";
    try {
      // stem, layers and head were all loaded by the constructor (only `full` is loaded lazily)
      std::shared_ptr<ov::Model> stem = segs_[0].source->clone();
      ov::Output<ov::Node> h = produced(*stem, "h"), temb = produced(*stem, "temb");
      std::vector<ov::Output<ov::Node>> saved;
      for (int i = 1; i <= layers; ++i) {
        const SegmentDesc& d = m_.segments[i];
        std::shared_ptr<ov::Model> layer = segs_[i].source->clone();
        for (const auto& p : layer->get_parameters()) p->output(0).replace(layer_input(d, *p, h, temb, saved));
        h = produced(*layer, "h_out");
        if (d.block == "in") saved.push_back(h);
      }
      out.source = std::make_shared<ov::Model>(ov::ResultVector{named_result(head_on(h), "eps")},
                                               stem->get_parameters(), name);
      out.inputs = m_.segments[0].inputs;
      out.outputs = {m_.segments[size_t(head_index())].outputs.at(0)};
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

  // The `uem` exit loop as one ov::Model for one batch size, stitched from the segments' own
  // graphs like fuse(): the stem, layer 1, then each later layer inside an If that runs it unless
  // every row has exited and otherwise passes h through with u = -inf, then the head. The exit
  // test is the chained loop's (decide_exits): u < threshold per row, or the batch mean of u for
  // whole-batch exit, counted over `patience` consecutive layers; no test after the last layer.
  // The test sits in the enclosing graph, on the If's outputs (h and u only): the -inf of a
  // skipped layer is below any threshold, which keeps an exit sticky without a flag carried
  // through the Ifs. Rows that exit while others run are frozen by a Select.
  // Outputs eps and u with -inf where a row did not run a layer (run_exit turns that into the
  // exit layer and NaN), laid out layer by layer (see layer_major). The thresholds are an input,
  // one per layer (and per row for per-row exit), so one compile serves every threshold and time table.
  ExitGraph exit_graph(const ExitGraphSpec& spec, int batch) {
    const int n_layers = m_.model.depth;
    const size_t B = size_t(batch);
    ExitGraph g;
    Segment& out = g.graph;
    out.name = std::string("uem exit graph (") + (spec.per_row ? "rows exit alone" : "batch mean") + ", patience " +
               std::to_string(spec.patience) + ")";
    try {
      std::shared_ptr<ov::Model> stem = segs_[0].source->clone();
      const Value temb = produced(*stem, "temb");
      const ov::Shape thr_shape = spec.per_row ? ov::Shape{size_t(n_layers - 1), B} : ov::Shape{size_t(n_layers - 1)};
      auto thr = std::make_shared<ov::op::v0::Parameter>(ov::element::f32, thr_shape);
      const Value skipped = constant({B}, -INFINITY);
      Value h = produced(*stem, "h"), all_done, rows_done, count;
      if (spec.patience > 1) count = constant(spec.per_row ? ov::Shape{B} : ov::Shape{}, 0.0f);
      std::vector<Value> us, saved;
      for (int i = 1; i <= n_layers; ++i) {
        const SegmentDesc& d = m_.segments[size_t(i)];
        std::shared_ptr<ov::Model> layer = segs_[size_t(i)].source->clone();
        Branch run, pass;
        for (const auto& p : layer->get_parameters()) run.adopt(p, layer_input(d, *p, h, temb, saved));
        run.give(produced(*layer, "h_out"));
        // No decision reads the last layer's u (run_exit reports NaN there): a constant in its place
        // lets OpenVINO drop that UEM, while the pass branch's -inf still tells who ran the layer.
        run.give(i == n_layers ? constant({B}, 0.0f) : produced(*layer, "u"));
        pass.give(pass.take(h));
        pass.give(skipped);
        const std::vector<Value> o = i == 1 ? inline_branch(run) : branch(all_done, pass, run);
        Value u = o[1];
        if (spec.per_row && i > 1) {
          const Value frozen = std::make_shared<ov::op::v0::Unsqueeze>(rows_done, axes({1, 2}));
          h = std::make_shared<ov::op::v1::Select>(frozen, h, o[0]);
          u = std::make_shared<ov::op::v1::Select>(rows_done, skipped, u);
        } else {
          h = o[0];
        }
        us.push_back(u);
        if (d.block == "in") saved.push_back(h);
        if (i == n_layers) break;
        Value score = u;
        if (!spec.per_row && B > 1) score = std::make_shared<ov::op::v1::ReduceMean>(u, axes({0}), true);
        const Value thr_i = std::make_shared<ov::op::v8::Gather>(
            thr, ov::op::v0::Constant::create(ov::element::i64, {}, {int64_t(i - 1)}), axes({0}));
        Value exits = std::make_shared<ov::op::v1::Less>(score, thr_i);
        if (spec.patience > 1) {
          const Value counted = std::make_shared<ov::op::v1::Add>(count, constant({}, 1.0f));
          count = std::make_shared<ov::op::v1::Select>(exits, counted, constant({}, 0.0f));
          exits = std::make_shared<ov::op::v1::GreaterEqual>(count, constant({}, float(spec.patience)));
        }
        if (spec.per_row) {
          rows_done = exits;
          all_done = std::make_shared<ov::op::v1::ReduceLogicalAnd>(exits, axes({0}), true);
        } else {
          all_done = exits;
        }
      }
      const ov::ResultVector results{named_result(head_on(h), "eps"), named_result(layer_major(us, B, n_layers), "u")};
      thr->output(0).get_tensor().set_names({"thr"});
      ov::ParameterVector params = stem->get_parameters();
      params.push_back(thr);
      out.source = std::make_shared<ov::Model>(results, params, "uem_exit");
      out.inputs = m_.segments[0].inputs;
      out.outputs = {m_.segments[size_t(head_index())].outputs.at(0)};  // u: read from the request
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

  int head_index() const { return int(m_.segments.size()) - 2; }

  // The head segment's graph applied to `h`: the noise prediction.
  Value head_on(const Value& h) const {
    std::shared_ptr<ov::Model> head = segs_[size_t(head_index())].source->clone();
    feed(*head, "h", h);
    return produced(*head, "eps");
  }

  static std::shared_ptr<ov::op::v0::Result> named_result(const Value& v, const std::string& name) {
    auto r = std::make_shared<ov::op::v0::Result>(v);
    r->output(0).get_tensor().set_names({name});
    return r;
  }

  // What feeds input `param` of layer segment `d` when layers are stitched: the hidden state
  // before it, the time embedding, or the skip saved from its in block.
  static Value layer_input(const SegmentDesc& d, const ov::Node& param, const Value& h, const Value& temb,
                           const std::vector<Value>& saved) {
    const auto& names = param.output(0).get_names();
    if (names.count("h_in")) return h;
    if (names.count("temb")) return temb;
    if (names.count("skip") && d.skip_from) return saved.at(size_t(d.skip_from - 1));
    throw std::runtime_error(d.name + " has an input a stitched graph cannot feed");
  }

  // The value a model's named output carries, its name dropped: the stitched model reuses the
  // segments' tensor names (every layer has an h_out) and only its own inputs and output keep one.
  static ov::Output<ov::Node> produced(const ov::Model& model, const std::string& name) {
    for (const auto& r : model.get_results()) {
      if (r->output(0).get_names().count(name)) {
        ov::Output<ov::Node> v = r->input_value(0);
        v.get_tensor().set_names({});
        return v;
      }
    }
    throw std::runtime_error("model " + model.get_friendly_name() + " has no output " + name);
  }

  // Replaces a model's named input by `value`: every consumer of the parameter reads `value`.
  static void feed(const ov::Model& model, const std::string& name, const ov::Output<ov::Node>& value) {
    for (const auto& p : model.get_parameters()) {
      if (p->output(0).get_names().count(name)) {
        p->output(0).replace(value);
        return;
      }
    }
    throw std::runtime_error("model " + model.get_friendly_name() + " has no input " + name);
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
