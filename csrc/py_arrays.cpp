// Arrays in and out of the Python API (py_arrays.hpp).
#include "py_arrays.hpp"

#include <type_traits>

namespace adadiff::python {

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Owns an imported DLPack tensor until the Python object holding it goes.
struct ImportedTensor {
  DLManagedTensor* mt = nullptr;
  ~ImportedTensor() {
    if (mt && mt->deleter) mt->deleter(mt);
  }
};

py::object library_of(const py::handle& obj) {
  const std::string mod = py::str(py::type::handle_of(obj).attr("__module__"));
  const std::string top = mod.substr(0, mod.find('.'));
  if (top == "numpy" || top == "builtins") return py::none();
  try {
    py::module_ m = py::module_::import(top.c_str());
    if (py::hasattr(m, "from_dlpack")) return std::move(m);
  } catch (const py::error_already_set&) {
  }
  return py::none();
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// A C-contiguous CUDA array of `bits`-wide `code` elements (DLPack codes: 0 int, 2 float).
void check_cuda_layout(const char* name, const char* dtype, bool dtype_ok, const std::vector<int64_t>& shape,
                       const int64_t* strides_elems) {
  if (!dtype_ok) throw py::type_error(std::string(name) + " must have dtype " + dtype);
  if (strides_elems) {
    int64_t expect = 1;
    for (int i = int(shape.size()) - 1; i >= 0; --i) {
      if (shape[size_t(i)] != 1 && strides_elems[i] != expect)
        throw py::value_error(std::string(name) + " must be C-contiguous on the GPU (call .contiguous())");
      expect *= shape[size_t(i)];
    }
  }
}

template <class T>
ArrayArg array_arg(const py::handle& obj, const char* name, const char* dtype, Ops& ops) {
  ArrayArg a;
  auto from_numpy = [&](const py::handle& arr) {
    a.host = typed<T>(arr, name, dtype);
    a.keep = a.host;
    a.data = a.host.data();
    for (py::ssize_t i = 0; i < a.host.ndim(); ++i) a.shape.push_back(a.host.shape(i));
  };
  if (py::isinstance<py::array>(obj)) {
    from_numpy(obj);
    return a;
  }
  const int want_code = std::is_floating_point<T>::value ? kDLFloat : kDLInt;
  if (py::hasattr(obj, "__dlpack_device__")) {
    const py::tuple dev = obj.attr("__dlpack_device__")();
    const int type = dev[0].cast<int>();
    if (type == kDLCPU) {
      from_numpy(py::module_::import("numpy").attr("from_dlpack")(obj));
      a.library = library_of(obj);
      return a;
    }
    if (type != kDLCUDA)
      throw py::type_error(std::string(name) + ": DLPack device type " + std::to_string(type) +
                           " is neither the CPU nor a CUDA GPU");
    if (!ops.is_cuda())
      throw py::value_error(std::string(name) + " is on cuda:" + std::to_string(dev[1].cast<int>()) +
                            " and this Runtime is on the CPU: pass host arrays, or open the folder with device='cuda'");
    // The producer orders its pending writes before the runtime's stream (the DLPack stream protocol).
    py::object cap = obj.attr("__dlpack__")(py::arg("stream") = reinterpret_cast<intptr_t>(ops.stream()));
    if (!PyCapsule_IsValid(cap.ptr(), "dltensor"))
      throw py::type_error(std::string(name) + ".__dlpack__() did not return a dltensor capsule");
    auto owner = std::make_unique<ImportedTensor>();
    owner->mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
    PyCapsule_SetName(cap.ptr(), "used_dltensor");
    const DLTensor& t = owner->mt->dl_tensor;
    a.shape.assign(t.shape, t.shape + t.ndim);
    check_cuda_layout(name, dtype, t.dtype.code == want_code && t.dtype.bits == 8 * sizeof(T) && t.dtype.lanes == 1,
                      a.shape, t.strides);
    a.data = static_cast<const char*>(t.data) + t.byte_offset;
    a.cuda = true;
    a.device = t.device.device_id;
    a.keep = py::capsule(owner.release(), [](void* p) { delete static_cast<ImportedTensor*>(p); });
    a.library = library_of(obj);
    return a;
  }
  if (py::hasattr(obj, "__cuda_array_interface__")) {
    const py::dict cai = obj.attr("__cuda_array_interface__");
    if (!ops.is_cuda())
      throw py::value_error(std::string(name) + " is CUDA memory (__cuda_array_interface__) and this Runtime is on the CPU");
    a.shape = cai["shape"].cast<std::vector<int64_t>>();
    const std::string ts = cai["typestr"].cast<std::string>();
    const std::string want = std::string("<") + (std::is_floating_point<T>::value ? "f" : "i") + std::to_string(sizeof(T));
    std::vector<int64_t> strides;
    if (cai.contains("strides") && !cai["strides"].is_none())
      for (int64_t b : cai["strides"].cast<std::vector<int64_t>>()) strides.push_back(b / int64_t(sizeof(T)));
    check_cuda_layout(name, dtype, ts == want, a.shape, strides.empty() ? nullptr : strides.data());
    // The interface's stream: the producer's pending writes come first (v3: None = no ordering needed).
    if (cai.contains("stream") && !cai["stream"].is_none()) ops.wait_for(cai["stream"].cast<intptr_t>());
    a.data = reinterpret_cast<const void*>(cai["data"].cast<py::tuple>()[0].cast<uintptr_t>());
    a.cuda = true;
    a.device = pointer_device(a.data);
    a.keep = py::reinterpret_borrow<py::object>(obj);
    a.library = library_of(obj);
    return a;
  }
  throw py::type_error(std::string(name) + " must be a numpy array of " + dtype +
                       ", a DLPack tensor (torch, JAX, CuPy) or CUDA memory with __cuda_array_interface__; got " +
                       std::string(py::str(py::type::handle_of(obj))));
}

template ArrayArg array_arg<float>(const py::handle&, const char*, const char*, Ops&);
template ArrayArg array_arg<int64_t>(const py::handle&, const char*, const char*, Ops&);

std::optional<intptr_t> stream_handle(const py::object& stream) {
  if (stream.is_none()) return std::nullopt;
  if (py::isinstance<py::int_>(stream)) return stream.cast<intptr_t>();
  for (const char* attr : {"cuda_stream", "ptr"})
    if (py::hasattr(stream, attr)) return stream.attr(attr).cast<intptr_t>();
  throw py::type_error("stream must be None, a CUDA stream handle (int) or a stream object with .cuda_stream "
                       "(torch) or .ptr (CuPy), got " + std::string(py::str(py::type::handle_of(stream))));
}

}  // namespace adadiff::python
