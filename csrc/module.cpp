// pybind11 bindings: the Runtime class and the module's functions; argument checks that name the
// argument; the GIL is released while the runtime (and its engines) work. Arrays in and out are
// py_arrays, dicts to and from the runtime's descriptions py_dicts.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dlpack.h"
#include "dlpack_engine.hpp"
#include "load.hpp"
#include "openvino_engine.hpp"
#include "plan_check.hpp"
#include "py_arrays.hpp"
#include "py_dicts.hpp"
#include "py_docs.hpp"
#include "tensorrt_engine.hpp"

namespace py = pybind11;
using namespace adadiff;
using namespace adadiff::python;

namespace {

using F32 = py::array_t<float, py::array::c_style>;
using I64 = py::array_t<int64_t, py::array::c_style>;

class PyRuntime {
 public:
  PyRuntime(const std::string& dir, const std::string& device, const std::string& engine,
            std::optional<std::string> precision, int threads, std::optional<py::dict> segments,
            std::optional<std::string> cache_dir, int device_id, bool fuse_static, bool fuse_exit,
            const std::string& build_plans, std::optional<bool> cuda_graphs) {
    RuntimeOptions o;
    o.device = device;
    o.device_id = device_id;
    o.engine = engine;
    o.precision = std::move(precision);
    o.threads = threads;
    o.cache_dir = std::move(cache_dir);
    o.fuse_static = fuse_static;
    o.fuse_exit = fuse_exit;
    o.build_plans = build_plans;
    o.cuda_graphs = cuda_graphs;
    EngineMaker callables;
    if (segments)
      callables = [&segments](const Manifest& m, Ops* ops, int capacity) {
        py::gil_scoped_acquire gil;  // the callables are Python objects
        return make_dlpack_engine(m, ops, *segments, capacity);
      };
    // Hashing every file and compiling (or deserializing) the engines takes seconds: other Python
    // threads run meanwhile.
    py::gil_scoped_release release;
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
                    std::optional<py::dict> table, const py::object& stream) {
    const ModelDesc& c = rt_->manifest().model;
    const Inputs in = inputs(x_obj, t_obj, y_obj);
    const int b = in.batch;
    DenoiseOptions o{policy, threshold, patience, granularity, static_layer, time_table(table, policy)};
    const Call call(*this, in.x, stream);
    Output eps = call.output<float>({b, c.in_chans, c.img_size, c.img_size});
    Output layer = call.output<int64_t>({b});
    Output u = call.output<float>({b, c.depth});
    {
      py::gil_scoped_release release;
      rt_->denoise(b, static_cast<const float*>(in.x.data), static_cast<const float*>(in.t.data),
                   in.y ? static_cast<const int64_t*>(in.y->data) : nullptr, o, eps.f32(), layer.i64(), u.f32(),
                   in.x.cuda);
      call.finish();
    }
    return py::make_tuple(call.result(eps), call.result(layer), call.result(u));
  }

  py::tuple sample(const py::object& noise_obj, const py::object& y_obj, const std::string& sampler,
                   std::optional<int> steps, std::optional<double> guidance, std::optional<std::string> policy,
                   std::optional<double> threshold, std::optional<int> patience,
                   std::optional<std::string> granularity, std::optional<int> static_layer,
                   std::optional<py::dict> table, double eta, uint64_t seed, bool final_x0, const py::object& stream) {
    const ModelDesc& c = rt_->manifest().model;
    const ArrayArg noise = array_arg<float>(noise_obj, "noise", "float32", rt_->ops());
    check_image("noise", noise.shape);
    const int b = int(noise.shape[0]);
    std::optional<ArrayArg> y = labels(y_obj, b, noise);
    if (steps && *steps < 1) throw py::value_error("steps must be >= 1, got " + std::to_string(*steps));
    SampleOptions o;
    o.sampler = sampler;
    o.steps = steps ? *steps : 0;
    o.guidance = guidance;
    o.eta = eta;
    o.seed = seed;
    o.final_x0 = final_x0;
    o.exit = DenoiseOptions{policy, threshold, patience, granularity, static_layer, time_table(table, policy)};
    const Call call(*this, noise, stream);
    Output images = call.output<float>({b, c.in_chans, c.img_size, c.img_size});
    std::vector<int64_t> layers;
    int n_steps = 0, be = 0;
    {
      py::gil_scoped_release release;
      rt_->sample(b, static_cast<const float*>(noise.data), y ? static_cast<const int64_t*>(y->data) : nullptr, o,
                  images.f32(), layers, n_steps, be, noise.cuda);
      call.finish();
    }
    I64 used({py::ssize_t(n_steps), py::ssize_t(be)});
    std::copy(layers.begin(), layers.end(), used.mutable_data());
    return py::make_tuple(call.result(images), call.host_result(used));
  }

