// manifest.json's values read with errors naming the field (see manifest_json.hpp).
#include "manifest_json.hpp"

#include <cmath>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace adadiff::manifest_json {

namespace {

// Where the parser is, for messages ("segments[3].inputs"), and the keys each open object has
// seen: RFC 8259 leaves duplicate names to the reader and nlohmann/json keeps the last, but a
// manifest holding two values for one field is ambiguous, so it is refused, naming the object.
class ParsePath {
 public:
  bool on(Json::parse_event_t event, const Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start: open_.emplace_back(true); break;
      case Json::parse_event_t::array_start: open_.emplace_back(false); break;
      case Json::parse_event_t::key: {
        Frame& f = open_.back();
        f.key = parsed.get<std::string>();
        if (!f.keys.insert(f.key).second) bad(where(), "duplicate key \"" + f.key + "\"");
        break;
      }
      case Json::parse_event_t::object_end:
      case Json::parse_event_t::array_end:
        open_.pop_back();
        element_done();
        break;
      case Json::parse_event_t::value: element_done(); break;
    }
    return true;  // keep every value
  }

 private:
  struct Frame {
    explicit Frame(bool is_object) : object(is_object) {}
    bool object;
    std::string key;   // objects: the member being read
    size_t index = 0;  // arrays: the element being read
    std::set<std::string> keys;
  };

  void element_done() {
    if (!open_.empty() && !open_.back().object) ++open_.back().index;
  }

  // The innermost open container, as a path from the document.
  std::string where() const {
    std::string w;
    for (size_t i = 0; i + 1 < open_.size(); ++i)
      w += open_[i].object ? (w.empty() ? "" : ".") + open_[i].key : "[" + std::to_string(open_[i].index) + "]";
    return w.empty() ? "document" : w;
  }

  std::vector<Frame> open_;
};

// nlohmann/json's messages carry the position ("parse error at line 3, column 5: ..."); only the
// library's "[json.exception.parse_error.101] " tag is dropped.
std::string without_tag(const char* what) {
  std::string s = what;
  if (!s.empty() && s[0] == '[') {
    const size_t end = s.find("] ");
    if (end != std::string::npos) s.erase(0, end + 2);
  }
  return s;
}

}  // namespace

[[noreturn]] void bad(const std::string& where, const std::string& what) {
  throw std::runtime_error("manifest.json: " + where + ": " + what);
}

// A value as a message shows it: short scalars verbatim, anything else by its type.
std::string shown(const Json& v) {
  if (v.is_structured() || v.is_null()) return v.type_name();
  std::string s = v.dump();
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return std::string(v.type_name()) + " " + s;
}

const Json& field(const Json& obj, const std::string& where, const std::string& key) {
  if (!obj.is_object()) bad(where, std::string("expected an object, got ") + shown(obj));
  auto it = obj.find(key);
  if (it == obj.end()) bad(where, "missing field '" + key + "'");
  return *it;
}

// An optional field: nullptr when absent or null.
const Json* optional(const Json& obj, const std::string& key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  return it == obj.end() || it->is_null() ? nullptr : &*it;
}

const std::string& str(const Json& v, const std::string& where) {
  if (!v.is_string()) bad(where, "expected a string, got " + shown(v));
  return v.get_ref<const std::string&>();
}

std::string str(const Json& obj, const std::string& where, const std::string& key) {
  return str(field(obj, where, key), where + "." + key);
}

double num(const Json& v, const std::string& where) {
  if (!v.is_number()) bad(where, "expected a number, got " + shown(v));
  return v.get<double>();
}

double num(const Json& obj, const std::string& where, const std::string& key) {
  return num(field(obj, where, key), where + "." + key);
}

int integer(const Json& v, const std::string& where) {
  if (!v.is_number() || v.get<double>() != std::floor(v.get<double>()) || std::fabs(v.get<double>()) > 1e9)
    bad(where, "expected an integer, got " + shown(v));
  return int(v.get<double>());
}

int integer(const Json& obj, const std::string& where, const std::string& key) {
  return integer(field(obj, where, key), where + "." + key);
}

Json parse_document(const std::string& text, const std::string& path) {
  ParsePath at;
  try {
    return Json::parse(text, [&at](int, Json::parse_event_t event, Json& parsed) { return at.on(event, parsed); });
  } catch (const Json::exception& e) {
    throw std::runtime_error(path + ": malformed JSON: " + without_tag(e.what()));
  }
}

}  // namespace adadiff::manifest_json
