// pybind11 bindings: numpy in, numpy out; argument checks that name the argument; the GIL is
// released while the runtime (and its engines) work.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "dlpack_engine.hpp"
#include "load.hpp"
#include "openvino_engine.hpp"
#include "tensorrt_engine.hpp"

namespace py = pybind11;
using namespace adadiff;

namespace {

using F32 = py::array_t<float, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Exact dtype (no silent casts), then a C-contiguous array of it.
template <class T>
py::array_t<T, py::array::c_style> typed(const py::handle& obj, const char* name, const char* dtype) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy array of " + dtype + ", got " +
                         std::string(py::str(py::type::handle_of(obj))));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + " must have dtype " + dtype + ", got " + std::string(py::str(a.dtype())));
  return py::array_t<T, py::array::c_style>::ensure(a);
}

// A list entry of a table dict, typed: a missing key or a wrong element type names the key.
template <class T>
std::vector<T> list_of(const py::dict& d, const char* key, const std::string& where, const char* what) {
  if (!d.contains(key)) throw py::value_error(where + " needs '" + key + "'");
  try {
    return d[key].cast<std::vector<T>>();
  } catch (const py::cast_error&) {
    throw py::type_error(where + "['" + key + "'] must be a list of " + what);
  }
}

// The manifest's JSON form of a time table (docs/MANIFEST.md): {t_bounds, layers} for a schedule,
// {t_bounds, min_layers, max_layers, thresholds} for uem-time. The runtime checks the values.
std::optional<TimeTable> time_table(const std::optional<py::dict>& d, const std::optional<std::string>& policy) {
  if (!d) return std::nullopt;
  const bool uem = d->contains("thresholds");
  const std::string where = uem ? "table (uem-time)" : "table (schedule)";
  const std::vector<std::string> keys = uem ? std::vector<std::string>{"t_bounds", "min_layers", "max_layers", "thresholds"}
                                            : std::vector<std::string>{"t_bounds", "layers"};
  for (const auto& kv : *d) {
    const std::string k = py::str(kv.first);
    if (std::find(keys.begin(), keys.end(), k) == keys.end())
      throw py::value_error(where + ": unknown key '" + k + "'");
  }
  if (policy && ((*policy == "schedule" && uem) || (*policy == "uem-time" && !uem)))
    throw py::value_error("policy '" + *policy + "' takes a table with " +
                          (uem ? "t_bounds and layers" : "t_bounds, min_layers, max_layers and thresholds"));
  TimeTable t;
  t.bounds = list_of<double>(*d, "t_bounds", where, "numbers");
  if (uem) {
    t.min_layer = list_of<int>(*d, "min_layers", where, "integers");
    t.max_layer = list_of<int>(*d, "max_layers", where, "integers");
    for (double v : list_of<double>(*d, "thresholds", where, "numbers")) t.threshold.push_back(float(v));
  } else {
    t.min_layer = list_of<int>(*d, "layers", where, "integers");
    t.max_layer = t.min_layer;
  }
  return t;
}

py::object table_dict(const TimeTable& t, bool uem) {
  if (t.empty()) return py::none();
  py::dict d;
  d["t_bounds"] = t.bounds;
  if (uem) {
    d["min_layers"] = t.min_layer;
    d["max_layers"] = t.max_layer;
    d["thresholds"] = t.threshold;
  } else {
    d["layers"] = t.min_layer;
  }
  return std::move(d);
}

py::dict exit_dict(const ExitDefaults& e) {
  py::dict d;
  d["policy"] = e.policy;
  d["threshold"] = e.threshold;
  d["patience"] = e.patience;
  d["granularity"] = e.granularity;
  d["layer"] = e.layer;
  d["guidance"] = e.guidance;
  d["schedule"] = table_dict(e.schedule, false);
  d["uem_time"] = table_dict(e.uem_time, true);
  return d;
}