  py::object full(const py::object& x_obj, const py::object& t_obj, const py::object& y_obj, const py::object& stream) {
    const ModelDesc& c = rt_->manifest().model;
    const Inputs in = inputs(x_obj, t_obj, y_obj);
    const int b = in.batch;
    const Call call(*this, in.x, stream);
    Output eps = call.output<float>({b, c.in_chans, c.img_size, c.img_size});
    {
      py::gil_scoped_release release;
      rt_->full(b, static_cast<const float*>(in.x.data), static_cast<const float*>(in.t.data),
                in.y ? static_cast<const int64_t*>(in.y->data) : nullptr, eps.f32(), in.x.cuda);
      call.finish();
    }
    return call.result(eps);
  }

  const Manifest& manifest() const { return rt_->manifest(); }
  std::string engine_name() const { return rt_->engine().name(); }
  const Engine& engine() const { return rt_->engine(); }
  int64_t engine_calls() const { return rt_->engine_calls(); }
  const std::string& device() const { return device_; }

 private:
  struct Inputs {
    ArrayArg x, t;
    std::optional<ArrayArg> y;
    int batch;
  };

  // One result array: numpy on the host, or device memory of the runtime's GPU.
  struct Output {
    py::array host;
    std::shared_ptr<DeviceArray> dev;
    float* f32() { return static_cast<float*>(dev ? dev->data() : host.mutable_data()); }
    int64_t* i64() { return static_cast<int64_t*>(dev ? dev->data() : host.mutable_data()); }
  };

  // Where one call's arrays live (the first input's device), its stream, and how results go back.
  class Call {
   public:
    Call(PyRuntime& r, const ArrayArg& first, const py::object& stream)
        : r_(r), cuda_(first.cuda), library_(first.library), stream_(stream_handle(stream)) {
      Ops& ops = r_.rt_->ops();
      if (stream_ && !ops.is_cuda()) throw py::value_error("stream= is for a Runtime on device='cuda'");
      if (cuda_ && first.device != ops.device_id())
        throw py::value_error("the inputs are on cuda:" + std::to_string(first.device) + ", this Runtime on cuda:" +
                              std::to_string(ops.device_id()));
      if (stream_) ops.wait_for(*stream_);  // the caller's queued work (its inputs) first
    }
    template <class T>
    Output output(std::vector<int64_t> shape) const {
      Output o;
      if (cuda_) {
        size_t n = sizeof(T);
        for (int64_t d : shape) n *= size_t(d);
        const DLDataType dt = std::is_floating_point<T>::value ? DLDataType{kDLFloat, 32, 1} : DLDataType{kDLInt, 64, 1};
        o.dev = std::make_shared<DeviceArray>(device_alloc(r_.rt_->ops().device_id(), n), std::move(shape), dt,
                                              r_.rt_->ops().device_id());
      } else {
        o.host = py::array_t<T, py::array::c_style>(std::vector<py::ssize_t>(shape.begin(), shape.end()));
      }
      return o;
    }
    // After the runtime's work was queued (GIL released): with stream=, that stream is ordered after
    // it and the call returns at once; without, a CUDA call waits for its results.
    void finish() const {
      if (!cuda_) return;
      Ops& ops = r_.rt_->ops();
      if (stream_) ops.hand_off(*stream_);
      else ops.synchronize();
    }
    py::object result(const Output& o) const {
      py::object arr = o.dev ? py::cast(o.dev) : py::object(o.host);
      return library_.is_none() ? arr : library_.attr("from_dlpack")(arr);
    }
    // A host-only result (sample's layers) in the input's library where it takes CPU arrays.
    py::object host_result(const py::array& a) const {
      if (library_.is_none()) return a;
      try {
        return library_.attr("from_dlpack")(a);
      } catch (const py::error_already_set&) {
        return a;  // a library that takes only device arrays (CuPy): numpy
      }
    }

