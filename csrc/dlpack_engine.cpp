#include "dlpack_engine.hpp"

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "dlpack.h"

namespace py = pybind11;

namespace adadiff {

namespace {

DLDataType dl_type(DType d) {
  switch (d) {
    case DType::Float32: return {kDLFloat, 32, 1};
    case DType::Float16: return {kDLFloat, 16, 1};
    case DType::BFloat16: return {kDLBfloat, 16, 1};
    case DType::Int64: return {kDLInt, 64, 1};
  }
  return {kDLFloat, 32, 1};
}

// Owns the shape array the DLTensor points at; freed by the consumer through the deleter.
struct ViewHolder {
  DLManagedTensor managed{};
  std::vector<int64_t> shape;
};

void view_deleter(DLManagedTensor* self) { delete static_cast<ViewHolder*>(self->manager_ctx); }

// A DLPack-exporting window on one runtime buffer for the duration of one callable.
class BufferView {
 public:
  BufferView(void* data, std::vector<int64_t> shape, DType dtype, Ops* ops)
      : data_(data), shape_(std::move(shape)), dtype_(dtype), ops_(ops) {}

  py::capsule dlpack(py::object stream) const {
    if (ops_->is_cuda()) {
      intptr_t s = stream.is_none() ? 1 : stream.cast<intptr_t>();
      ops_->hand_off(s);
    }
    auto* h = new ViewHolder;
    h->shape = shape_;
    DLTensor& t = h->managed.dl_tensor;
    t.data = data_;
    t.device = device();
    t.ndim = int32_t(shape_.size());
    t.dtype = dl_type(dtype_);
    t.shape = h->shape.data();
    t.strides = nullptr;  // compact row-major
    t.byte_offset = 0;
    h->managed.manager_ctx = h;
    h->managed.deleter = view_deleter;
    return py::capsule(&h->managed, "dltensor", [](PyObject* cap) {
      // Only an unconsumed capsule still owns the tensor (consumers rename it "used_dltensor").
      if (PyCapsule_IsValid(cap, "dltensor")) {
        auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
        if (mt && mt->deleter) mt->deleter(mt);
      }
    });
  }

  py::tuple dlpack_device() const {
    DLDevice d = device();
    return py::make_tuple(int(d.device_type), int(d.device_id));
  }

  py::tuple shape() const {
    py::tuple t(shape_.size());
    for (size_t i = 0; i < shape_.size(); ++i) t[i] = shape_[i];
    return t;
  }
  std::string dtype() const { return dtype_name(dtype_); }

 private:
  DLDevice device() const {
    return ops_->is_cuda() ? DLDevice{kDLCUDA, ops_->device_id()} : DLDevice{kDLCPU, 0};
  }
  void* data_;
  std::vector<int64_t> shape_;
  DType dtype_;
  Ops* ops_;
};

std::vector<int64_t> concrete(const TensorDesc& t, int batch) {
  std::vector<int64_t> s = t.shape;
  s[0] = batch;
  return s;
}

// Holds an imported capsule's tensor until the copy out of it is done.
struct Imported {
  DLManagedTensor* mt = nullptr;
  ~Imported() {
    if (mt && mt->deleter) mt->deleter(mt);
  }
};

class DlpackEngine final : public Engine {
 public:
  DlpackEngine(const Manifest& m, Ops* ops, const py::dict& segments, int max_batch)
      : m_(m), ops_(ops), max_batch_(max_batch) {
    for (auto item : segments) {
      std::string name = py::str(item.first);
      if (m_.segment_index(name) < 0) throw std::invalid_argument("segments: the manifest has no segment named '" + name + "'");
      if (!PyCallable_Check(item.second.ptr())) throw std::invalid_argument("segments['" + name + "'] is not callable");
    }
    fns_.resize(m_.segments.size());
    for (size_t i = 0; i < m_.segments.size(); ++i) {
      const std::string& name = m_.segments[i].name;
      if (segments.contains(name)) fns_[i] = segments[py::str(name)];
      else if (m_.segments[i].kind != "full")
        throw std::invalid_argument("segments: no callable for segment '" + name + "' (needed: stem, layer_1..layer_" +
                                    std::to_string(m_.model.depth) + ", head)");
    }
  }

  ~DlpackEngine() override {
    py::gil_scoped_acquire gil;
    fns_.clear();
  }

  std::string name() const override { return "dlpack"; }
  int max_batch() const override { return max_batch_; }