class PyRuntime {
 public:
  PyRuntime(const std::string& dir, const std::string& device, const std::string& engine,
            std::optional<std::string> precision, int threads, std::optional<py::dict> segments,
            std::optional<std::string> cache_dir, int device_id, bool fuse_static, bool fuse_exit) {
    RuntimeOptions o;
    o.device = device;
    o.device_id = device_id;
    o.engine = engine;
    o.precision = std::move(precision);
    o.threads = threads;
    o.cache_dir = std::move(cache_dir);
    o.fuse_static = fuse_static;
    o.fuse_exit = fuse_exit;
    EngineMaker callables;
    if (segments)
      callables = [&segments](const Manifest& m, Ops* ops, int capacity) {
        return make_dlpack_engine(m, ops, *segments, capacity);
      };
    rt_ = open_runtime(dir, o, callables);
    device_ = device;
  }

  ~PyRuntime() {
    // The DLPack engine drops Python references in its destructor; it takes the GIL itself.
    py::gil_scoped_release release;
    rt_.reset();
  }

  py::tuple denoise(const py::object& x_obj, const py::object& t_obj, const py::object& y_obj,
                    std::optional<std::string> policy, std::optional<double> threshold, std::optional<int> patience,
                    std::optional<std::string> granularity, std::optional<int> static_layer,
                    std::optional<py::dict> table) {
    const ModelDesc& c = rt_->manifest().model;
    const Inputs in = inputs(x_obj, t_obj, y_obj);
    const int b = in.batch;
    const F32 &x = in.x, &t = in.t;
    const std::optional<I64>& y = in.y;
    DenoiseOptions o{policy, threshold, patience, granularity, static_layer, time_table(table, policy)};
    F32 eps({py::ssize_t(b), py::ssize_t(c.in_chans), py::ssize_t(c.img_size), py::ssize_t(c.img_size)});
    I64 layer(std::vector<py::ssize_t>{py::ssize_t(b)});
    F32 u({py::ssize_t(b), py::ssize_t(c.depth)});
    const float* xp = x.data();
    const float* tp = t.data();
    const int64_t* yp = y ? y->data() : nullptr;
    float* ep = eps.mutable_data();
    int64_t* lp = layer.mutable_data();
    float* up = u.mutable_data();
    {
      py::gil_scoped_release release;
      rt_->denoise(b, xp, tp, yp, o, ep, lp, up);
    }
    return py::make_tuple(eps, layer, u);
  }

  py::tuple sample(const py::object& noise_obj, const py::object& y_obj, const std::string& sampler,
                   std::optional<int> steps, std::optional<double> guidance, std::optional<std::string> policy,
                   std::optional<double> threshold, std::optional<int> patience,
                   std::optional<std::string> granularity, std::optional<int> static_layer,
                   std::optional<py::dict> table, double eta, uint64_t seed, bool final_x0) {
    const ModelDesc& c = rt_->manifest().model;
    F32 noise = typed<float>(noise_obj, "noise", "float32");
    check_image("noise", noise);
    const int b = int(noise.shape(0));
    std::optional<I64> y = labels(y_obj, b);
    if (steps && *steps < 1) throw py::value_error("steps must be >= 1, got " + std::to_string(*steps));
    SampleOptions o;
    o.sampler = sampler;
    o.steps = steps ? *steps : 0;
    o.guidance = guidance;
    o.eta = eta;
    o.seed = seed;
    o.final_x0 = final_x0;
    o.exit = DenoiseOptions{policy, threshold, patience, granularity, static_layer, time_table(table, policy)};
    F32 images({py::ssize_t(b), py::ssize_t(c.in_chans), py::ssize_t(c.img_size), py::ssize_t(c.img_size)});
    std::vector<int64_t> layers;
    int n_steps = 0, be = 0;
    const float* np_ = noise.data();
    const int64_t* yp = y ? y->data() : nullptr;
    float* ip = images.mutable_data();
    {
      py::gil_scoped_release release;
      rt_->sample(b, np_, yp, o, ip, layers, n_steps, be);
    }
    I64 used({py::ssize_t(n_steps), py::ssize_t(be)});
    std::copy(layers.begin(), layers.end(), used.mutable_data());
    return py::make_tuple(images, used);
  }