   private:
    PyRuntime& r_;
    bool cuda_;
    py::object library_;
    std::optional<intptr_t> stream_;
  };

  // x [B,C,H,W] float32, t [B] float32, y [B] int64 or None, all on one device.
  Inputs inputs(const py::object& x_obj, const py::object& t_obj, const py::object& y_obj) const {
    ArrayArg x = array_arg<float>(x_obj, "x", "float32", rt_->ops());
    ArrayArg t = array_arg<float>(t_obj, "t", "float32", rt_->ops());
    check_image("x", x.shape);
    const int b = int(x.shape[0]);
    if (t.shape.size() != 1 || t.shape[0] != b)
      throw py::value_error("t must have shape (" + std::to_string(b) + ",) to match x, got " + shape_str(t.shape));
    same_device("t", t, x);
    std::optional<ArrayArg> y = labels(y_obj, b, x);
    return Inputs{std::move(x), std::move(t), std::move(y), b};
  }

  static void same_device(const char* name, const ArrayArg& a, const ArrayArg& first) {
    if (a.cuda != first.cuda || a.device != first.device)
      throw py::value_error(std::string(name) + " is on " + (a.cuda ? "cuda:" + std::to_string(a.device) : "the CPU") +
                            ", the first input on " + (first.cuda ? "cuda:" + std::to_string(first.device) : "the CPU") +
                            ": pass all inputs on one device");
  }

  void check_image(const char* name, const std::vector<int64_t>& s) const {
    const ModelDesc& c = rt_->manifest().model;
    if (s.size() != 4 || s[1] != c.in_chans || s[2] != c.img_size || s[3] != c.img_size)
      throw py::value_error(std::string(name) + " must have shape (B, " + std::to_string(c.in_chans) + ", " +
                            std::to_string(c.img_size) + ", " + std::to_string(c.img_size) + "), got " + shape_str(s));
    if (s[0] < 1 || s[0] > rt_->manifest().max_batch)
      throw py::value_error(std::string(name) + ": batch " + std::to_string(s[0]) + " is outside 1.." +
                            std::to_string(rt_->manifest().max_batch) + " (the engines' max_batch)");
  }

  std::optional<ArrayArg> labels(const py::object& y_obj, int b, const ArrayArg& first) const {
    if (y_obj.is_none()) return std::nullopt;
    ArrayArg y = array_arg<int64_t>(y_obj, "y", "int64", rt_->ops());
    if (y.shape.size() != 1 || y.shape[0] != b)
      throw py::value_error("y must have shape (" + std::to_string(b) + ",), got " + shape_str(y.shape));
    same_device("y", y, first);
    return y;
  }

  std::string device_;
  std::unique_ptr<Runtime> rt_;
};

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
  mod.attr("cuda_architectures") = std::string(cuda_architectures());
  mod.attr("has_tensorrt") = tensorrt_compiled();
  mod.attr("tensorrt_version") = tensorrt_version();
  register_buffer_view(mod);

  py::class_<DeviceArray, std::shared_ptr<DeviceArray>>(
      mod, "DeviceArray", "A result in GPU memory (when the inputs were): DLPack and __cuda_array_interface__; owns it.")
      .def(
          "__dlpack__", [](const DeviceArray& a, py::object, py::object, py::object, py::object) { return a.dlpack(); },
          py::arg("stream") = py::none(), py::kw_only(), py::arg("max_version") = py::none(),
          py::arg("dl_device") = py::none(), py::arg("copy") = py::none())
      .def("__dlpack_device__", &DeviceArray::dlpack_device)
      .def_property_readonly("__cuda_array_interface__", &DeviceArray::cuda_array_interface)
      .def_property_readonly("shape", &DeviceArray::shape);

