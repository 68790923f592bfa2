// Stitched forwards (see openvino_stitch.hpp): ov graph surgery on clones of the segments' models.
#include "openvino_stitch.hpp"

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

#include <cmath>
#include <stdexcept>
#include <string>

namespace adadiff {

namespace {

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


std::shared_ptr<ov::op::v0::Result> named_result(const Value& v, const std::string& name) {
  auto r = std::make_shared<ov::op::v0::Result>(v);
  r->output(0).get_tensor().set_names({name});
  return r;
}

// What feeds input `param` of layer segment `d` when layers are stitched: the hidden state
// before it, the time embedding, or the skip saved from its in block.
Value layer_input(const SegmentDesc& d, const ov::Node& param, const Value& h, const Value& temb,
                         const std::vector<Value>& saved) {
  const auto& names = param.output(0).get_names();
  if (names.count("h_in")) return h;
  if (names.count("temb")) return temb;
  if (names.count("skip") && d.skip_from) return saved.at(size_t(d.skip_from - 1));
  throw std::runtime_error(d.name + " has an input a stitched graph cannot feed");
}

// The value a model's named output carries, its name dropped: the stitched model reuses the
// segments' tensor names (every layer has an h_out) and only its own inputs and output keep one.
ov::Output<ov::Node> produced(const ov::Model& model, const std::string& name) {
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
void feed(const ov::Model& model, const std::string& name, const ov::Output<ov::Node>& value) {
  for (const auto& p : model.get_parameters()) {
    if (p->output(0).get_names().count(name)) {
      p->output(0).replace(value);
      return;
    }
  }
  throw std::runtime_error("model " + model.get_friendly_name() + " has no input " + name);
}

// The head segment's graph applied to `h`: the noise prediction.
Value head_on(const Manifest& m, const SegmentModels& segs, const Value& h) {
  std::shared_ptr<ov::Model> head = segs[m.segments.size() - 2]->clone();
  feed(*head, "h", h);
  return produced(*head, "eps");
}

}  // namespace

std::shared_ptr<ov::Model> stitch_static(const Manifest& m, const SegmentModels& segs, int layers) {
  std::shared_ptr<ov::Model> stem = segs[0]->clone();
  ov::Output<ov::Node> h = produced(*stem, "h"), temb = produced(*stem, "temb");
  std::vector<ov::Output<ov::Node>> saved;
  for (int i = 1; i <= layers; ++i) {
    const SegmentDesc& d = m.segments[size_t(i)];
    std::shared_ptr<ov::Model> layer = segs[size_t(i)]->clone();
    for (const auto& p : layer->get_parameters()) p->output(0).replace(layer_input(d, *p, h, temb, saved));
    h = produced(*layer, "h_out");
    if (d.block == "in") saved.push_back(h);
  }
  return std::make_shared<ov::Model>(ov::ResultVector{named_result(head_on(m, segs, h), "eps")},
                                     stem->get_parameters(), "static_" + std::to_string(layers));
}

std::shared_ptr<ov::Model> stitch_exit(const Manifest& m, const SegmentModels& segs, const ExitGraphSpec& spec,
                                       int batch) {
  const int n_layers = m.model.depth;
  const size_t B = size_t(batch);
  std::shared_ptr<ov::Model> stem = segs[0]->clone();
  const Value temb = produced(*stem, "temb");
  const ov::Shape thr_shape = spec.per_row ? ov::Shape{size_t(n_layers - 1), B} : ov::Shape{size_t(n_layers - 1)};
  auto thr = std::make_shared<ov::op::v0::Parameter>(ov::element::f32, thr_shape);
  const Value skipped = constant({B}, -INFINITY);
  Value h = produced(*stem, "h"), all_done, rows_done, count;
  if (spec.patience > 1) count = constant(spec.per_row ? ov::Shape{B} : ov::Shape{}, 0.0f);
  std::vector<Value> us, saved;
  for (int i = 1; i <= n_layers; ++i) {
    const SegmentDesc& d = m.segments[size_t(i)];
    std::shared_ptr<ov::Model> layer = segs[size_t(i)]->clone();
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
  const ov::ResultVector results{named_result(head_on(m, segs, h), "eps"), named_result(layer_major(us, B, n_layers), "u")};
  thr->output(0).get_tensor().set_names({"thr"});
  ov::ParameterVector params = stem->get_parameters();
  params.push_back(thr);
  return std::make_shared<ov::Model>(results, params, "uem_exit");
}

}  // namespace adadiff
#endif