  F32 full(const py::object& x_obj, const py::object& t_obj, const py::object& y_obj) {
    const ModelDesc& c = rt_->manifest().model;
    const Inputs in = inputs(x_obj, t_obj, y_obj);
    const int b = in.batch;
    const F32 &x = in.x, &t = in.t;
    const std::optional<I64>& y = in.y;
    F32 eps({py::ssize_t(b), py::ssize_t(c.in_chans), py::ssize_t(c.img_size), py::ssize_t(c.img_size)});
    const float* xp = x.data();
    const float* tp = t.data();
    const int64_t* yp = y ? y->data() : nullptr;
    float* ep = eps.mutable_data();
    {
      py::gil_scoped_release release;
      rt_->full(b, xp, tp, yp, ep);
    }
    return eps;
  }

  const Manifest& manifest() const { return rt_->manifest(); }
  std::string engine_name() const { return rt_->engine().name(); }
  int64_t engine_calls() const { return rt_->engine_calls(); }
  const std::string& device() const { return device_; }

 private:
  struct Inputs {
    F32 x, t;
    std::optional<I64> y;
    int batch;
  };

  // x [B,C,H,W] float32, t [B] float32, y [B] int64 or None: checked, C-contiguous.
  Inputs inputs(const py::object& x_obj, const py::object& t_obj, const py::object& y_obj) const {
    F32 x = typed<float>(x_obj, "x", "float32");
    F32 t = typed<float>(t_obj, "t", "float32");
    check_image("x", x);
    const int b = int(x.shape(0));
    if (t.ndim() != 1 || t.shape(0) != b)
      throw py::value_error("t must have shape (" + std::to_string(b) + ",) to match x, got " + shape_of(t));
    return Inputs{x, t, labels(y_obj, b), b};
  }

  void check_image(const char* name, const F32& a) const {
    const ModelDesc& c = rt_->manifest().model;
    if (a.ndim() != 4 || a.shape(1) != c.in_chans || a.shape(2) != c.img_size || a.shape(3) != c.img_size)
      throw py::value_error(std::string(name) + " must have shape (B, " + std::to_string(c.in_chans) + ", " +
                            std::to_string(c.img_size) + ", " + std::to_string(c.img_size) + "), got " + shape_of(a));
    if (a.shape(0) < 1 || a.shape(0) > rt_->manifest().max_batch)
      throw py::value_error(std::string(name) + ": batch " + std::to_string(a.shape(0)) + " is outside 1.." +
                            std::to_string(rt_->manifest().max_batch) + " (the engines' max_batch)");
  }

  std::optional<I64> labels(const py::object& y_obj, int b) const {
    if (y_obj.is_none()) return std::nullopt;
    I64 y = typed<int64_t>(y_obj, "y", "int64");
    if (y.ndim() != 1 || y.shape(0) != b)
      throw py::value_error("y must have shape (" + std::to_string(b) + ",), got " + shape_of(y));
    return y;
  }

  std::string device_;
  std::unique_ptr<Runtime> rt_;
};

py::dict model_dict(const Manifest& m) {
  const ModelDesc& c = m.model;
  py::dict d;
  d["img_size"] = c.img_size;
  d["in_chans"] = c.in_chans;
  d["patch_size"] = c.patch_size;
  d["embed_dim"] = c.embed_dim;
  d["depth"] = c.depth;
  d["num_heads"] = c.num_heads;
  d["num_classes"] = c.num_classes;
  d["null_class"] = c.null_class;
  d["num_tokens"] = c.num_tokens;
  return d;
}

py::object bytes_or_none(uint64_t b) { return b == UINT64_MAX ? py::none() : py::object(py::int_(b)); }

py::dict memory_dict(const MemoryCheck& m) {
  py::dict d;
  d["capacity"] = m.capacity;
  d["needed"] = m.needed;
  d["free"] = bytes_or_none(m.free.bytes);
  d["source"] = m.free.source;
  return d;
}

py::dict check_folder(const std::string& dir, const std::string& device, int device_id) {
  std::optional<EnginesCheck> c;
  {
    py::gil_scoped_release release;  // hashing gigabyte plans takes seconds
    c = check_engines(dir, device, device_id);
  }
  py::dict d;
  d["version"] = c->manifest.version;
  d["depth"] = c->manifest.model.depth;
  d["max_batch"] = c->manifest.max_batch;
  d["files"] = c->files;
  d["memory"] = memory_dict(c->memory);
  return d;
}