  mod.def("check_plan", [](const std::string& dir, const std::string& segment, const py::dict& plan, const py::dict& tensorrt) {
            const Manifest m = load_manifest(dir);
            if (m.segment_index(segment) < 0) throw py::value_error(dir + "/manifest.json has no segment '" + segment + "'");
            check_plan(m.segment(segment), tensorrt_from_dict(tensorrt), plan_from_dict(plan), segment + ".plan");
          },
          py::arg("engines_dir"), py::arg("segment"), py::arg("plan"), py::arg("tensorrt"),
          R"doc(The runtime's check of one TensorRT plan against the folder's manifest (the same code the
TensorRT engine runs after deserializing): plan = {"profiles": int, "tensors": [{"name", "input" (bool),
"dtype" ("float32", ...), "shape" (-1 dynamic), "min", "opt", "max" (profile 0, inputs)}]}; tensorrt =
the manifest's tensorrt section (version, gpu_arch, profile). Raises RuntimeError naming the plan and
the tensor: I/O count, a name the manifest does not know, mode, dtype, shape, profile range.)doc");
  mod.def("plan_target_problem", [](const py::dict& tensorrt, int lib_version, int cc_major, int cc_minor) {
            return plan_target_problem(tensorrt_from_dict(tensorrt), lib_version, cc_major, cc_minor);
          },
          py::arg("tensorrt"), py::arg("lib_version"), py::arg("cc_major"), py::arg("cc_minor"),
          R"doc(Why plans described by a manifest's tensorrt section cannot run with TensorRT `lib_version`
(major * 10000 + minor * 100 + patch) on a GPU of compute capability cc_major.cc_minor; "" when they
can. The TensorRT engine refuses such plans with this message before reading them.)doc");
  mod.def("tensorrt_log", []() { return tensorrt_log().recent(); },
          "The most recent warnings and errors TensorRT logged in this process (also echoed to stderr).");
  mod.def("_log_from_threads", &log_from_threads, py::arg("threads"), py::arg("per_thread"),
          "Test hook: the TensorRT logger's and error recorder's storage written from C++ threads.");

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

  py::class_<PyRuntime>(mod, "Runtime", kRuntimeDoc)
      .def(py::init<const std::string&, const std::string&, const std::string&, std::optional<std::string>, int,
                    std::optional<py::dict>, std::optional<std::string>, int, bool, bool, const std::string&,
                    std::optional<bool>>(),
           py::arg("engines_dir"), py::arg("device") = "cpu", py::arg("engine") = "auto", py::arg("precision") = py::none(),
           py::arg("threads") = 0, py::kw_only(), py::arg("segments") = py::none(), py::arg("cache_dir") = py::none(),
           py::arg("device_id") = 0, py::arg("fuse_static") = true, py::arg("fuse_exit") = true,
           py::arg("build_plans") = "auto", py::arg("cuda_graphs") = py::none())
      .def("denoise", &PyRuntime::denoise, py::arg("x"), py::arg("t"), py::arg("y") = py::none(), py::kw_only(),
           py::arg("policy") = py::none(), py::arg("threshold") = py::none(), py::arg("patience") = py::none(),
           py::arg("granularity") = py::none(), py::arg("static_layer") = py::none(), py::arg("table") = py::none(),
           py::arg("stream") = py::none(),
           kDenoiseDoc)
      .def("sample", &PyRuntime::sample, py::arg("noise"), py::arg("y") = py::none(), py::kw_only(),
           py::arg("sampler") = "dpm++", py::arg("steps") = py::none(), py::arg("guidance") = py::none(),
           py::arg("policy") = py::none(), py::arg("threshold") = py::none(), py::arg("patience") = py::none(),
           py::arg("granularity") = py::none(), py::arg("static_layer") = py::none(), py::arg("table") = py::none(),
           py::arg("eta") = 0.0, py::arg("seed") = 0, py::arg("final_x0") = true, py::arg("stream") = py::none(),
           kSampleDoc)
      .def("full", &PyRuntime::full, py::arg("x"), py::arg("t"), py::arg("y") = py::none(), py::kw_only(),
           py::arg("stream") = py::none(),
           "The `full` segment (the whole model in one graph): the speed baseline.")
      .def_property_readonly("engine", &PyRuntime::engine_name)
      .def_property_readonly("cuda_graphs", [](const PyRuntime& r) { return r.engine().cuda_graphs(); },
                             "Whether the engine replays CUDA graphs (TensorRT with cuda_graphs not False).")
      .def_property_readonly("graphs_captured", [](const PyRuntime& r) { return r.engine().graphs_captured(); },
                             "CUDA graphs the engine has captured so far (0 without graphs).")
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
