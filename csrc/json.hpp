// A small strict JSON reader for manifest.json (RFC 8259, UTF-8).
// Own code rather than a library so the module builds on machines with nothing but a
// compiler, CMake and pybind11 (the bare GPU machine has no nlohmann-json and no network).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace adadiff::json {

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Value> array;
  std::vector<std::pair<std::string, Value>> object;  // insertion order; duplicate keys are refused

  bool is_null() const { return type == Type::Null; }
  // nullptr when this is not an object or the key is absent.
  const Value* find(const std::string& key) const;
};

const char* type_name(Value::Type t);

// Throws std::runtime_error("json: <what> at line L column C") on malformed input.
Value parse(const std::string& text);

}  // namespace adadiff::json
