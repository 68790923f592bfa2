// Python dicts to and from the runtime's descriptions (py_dicts.hpp).
#include "py_dicts.hpp"

#include <algorithm>
#include <thread>
#include <vector>

namespace adadiff::python {

namespace {

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

}  // namespace

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

static py::object bytes_or_none(uint64_t b) { return b == UINT64_MAX ? py::none() : py::object(py::int_(b)); }

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

py::dict check_memory_for(const py::dict& model, int64_t max_batch, bool u_map, const std::string& device,
                          int device_id) {
  const ModelDesc desc = model_from_json(py::str(py::module_::import("json").attr("dumps")(model)));
  return memory_dict(check_memory(desc, max_batch, u_map, device, device_id));
}

PlanInfo plan_from_dict(const py::dict& d) {
  PlanInfo p;
  p.profiles = d["profiles"].cast<int>();
  for (auto item : d["tensors"].cast<py::list>()) {
    const py::dict t = item.cast<py::dict>();
    PlanTensor pt;
    pt.name = t["name"].cast<std::string>();
    pt.input = t["input"].cast<bool>();
    pt.dtype = t["dtype"].cast<std::string>();
    pt.shape = t["shape"].cast<std::vector<int64_t>>();
    for (auto [key, dst] : {std::pair<const char*, std::vector<int64_t>*>{"min", &pt.min}, {"opt", &pt.opt}, {"max", &pt.max}})
      if (t.contains(key) && !t[key].is_none()) *dst = t[key].cast<std::vector<int64_t>>();
    p.tensors.push_back(std::move(pt));
  }
  return p;
}

TensorRtDesc tensorrt_from_dict(const py::dict& d) {
  TensorRtDesc t;
  t.present = true;
  t.version = d["version"].cast<std::string>();
  t.gpu_arch = d.contains("gpu_arch") && !d["gpu_arch"].is_none() ? d["gpu_arch"].cast<std::string>() : "";
  const py::dict prof = d["profile"].cast<py::dict>();
  t.profile_min = prof["min"].cast<int>();
  t.profile_opt = prof["opt"].cast<int>();
  t.profile_max = prof["max"].cast<int>();
  return t;
}

py::dict log_from_threads(int threads, int per_thread) {
  MessageLog log(/*echo=*/false, size_t(threads) * size_t(per_thread));
  ErrorList errors;
  {
    py::gil_scoped_release release;
    std::vector<std::thread> pool;
    for (int k = 0; k < threads; ++k)
      pool.emplace_back([&, k] {
        for (int i = 0; i < per_thread; ++i) {
          const std::string msg = "thread " + std::to_string(k) + " message " + std::to_string(i);
          log.add(i % 3, msg.c_str());  // internal error, error, warning: all kept
          log.add(3, "info is not kept");
          errors.add(k, msg.c_str());
          if (i % 7 == 0) (void)errors.message("");
        }
      });
    for (auto& t : pool) t.join();
  }
  py::dict d;
  d["count"] = log.count();
  d["recent"] = log.recent();
  d["errors"] = errors.size();
  d["overflowed"] = errors.overflowed();
  d["error_message"] = errors.message("none");
  return d;
}

}  // namespace adadiff::python
