// OpenVINO on CPU: each ONNX segment compiled once with a bounded dynamic batch; every run binds
// ov::Tensor views over the runtime's own buffers, so segments hand data to each other in place.
#include "openvino_engine.hpp"

#include <map>
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

struct Compiled {
  ov::CompiledModel model;
  ov::InferRequest request;
  std::vector<Port> inputs, outputs;  // manifest order
  bool ready = false;
};

class OpenVinoEngine final : public Engine {
 public:
  OpenVinoEngine(const Manifest& m, const OpenVinoOptions& o) : m_(m), o_(o), segs_(m.segments.size()) {
    if (o.precision != "fp32" && o.precision != "bf16")
      throw std::invalid_argument("precision must be 'fp32' or 'bf16' for OpenVINO, got '" + o.precision + "'");
    if (!o.cache_dir.empty()) core_.set_property(ov::cache_dir(o.cache_dir));
    // `full` is compiled on first use: only the benchmark and parity checks need it.
    for (size_t i = 0; i + 1 < m.segments.size(); ++i) compile(int(i));
  }

  std::string name() const override { return "openvino"; }
  int max_batch() const override { return o_.max_batch; }

  void run(int seg, int batch, void* const* in, void* const* out) override {
    Compiled& c = segs_[seg];
    if (!c.ready) compile(seg);
    const SegmentDesc& s = m_.segments[seg];
    try {
      for (size_t i = 0; i < c.inputs.size(); ++i) bind(c, c.inputs[i], batch, in[i]);
      for (size_t i = 0; i < c.outputs.size(); ++i) bind(c, c.outputs[i], batch, out[i]);
      c.request.infer();
    } catch (const std::exception& e) {
      throw std::runtime_error("OpenVINO: segment " + s.name + " at batch " + std::to_string(batch) +
                               " failed: " + e.what());
    }
  }

 private:
  static void bind(Compiled& c, Port& p, int batch, void* data) {
    // The exit loop hands the same buffers to the same segment call after call; set_tensor's
    // validation is a measurable part of a small segment's run time, so only changes are bound.
    if (p.bound == data && p.bound_batch == size_t(batch)) return;
    p.bound = nullptr;
    p.shape[0] = size_t(batch);
    // Outputs too are views: the plugin writes straight into the runtime's buffer.
    c.request.set_tensor(p.port, ov::Tensor(p.type, p.shape, data));
    p.bound = data;
    p.bound_batch = size_t(batch);
  }

  void compile(int seg) {
    const SegmentDesc& s = m_.segments[seg];
    const std::string path = m_.verified_path("segment " + s.name, s.file, s.sha256);
    Compiled& c = segs_[seg];
    try {
      std::shared_ptr<ov::Model> model = core_.read_model(path);
      std::map<std::string, ov::PartialShape> shapes;
      for (const TensorDesc& t : s.inputs) {
        ov::PartialShape ps;
        ps.push_back(ov::Dimension(1, o_.max_batch));
        for (size_t d = 1; d < t.shape.size(); ++d) ps.push_back(ov::Dimension(t.shape[d]));
        shapes[t.name] = ps;
      }
      model->reshape(shapes);
      ov::AnyMap config{ov::hint::inference_precision(o_.precision == "bf16" ? ov::element::bf16 : ov::element::f32),
                        ov::hint::performance_mode(ov::hint::PerformanceMode::LATENCY)};
      if (o_.threads > 0) config.emplace(ov::inference_num_threads(o_.threads));
      c.model = core_.compile_model(model, "CPU", config);
      c.request = c.model.create_infer_request();
      c.inputs.clear();
      c.outputs.clear();
      for (const TensorDesc& t : s.inputs) c.inputs.push_back(port(c.model.input(t.name), t));
      for (const TensorDesc& t : s.outputs) c.outputs.push_back(port(c.model.output(t.name), t));
      c.ready = true;
    } catch (const std::exception& e) {
      throw std::runtime_error("OpenVINO: cannot compile segment " + s.name + " from " + s.file + ": " + e.what());
    }
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
  std::vector<Compiled> segs_;
};

}  // namespace

std::unique_ptr<Engine> make_openvino_engine(const Manifest& m, const OpenVinoOptions& o) {
  return std::make_unique<OpenVinoEngine>(m, o);
}

#endif

}  // namespace adadiff