  void run(int seg, int batch, void* const* in, void* const* out) override {
    const SegmentDesc& s = m_.segments[seg];
    py::gil_scoped_acquire gil;
    if (!fns_[seg]) throw std::runtime_error("segment " + s.name + ": no callable was given for it");
    py::tuple args(s.inputs.size());
    for (size_t i = 0; i < s.inputs.size(); ++i)
      args[i] = py::cast(BufferView(in[i], concrete(s.inputs[i], batch), s.inputs[i].dtype, ops_));
    py::object result;
    try {
      result = fns_[seg](*args);
    } catch (py::error_already_set& e) {
      throw std::runtime_error("segment " + s.name + ": the callable raised " + std::string(e.what()));
    }
    std::vector<py::object> outs;
    if (py::isinstance<py::tuple>(result) || py::isinstance<py::list>(result)) {
      for (auto o : result) outs.push_back(py::reinterpret_borrow<py::object>(o));
    } else {
      outs.push_back(result);
    }
    if (outs.size() != s.outputs.size())
      throw std::runtime_error("segment " + s.name + ": the callable returned " + std::to_string(outs.size()) +
                               " outputs, the manifest lists " + std::to_string(s.outputs.size()));
    std::vector<Imported> held(outs.size());
    for (size_t i = 0; i < outs.size(); ++i) copy_out(s, s.outputs[i], outs[i], batch, out[i], held[i]);
    // The producers may reuse their memory once the capsules are released: wait for our copies.
    if (ops_->is_cuda()) ops_->synchronize();
  }

 private:
  void copy_out(const SegmentDesc& s, const TensorDesc& t, const py::object& obj, int batch, void* dst, Imported& held) {
    const std::string what = "segment " + s.name + " output " + t.name;
    if (!py::hasattr(obj, "__dlpack__"))
      throw std::runtime_error(what + ": returned a " + std::string(py::str(py::type::handle_of(obj))) + " without __dlpack__");
    py::object cap = ops_->is_cuda() ? obj.attr("__dlpack__")(py::arg("stream") = reinterpret_cast<intptr_t>(ops_->stream()))
                                     : obj.attr("__dlpack__")();
    if (!PyCapsule_IsValid(cap.ptr(), "dltensor")) throw std::runtime_error(what + ": __dlpack__ did not return a dltensor capsule");
    held.mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
    PyCapsule_SetName(cap.ptr(), "used_dltensor");
    const DLTensor& d = held.mt->dl_tensor;
    const bool want_cuda = ops_->is_cuda();
    if ((want_cuda && (d.device.device_type != kDLCUDA || d.device.device_id != ops_->device_id())) ||
        (!want_cuda && d.device.device_type != kDLCPU))
      throw std::runtime_error(what + ": the tensor is on the wrong device (DLPack device " +
                               std::to_string(int(d.device.device_type)) + ":" + std::to_string(d.device.device_id) +
                               "); the runtime's buffers are on " + (want_cuda ? "cuda" : "cpu"));
    DLDataType want = dl_type(t.dtype);
    if (d.dtype.code != want.code || d.dtype.bits != want.bits || d.dtype.lanes != 1)
      throw std::runtime_error(what + ": dtype mismatch, the manifest says " + dtype_name(t.dtype));
    std::vector<int64_t> shape = concrete(t, batch);
    bool same = d.ndim == int32_t(shape.size());
    for (int32_t i = 0; same && i < d.ndim; ++i) same = d.shape[i] == shape[i];
    if (!same) {
      std::string got = "[";
      for (int32_t i = 0; i < d.ndim; ++i) got += (i ? ", " : "") + std::to_string(d.shape[i]);
      throw std::runtime_error(what + ": shape " + got + "], the manifest says " + t.shape_str(batch));
    }
    if (d.strides) {
      int64_t expect = 1;
      for (int32_t i = d.ndim - 1; i >= 0; --i) {
        if (d.shape[i] != 1 && d.strides[i] != expect)
          throw std::runtime_error(what + ": the tensor is not contiguous (call .contiguous())");
        expect *= d.shape[i];
      }
    }
    size_t bytes = dtype_size(t.dtype);
    for (int64_t v : shape) bytes *= size_t(v);
    ops_->copy(dst, static_cast<const char*>(d.data) + d.byte_offset, bytes);
  }

  Manifest m_;
  Ops* ops_;
  int max_batch_;
  std::vector<py::object> fns_;
};

}  // namespace

void register_buffer_view(py::module_& m) {
  py::class_<BufferView>(m, "BufferView",
                         "A zero-copy DLPack view of one of the runtime's buffers, valid during one callable.")
      .def(
          "__dlpack__",
          [](const BufferView& v, py::object stream, py::object, py::object, py::object) { return v.dlpack(stream); },
          py::arg("stream") = py::none(), py::kw_only(), py::arg("max_version") = py::none(),
          py::arg("dl_device") = py::none(), py::arg("copy") = py::none())
      .def("__dlpack_device__", &BufferView::dlpack_device)
      .def_property_readonly("shape", &BufferView::shape)
      .def_property_readonly("dtype", &BufferView::dtype);
}

std::unique_ptr<Engine> make_dlpack_engine(const Manifest& m, Ops* ops, const py::dict& segments, int max_batch) {
  return std::make_unique<DlpackEngine>(m, ops, segments, max_batch);
}

}  // namespace adadiff
