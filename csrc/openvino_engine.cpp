// OpenVINO on CPU: each ONNX segment compiled with a bounded dynamic batch, plus static-batch
// variants for recurring batch sizes; every run binds ov::Tensor views over the runtime's own
// buffers, so segments hand data to each other in place.
#include "openvino_engine.hpp"

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <vector>

#ifdef ADADIFF_WITH_OPENVINO
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
  std::shared_ptr<ov::Model> source;  // kept to reshape into static variants
  std::unique_ptr<Variant> dynamic;
  std::map<int, std::unique_ptr<Variant>> fixed;
  std::vector<uint32_t> hits;  // runs per batch size, until that size is promoted
  bool ready = false;
};

// A batch size gets its own static compilation on its kPromoteAfter-th run; a fixed batch (the
// usual serving case) is promoted during warm-up while the sizes compaction produces once or
// twice stay on the dynamic model, so sampling never pays a compile per row count.
constexpr uint32_t kPromoteAfter = 3;
// Each variant costs a compile (about 50-400 ms here, cached on disk with cache_dir) and memory.
constexpr size_t kMaxStatic = 4;

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
    const SegmentDesc& s = m_.segments[seg];
    try {
      if (!sg.ready) load(seg);
      Variant& v = pick(seg, batch);
      for (size_t i = 0; i < v.inputs.size(); ++i) bind(v, v.inputs[i], batch, in[i]);
      for (size_t i = 0; i < v.outputs.size(); ++i) bind(v, v.outputs[i], batch, out[i]);
      v.request.infer();
    } catch (const std::exception& e) {
      throw std::runtime_error("OpenVINO: segment " + s.name + " at batch " + std::to_string(batch) +
                               " failed: " + e.what());
    }
  }

 private:
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

  Variant& pick(int seg, int batch) {
    Segment& sg = segs_[seg];
    if (batch < 1 || batch > o_.max_batch)
      throw std::runtime_error("batch outside 1.." + std::to_string(o_.max_batch));
    auto it = sg.fixed.find(batch);
    if (it != sg.fixed.end()) return *it->second;
    if (sg.fixed.size() < kMaxStatic && ++sg.hits[size_t(batch)] >= kPromoteAfter) {
      return *sg.fixed.emplace(batch, compile(seg, batch)).first->second;
    }
    return *sg.dynamic;
  }

  void load(int seg) {
    const SegmentDesc& s = m_.segments[seg];
    const std::string path = m_.verified_path("segment " + s.name, s.file, s.sha256);
    Segment& sg = segs_[seg];
    try {
      sg.source = core_.read_model(path);
      sg.dynamic = compile(seg, 0);
      sg.hits.assign(size_t(o_.max_batch) + 1, 0);
      sg.ready = true;
    } catch (const std::exception& e) {
      throw std::runtime_error("OpenVINO: cannot compile segment " + s.name + " from " + s.file + ": " + e.what());
    }
  }

  // batch 0: the bounded dynamic batch 1..max_batch; otherwise that static batch.
  std::unique_ptr<Variant> compile(int seg, int batch) {
    const SegmentDesc& s = m_.segments[seg];
    Segment& sg = segs_[seg];
    std::map<std::string, ov::PartialShape> shapes;
    for (const TensorDesc& t : s.inputs) {
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
    for (const TensorDesc& t : s.inputs) v->inputs.push_back(port(v->model.input(t.name), t));
    for (const TensorDesc& t : s.outputs) v->outputs.push_back(port(v->model.output(t.name), t));
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
};

}  // namespace

std::unique_ptr<Engine> make_openvino_engine(const Manifest& m, const OpenVinoOptions& o) {
  return std::make_unique<OpenVinoEngine>(m, o);
}

#endif

}  // namespace adadiff