// `model` goes through the manifest's own reader (as JSON), so it is checked as a folder's would be.
py::dict check_memory_for(const py::dict& model, int64_t max_batch, bool u_map, const std::string& device,
                          int device_id) {
  const ModelDesc desc = model_from_json(py::str(py::module_::import("json").attr("dumps")(model)));
  return memory_dict(check_memory(desc, max_batch, u_map, device, device_id));
}

}  // namespace

PYBIND11_MODULE(adadiff_rt, mod) {
  mod.doc() =
      "adadiff_rt: the early-exit runtime for adadiff engines folders (manifest.json + segments).\n"
      "Runtime(engines_dir, device='cpu', engine='auto', precision=None, threads=0) loads and checks\n"
      "the folder; denoise() runs one early-exit denoiser call, sample() a whole sampling loop.";
  mod.attr("__version__") = "0.1.0";
  mod.attr("MANIFEST_VERSION") = kManifestVersion;
  mod.attr("has_openvino") = openvino_compiled();
  mod.attr("has_cuda") = cuda_compiled();
  mod.attr("has_tensorrt") = tensorrt_compiled();
  register_buffer_view(mod);

  mod.def("check_engines", &check_folder, py::arg("engines_dir"), py::arg("device") = "cpu", py::arg("device_id") = 0,
          R"doc(What Runtime(engines_dir, device=...) checks before any engine compiles, without compiling:
the manifest (schema, version, every tensor against the model config, exit defaults), every file it
names (plain name, real path inside the folder, sha256; TensorRT plans too) and the memory the
runtime's buffers need on the device. Raises RuntimeError naming what is wrong; returns
{version, depth, max_batch, files, memory: {capacity, needed, free, source}}. `python -m
adadiff_export verify` runs it, so verify and the runtime refuse the same folders.)doc");
  mod.def("check_memory", &check_memory_for, py::arg("model"), py::arg("max_batch"), py::kw_only(),
          py::arg("u_map") = false, py::arg("device") = "cpu", py::arg("device_id") = 0,
          R"doc(The memory a Runtime for `model` (a manifest's "model" object) built for `max_batch` needs on
the device (2 x max_batch rows): RuntimeError naming it and what is free when it does not fit, else
{capacity, needed, free, source}. `build --max-batch` asks it before exporting anything.)doc");

  py::class_<PyRuntime>(mod, "Runtime", R"doc(
An engines folder loaded for inference.

Runtime(engines_dir, device="cpu", engine="auto", precision=None, threads=0, *, segments=None,
        cache_dir=None, device_id=0, fuse_static=True, fuse_exit=True)

engine: "auto" (OpenVINO on cpu, TensorRT on cuda, "dlpack" when segments is given), "openvino",
"tensorrt" or "dlpack" (segments = {segment name: callable(*DLPack inputs) -> outputs}).
precision: None (the engine's own: OpenVINO fp32, TensorRT its plans'), OpenVINO's "fp32" or "bf16",
or TensorRT's plans' own; threads: OpenVINO CPU threads (0 = its default). An option the engine
cannot honour (another precision than the plans', threads on TensorRT or DLPack, precision on
DLPack) is refused with ValueError, not ignored. cache_dir: OpenVINO compiled-model cache (default
<engines_dir>/openvino_cache when writable, "" disables it). fuse_static: OpenVINO runs the
static policy's stem, layers 1..L and head as one compiled graph (stitched from the segments; the
same results, without a call per segment); False chains the segments as the other policies do.
fuse_exit: OpenVINO runs the uem policy as one compiled graph that tests u after every layer itself
and skips the layers left once every row has exited (whole-batch exit at any batch, per-row exit
for up to 2 rows, where it saves the per-segment calls that compaction cannot); False always
chains the segments.
Every file is checked against its sha256 in manifest.json before use.
)doc")
      .def(py::init<const std::string&, const std::string&, const std::string&, std::optional<std::string>, int,
                    std::optional<py::dict>, std::optional<std::string>, int, bool, bool>(),
           py::arg("engines_dir"), py::arg("device") = "cpu", py::arg("engine") = "auto", py::arg("precision") = py::none(),
           py::arg("threads") = 0, py::kw_only(), py::arg("segments") = py::none(), py::arg("cache_dir") = py::none(),
           py::arg("device_id") = 0, py::arg("fuse_static") = true,
           py::arg("fuse_exit") = true)
      .def("denoise", &PyRuntime::denoise, py::arg("x"), py::arg("t"), py::arg("y") = py::none(), py::kw_only(),
           py::arg("policy") = py::none(), py::arg("threshold") = py::none(), py::arg("patience") = py::none(),
           py::arg("granularity") = py::none(), py::arg("static_layer") = py::none(), py::arg("table") = py::none(),
           R"doc(One early-exit denoiser call: x float32 [B,C,H,W], t float32 [B] (continuous time), y int64 [B].

Returns (eps float32 [B,C,H,W], exit_layer int64 [B] (1-based), u float32 [B,N] with NaN where not
computed). policy "uem" (the paper's rule: exit when u < threshold) | "uem-time" (thresholds and a
layer range by time) | "schedule" (an exit layer by time) | "static" (static_layer) | "saturation";
granularity "sample" (exited samples leave the batch) or "batch" (one decision for the batch);
table: a schedule {t_bounds, layers} or uem-time table {t_bounds, min_layers, max_layers,
thresholds} as in the manifest. Every argument left None takes the manifest's exit defaults
(Runtime.default_exit).)doc")
      .def("sample", &PyRuntime::sample, py::arg("noise"), py::arg("y") = py::none(), py::kw_only(),
           py::arg("sampler") = "dpm++", py::arg("steps") = py::none(), py::arg("guidance") = py::none(),
           py::arg("policy") = py::none(), py::arg("threshold") = py::none(), py::arg("patience") = py::none(),
           py::arg("granularity") = py::none(), py::arg("static_layer") = py::none(), py::arg("table") = py::none(),
           py::arg("eta") = 0.0, py::arg("seed") = 0, py::arg("final_x0") = false,
           R"doc(The whole sampling loop in C++ (mirrors adadiff_export.sampling.samplers).

sampler "dpm++" | "ddim" | "euler"; steps None = 50 | 100 | 1000; guidance None = the manifest's
default (classifier-free guidance, one batched call: cond half first, then the null class);
the exit arguments as for denoise (None: the manifest's defaults); final_x0: the last step returns
its x0 prediction instead of stepping to t_eps.
Returns (images float32 [B,C,H,W] in [-1, 1], layers_used int64 [steps, B_eff]), B_eff = 2B
under guidance. Stochastic samplers (ddim with eta > 0, euler) use the runtime's own RNG (seed).)doc")
      .def("full", &PyRuntime::full, py::arg("x"), py::arg("t"), py::arg("y") = py::none(),
           "The `full` segment (the whole model in one graph): the speed baseline.")
      .def_property_readonly("engine", &PyRuntime::engine_name)
      .def_property_readonly("device", &PyRuntime::device)
      .def_property_readonly("max_batch", [](const PyRuntime& r) { return r.manifest().max_batch; })
      .def_property_readonly("depth", [](const PyRuntime& r) { return r.manifest().model.depth; })
      .def_property_readonly("model", [](const PyRuntime& r) { return model_dict(r.manifest()); })
      .def_property_readonly("default_threshold", [](const PyRuntime& r) { return r.manifest().exit.threshold; })
      .def_property_readonly("default_guidance", [](const PyRuntime& r) { return r.manifest().exit.guidance; })
      .def_property_readonly("default_policy", [](const PyRuntime& r) { return r.manifest().exit.policy; })
      .def_property_readonly("default_exit", [](const PyRuntime& r) { return exit_dict(r.manifest().exit); },
                             "The manifest's exit defaults: policy, threshold, patience, granularity, layer, "
                             "guidance, schedule and uem_time (None when the folder has none).")
      .def_property_readonly("engine_calls", &PyRuntime::engine_calls,
                             "Engine executions made by the last denoise, sample or full call: one per segment "
                             "run when the segments are chained, one per forward for a fused static or exit graph.");
}
