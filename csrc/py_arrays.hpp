// Arrays in and out of the Python API: denoise / sample / full take numpy arrays, any CPU DLPack object (torch CPU tensors, JAX ...; viewed
// through numpy.from_dlpack, no copy) or CUDA memory (DLPack or __cuda_array_interface__: torch CUDA
// tensors, CuPy), and return arrays of the input's kind on the input's device.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
// Every translation unit of the module sees the same casters (std::vector and friends), or the
// linker may keep the generic one for a cast both instantiate.
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dlpack.h"
#include "ops.hpp"

namespace adadiff::python {

namespace py = pybind11;

std::string shape_of(const py::array& a);
std::string shape_str(const std::vector<int64_t>& s);

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

// What a CUDA input's memory is, and what keeps it alive for the call.
struct ArrayArg {
  py::object keep;                     // the numpy array / the imported capsule's owner / the object
  const void* data = nullptr;
  bool cuda = false;
  int device = -1;
  std::vector<int64_t> shape;
  py::object library = py::none();     // CPU: the module whose from_dlpack turns results into the input's kind
  py::array host;                      // CPU: the C-contiguous numpy view or copy
};

// `obj` as an array of T: numpy (exact dtype, C-contiguous), a CPU DLPack object, or CUDA memory when `ops`
// is a CUDA runtime's; errors name the argument. Instantiated for float and int64_t.
template <class T>
ArrayArg array_arg(const py::handle& obj, const char* name, const char* dtype, Ops& ops);

// A result in device memory, handed to Python: DLPack and __cuda_array_interface__ over memory it owns.
class DeviceArray {
 public:
  DeviceArray(std::shared_ptr<void> mem, std::vector<int64_t> shape, DLDataType dtype, int device)
      : mem_(std::move(mem)), shape_(std::move(shape)), dtype_(dtype), device_(device) {}
  void* data() const { return mem_.get(); }

  py::capsule dlpack() const {
    struct Holder {
      DLManagedTensor managed{};
      std::vector<int64_t> shape;
      std::shared_ptr<void> mem;
    };
    auto* h = new Holder{{}, shape_, mem_};
    DLTensor& t = h->managed.dl_tensor;
    t.data = mem_.get();
    t.device = DLDevice{kDLCUDA, device_};
    t.ndim = int32_t(shape_.size());
    t.dtype = dtype_;
    t.shape = h->shape.data();
    h->managed.manager_ctx = h;
    h->managed.deleter = [](DLManagedTensor* self) { delete static_cast<Holder*>(self->manager_ctx); };
    return py::capsule(&h->managed, "dltensor", [](PyObject* cap) {
      if (PyCapsule_IsValid(cap, "dltensor")) {
        auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
        if (mt && mt->deleter) mt->deleter(mt);
      }
    });
  }
  py::tuple dlpack_device() const { return py::make_tuple(int(kDLCUDA), device_); }
  py::dict cuda_array_interface() const {
    py::dict d;
    d["shape"] = py::tuple(py::cast(shape_));
    d["typestr"] = std::string("<") + (dtype_.code == kDLFloat ? "f" : "i") + std::to_string(dtype_.bits / 8);
    d["data"] = py::make_tuple(reinterpret_cast<uintptr_t>(mem_.get()), false);
    d["version"] = 3;
    d["strides"] = py::none();
    d["stream"] = py::none();  // complete when the call returned (or ordered on its stream=)
    return d;
  }
  py::tuple shape() const { return py::tuple(py::cast(shape_)); }

 private:
  std::shared_ptr<void> mem_;
  std::vector<int64_t> shape_;
  DLDataType dtype_;
  int device_;
};

// A CUDA stream handle from `stream`: None, an int (cudaStream_t, or DLPack's 1 / 2), or an object
// with .cuda_stream (torch.cuda.Stream) or .ptr (cupy.cuda.Stream).
std::optional<intptr_t> stream_handle(const py::object& stream);

}  // namespace adadiff::python
