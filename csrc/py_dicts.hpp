// Python dicts to and from the runtime's descriptions: time tables, exit defaults, the model, memory
// checks, TensorRT plan I/O; folder and memory checks and the logger's thread check, as dicts.
#pragma once

#include <pybind11/pybind11.h>
// Every translation unit of the module sees the same casters (std::vector and friends), or the
// linker may keep the generic one for a cast both instantiate.
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "load.hpp"
#include "manifest.hpp"
#include "plan_check.hpp"

namespace adadiff::python {

namespace py = pybind11;

// The manifest's JSON form of a time table (docs/MANIFEST.md): {t_bounds, layers} for a schedule,
// {t_bounds, min_layers, max_layers, thresholds} for uem-time. The runtime checks the values.
std::optional<TimeTable> time_table(const std::optional<py::dict>& d, const std::optional<std::string>& policy);
py::object table_dict(const TimeTable& t, bool uem);
py::dict exit_dict(const ExitDefaults& e);
py::dict model_dict(const Manifest& m);
py::dict memory_dict(const MemoryCheck& m);
// check_engines on `dir` (the GIL released while it hashes), as a dict.
py::dict check_folder(const std::string& dir, const std::string& device, int device_id);
// `model` goes through the manifest's own reader (as JSON), so it is checked as a folder's would be.
py::dict check_memory_for(const py::dict& model, int64_t max_batch, bool u_map, const std::string& device,
                          int device_id);
// A plan's I/O as register-plans reads it with the `tensorrt` package (and as the tests write it):
// {"profiles": int, "tensors": [{"name", "input", "dtype", "shape", "min", "opt", "max"}]}.
PlanInfo plan_from_dict(const py::dict& d);
// The manifest's tensorrt section as the runtime reads it, from a dict of the same fields.
TensorRtDesc tensorrt_from_dict(const py::dict& d);
// Writers on `threads` C++ threads into one MessageLog and one ErrorList (what the TensorRT logger
// and error recorder are made of), then what survived: the tests check that nothing was lost or torn.
py::dict log_from_threads(int threads, int per_thread);

}  // namespace adadiff::python
