// Reading manifest.json: every field typed and checked, the segments' wiring against the model,
// the exit defaults and time tables; errors name the field (docs/MANIFEST.md).
#include <cmath>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "manifest.hpp"
#include "manifest_json.hpp"

namespace adadiff {

namespace {

using namespace manifest_json;

DType parse_dtype(const std::string& s, const std::string& where) {
  if (s == "float32") return DType::Float32;
  if (s == "float16") return DType::Float16;
  if (s == "bfloat16") return DType::BFloat16;
  if (s == "int64") return DType::Int64;
  bad(where, "unknown dtype '" + s + "'");
}

TensorDesc parse_tensor(const Json& v, const std::string& where) {
  TensorDesc t;
  t.name = str(v, where, "name");
  t.dtype = parse_dtype(str(v, where, "dtype"), where + ".dtype");
  const Json& shape = field(v, where, "shape");
  if (!shape.is_array() || shape.empty()) bad(where + ".shape", "expected a non-empty array, got " + shown(shape));
  for (size_t i = 0; i < shape.size(); ++i) {
    const Json& d = shape[i];
    std::string w = where + ".shape[" + std::to_string(i) + "]";
    if (d.is_string()) {
      if (d.get_ref<const std::string&>() != "B" || i != 0)
        bad(w, "only the first dimension may be symbolic, and only as \"B\"");
      t.shape.push_back(kBatchDim);
    } else {
      int n = integer(d, w);
      if (n < 1) bad(w, "dimensions must be positive");
      t.shape.push_back(n);
    }
  }
  if (t.shape[0] != kBatchDim) bad(where + ".shape", "the first dimension must be the batch \"B\"");
  return t;
}

std::vector<TensorDesc> parse_tensors(const Json& seg, const std::string& where, const std::string& key) {
  const Json& arr = field(seg, where, key);
  if (!arr.is_array()) bad(where + "." + key, "expected an array, got " + shown(arr));
  std::vector<TensorDesc> out;
  for (size_t i = 0; i < arr.size(); ++i)
    out.push_back(parse_tensor(arr[i], where + "." + key + "[" + std::to_string(i) + "]"));
  return out;
}

void need_tensor(const SegmentDesc& s, bool input, const std::string& name, const std::vector<int64_t>& shape) {
  const auto& list = input ? s.inputs : s.outputs;
  for (const auto& t : list) {
    if (t.name != name) continue;
    if (t.shape != shape) {
      TensorDesc want{name, t.dtype, shape};
      bad("segment " + s.name, std::string(input ? "input " : "output ") + name + " has shape " + t.shape_str(0) +
                                   ", the model config implies " + want.shape_str(0));
    }
    if (name == "y") {
      if (t.dtype != DType::Int64) bad("segment " + s.name, "input y must be int64");
    } else if (t.dtype != DType::Float32) {
      bad("segment " + s.name, std::string(input ? "input " : "output ") + name + " has dtype " + dtype_name(t.dtype) +
                                   "; this runtime exchanges float32 tensors only");
    }
    return;
  }
  bad("segment " + s.name, std::string("missing ") + (input ? "input " : "output ") + name);
}

// The wiring the runtime relies on: names, shapes and skip sources exactly as docs/MANIFEST.md fixes them.
void check_wiring(const Manifest& m) {
  const ModelDesc& c = m.model;
  const int n = c.depth;
  if (int(m.segments.size()) != n + 3)
    bad("segments", "expected stem, layer_1..layer_" + std::to_string(n) + ", head, full (" + std::to_string(n + 3) +
                        " segments), found " + std::to_string(m.segments.size()));
  const std::vector<int64_t> img{kBatchDim, c.in_chans, c.img_size, c.img_size};
  const std::vector<int64_t> hid{kBatchDim, c.num_tokens, c.embed_dim};
  const std::vector<int64_t> emb{kBatchDim, c.embed_dim};
  const std::vector<int64_t> vec{kBatchDim};
  auto check_stem_like = [&](const SegmentDesc& s) {
    need_tensor(s, true, "x", img);
    need_tensor(s, true, "t", vec);
    if (c.conditional()) need_tensor(s, true, "y", vec);
    size_t want = c.conditional() ? 3 : 2;
    if (s.inputs.size() != want) bad("segment " + s.name, "expected " + std::to_string(want) + " inputs");
  };
  const SegmentDesc& stem = m.segments[0];
  if (stem.name != "stem" || stem.kind != "stem") bad("segments[0]", "expected the stem");
  check_stem_like(stem);
  need_tensor(stem, false, "h", hid);
  need_tensor(stem, false, "temb", emb);
  const int k = c.num_in_blocks();
  for (int i = 1; i <= n; ++i) {
    const SegmentDesc& s = m.segments[i];
    std::string want = "layer_" + std::to_string(i);
    if (s.name != want || s.kind != "layer" || s.index != i)
      bad("segments[" + std::to_string(i) + "]", "expected " + want + " (kind layer, index " + std::to_string(i) + ")");
    int skip = i > k + 1 ? 2 * k + 2 - i : 0;  // layer k+1+j takes in layer k+1-j
    if (s.skip_from != skip)
      bad("segment " + s.name, "skip_from is " + std::to_string(s.skip_from) + ", the U-ViT wiring needs " +
                                   std::to_string(skip));
    need_tensor(s, true, "h_in", hid);
    need_tensor(s, true, "temb", emb);
    if (skip) need_tensor(s, true, "skip", hid);
    if (s.inputs.size() != size_t(skip ? 3 : 2)) bad("segment " + s.name, "unexpected number of inputs");
    need_tensor(s, false, "h_out", hid);
    need_tensor(s, false, "u", vec);
    if (s.outputs.size() == 3) need_tensor(s, false, "u_map", img);
    else if (s.outputs.size() != 2) bad("segment " + s.name, "expected outputs h_out, u and optionally u_map");
  }
  const SegmentDesc& head = m.segments[n + 1];
  if (head.name != "head" || head.kind != "head") bad("segments[" + std::to_string(n + 1) + "]", "expected the head");
  need_tensor(head, true, "h", hid);
  need_tensor(head, false, "eps", img);
  const SegmentDesc& full = m.segments[n + 2];
  if (full.name != "full" || full.kind != "full") bad("segments[" + std::to_string(n + 2) + "]", "expected full");
  check_stem_like(full);
  need_tensor(full, false, "eps", img);
}

ModelDesc parse_model(const Json& v) {
  ModelDesc c;
  const std::string w = "model";
  c.img_size = integer(v, w, "img_size");
  c.in_chans = integer(v, w, "in_chans");
  c.patch_size = integer(v, w, "patch_size");
  c.embed_dim = integer(v, w, "embed_dim");
  c.depth = integer(v, w, "depth");
  c.num_heads = integer(v, w, "num_heads");
  c.num_classes = integer(v, w, "num_classes");
  const Json* nc = optional(v, "null_class");
  c.null_class = nc ? integer(*nc, "model.null_class") : c.num_classes;
  c.num_extra_tokens = 1 + (c.num_classes > 0 ? 1 : 0);
  int grid = c.patch_size > 0 ? c.img_size / c.patch_size : 0;
  c.num_tokens = c.num_extra_tokens + grid * grid;
  if (const Json* t = optional(v, "num_tokens")) {
    if (integer(*t, "model.num_tokens") != c.num_tokens) bad("model.num_tokens", "inconsistent with img_size/patch_size");
  }
  if (c.depth < 1 || c.depth % 2 == 0) bad("model.depth", "must be odd and positive");
  if (c.img_size < 1 || c.in_chans < 1 || c.patch_size < 1 || c.embed_dim < 1 || c.img_size % c.patch_size)
    bad("model", "image shape, patch size and width must be positive and consistent");
  if (c.num_classes < 0) bad("model.num_classes", "must be >= 0");
  if (c.num_classes > 0 && (c.null_class < 0 || c.null_class > c.num_classes))
    bad("model.null_class", "must be in 0..num_classes");
  return c;
}

TensorRtDesc parse_tensorrt(const Json* v) {
  TensorRtDesc t;
  if (!v) return t;
  const std::string w = "tensorrt";
  t.present = true;
  t.version = str(*v, w, "version");
  t.precision = str(*v, w, "precision");
  if (const Json* a = optional(*v, "gpu_arch")) t.gpu_arch = str(*a, w + ".gpu_arch");
  const Json& prof = field(*v, w, "profile");
  t.profile_min = integer(prof, w + ".profile", "min");
  t.profile_opt = integer(prof, w + ".profile", "opt");
  t.profile_max = integer(prof, w + ".profile", "max");
  const Json& plans = field(*v, w, "plans");
  if (!plans.is_object()) bad(w + ".plans", "expected an object, got " + shown(plans));
  for (const auto& kv : plans.items()) {
    std::string pw = w + ".plans." + kv.key();
    PlanDesc p{str(kv.value(), pw, "file"), str(kv.value(), pw, "sha256")};
    if (!is_plain_file_name(p.file)) bad(pw + ".file", "'" + p.file + "' is not a plain file name inside the engines folder");
    t.plans[kv.key()] = p;
  }
  return t;
}

// obj[key] as an array, each element through `element(value, where)`.
template <class T>
std::vector<T> array_of(const Json& obj, const std::string& where, const std::string& key, const char* what,
                        T (*element)(const Json&, const std::string&)) {
  const Json& arr = field(obj, where, key);
  if (!arr.is_array()) bad(where + "." + key, std::string("expected an array of ") + what + ", got " + shown(arr));
  std::vector<T> out;
  for (size_t i = 0; i < arr.size(); ++i) out.push_back(element(arr[i], where + "." + key + "[" + std::to_string(i) + "]"));
  return out;
}

std::vector<double> numbers(const Json& obj, const std::string& where, const std::string& key) {
  return array_of<double>(obj, where, key, "numbers", num);
}

std::vector<int> integers(const Json& obj, const std::string& where, const std::string& key) {
  return array_of<int>(obj, where, key, "integers", integer);
}

// exit.schedule {t_bounds, layers} or exit.uem_time {t_bounds, min_layers, max_layers, thresholds}.
TimeTable parse_table(const Json* v, const std::string& where, int depth, bool uem) {
  TimeTable t;
  if (!v) return t;
  t.bounds = numbers(*v, where, "t_bounds");
  if (uem) {
    t.min_layer = integers(*v, where, "min_layers");
    t.max_layer = integers(*v, where, "max_layers");
    for (double x : numbers(*v, where, "thresholds")) t.threshold.push_back(float(x));
  } else {
    t.min_layer = integers(*v, where, "layers");
    t.max_layer = t.min_layer;
  }
  try {
    check_time_table(t, depth, uem, where);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(std::string("manifest.json: ") + e.what());
  }
  return t;
}

// The default policy must be one this runtime runs, with what it needs in the folder.
void check_exit_defaults(const Manifest& m) {
  const ExitDefaults& e = m.exit;
  if (e.policy != "uem" && e.policy != "uem-time" && e.policy != "schedule" && e.policy != "static" &&
      e.policy != "saturation" && e.policy != "uem-authors")
    bad("exit.policy", "unknown policy '" + e.policy + "' (uem, uem-time, schedule, static, saturation, uem-authors)");
  if (e.policy == "schedule" && e.schedule.empty()) bad("exit.policy", "is 'schedule' but exit.schedule is absent");
  if (e.policy == "uem-time" && e.uem_time.empty()) bad("exit.policy", "is 'uem-time' but exit.uem_time is absent");
  if (e.granularity != "sample" && e.granularity != "batch") bad("exit.granularity", "must be 'sample' or 'batch'");
  if (e.patience < 1) bad("exit.patience", "must be >= 1");
  if (e.layer < 0 || e.layer > m.model.depth) bad("exit.layer", "must be in 0..depth (0 = full depth)");
  if (!(e.threshold >= 0.0 && std::isfinite(e.threshold))) bad("exit.threshold", "must be a finite number >= 0");
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("no manifest.json in the engines folder (cannot open " + path + ")");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

}  // namespace

ModelDesc model_from_json(const std::string& text) { return parse_model(parse_document(text, "model")); }

Manifest load_manifest(const std::string& dir) {
  Manifest m;
  m.dir = dir;
  while (m.dir.size() > 1 && m.dir.back() == '/') m.dir.pop_back();
  const std::string path = m.dir + "/manifest.json";
  std::string text;
  try {
    text = read_text(path);
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
  const Json root = parse_document(text, path);
  if (!root.is_object()) bad("document", "expected an object, got " + shown(root));
  if (str(root, "document", "format") != "adadiff-engines") bad("format", "expected \"adadiff-engines\"");
  m.version = integer(root, "document", "version");
  if (m.version < kOldestManifestVersion || m.version > kManifestVersion)
    bad("version", "the engines folder has manifest version " + std::to_string(m.version) + ", this runtime reads " +
                       std::to_string(kOldestManifestVersion) + ".." + std::to_string(kManifestVersion) +
                       (m.version > kManifestVersion ? "; update adadiff_rt" : "; rebuild the engines"));
  m.model = parse_model(field(root, "document", "model"));
  const Json& sch = field(root, "document", "schedule");
  if (const Json* ty = optional(sch, "type"); ty && str(*ty, "schedule.type") != "vp_linear")
    bad("schedule.type", "only vp_linear is supported, got '" + ty->get<std::string>() + "'");
  m.schedule.beta_min = num(sch, "schedule", "beta_min");
  m.schedule.beta_max = num(sch, "schedule", "beta_max");
  m.schedule.t_eps = num(sch, "schedule", "t_eps");
  if (!(m.schedule.t_eps > 0 && m.schedule.t_eps < 1)) bad("schedule.t_eps", "must be in (0, 1)");
  m.max_batch = integer(root, "document", "max_batch");
  if (m.max_batch < 1) bad("max_batch", "must be >= 1");

  const Json& segs = field(root, "document", "segments");
  if (!segs.is_array()) bad("segments", "expected an array, got " + shown(segs));
  for (size_t i = 0; i < segs.size(); ++i) {
    const Json& v = segs[i];
    std::string w = "segments[" + std::to_string(i) + "]";
    SegmentDesc s;
    s.name = str(v, w, "name");
    w = "segment " + s.name;
    s.kind = str(v, w, "kind");
    s.file = str(v, w, "file");
    if (!is_plain_file_name(s.file))
      bad(w + ".file", "'" + s.file + "' is not a plain file name inside the engines folder");
    s.sha256 = str(v, w, "sha256");
    if (const Json* idx = optional(v, "index")) s.index = integer(*idx, w + ".index");
    if (const Json* b = optional(v, "block")) s.block = str(*b, w + ".block");
    if (const Json* sf = optional(v, "skip_from")) s.skip_from = integer(*sf, w + ".skip_from");
    s.inputs = parse_tensors(v, w, "inputs");
    s.outputs = parse_tensors(v, w, "outputs");
    m.segments.push_back(std::move(s));
  }
  check_wiring(m);
  m.tensorrt = parse_tensorrt(optional(root, "tensorrt"));

  // Every exit field is optional (absent or null: the runtime's default) but must have its type.
  if (const Json* ex = optional(root, "exit")) {
    if (!ex->is_object()) bad("exit", "expected an object, got " + shown(*ex));
    if (const Json* p = optional(*ex, "policy")) m.exit.policy = str(*p, "exit.policy");
    if (const Json* g = optional(*ex, "granularity")) m.exit.granularity = str(*g, "exit.granularity");
    if (const Json* t = optional(*ex, "threshold")) m.exit.threshold = num(*t, "exit.threshold");
    if (const Json* p = optional(*ex, "patience")) m.exit.patience = integer(*p, "exit.patience");
    if (const Json* g = optional(*ex, "guidance")) m.exit.guidance = num(*g, "exit.guidance");
    if (const Json* l = optional(*ex, "layer")) m.exit.layer = integer(*l, "exit.layer");
    m.exit.schedule = parse_table(optional(*ex, "schedule"), "exit.schedule", m.model.depth, false);
    m.exit.uem_time = parse_table(optional(*ex, "uem_time"), "exit.uem_time", m.model.depth, true);
  }
  check_exit_defaults(m);
  if (!m.model.conditional()) m.exit.guidance = 1.0;
  return m;
}

}  // namespace adadiff
