// Typed access to manifest.json's values, every error naming the field ("segments[3].inputs:
// expected a string, got number 3"), and strict parsing: a duplicate key is refused, since a
// manifest holding two values for one field is ambiguous. Internal to the manifest reader
// (nlohmann/json stays out of the installed headers).
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace adadiff::manifest_json {

using Json = nlohmann::json;

// Throws std::runtime_error "manifest.json: <where>: <what>".
[[noreturn]] void bad(const std::string& where, const std::string& what);
// A value as a message shows it: short scalars verbatim, anything else by its type.
std::string shown(const Json& v);
// obj[key], refused when obj is not an object or has no such key.
const Json& field(const Json& obj, const std::string& where, const std::string& key);
// An optional field: nullptr when absent or null.
const Json* optional(const Json& obj, const std::string& key);
const std::string& str(const Json& v, const std::string& where);
std::string str(const Json& obj, const std::string& where, const std::string& key);
double num(const Json& v, const std::string& where);
double num(const Json& obj, const std::string& where, const std::string& key);
// An integral number within +-10^9.
int integer(const Json& v, const std::string& where);
int integer(const Json& obj, const std::string& where, const std::string& key);
// The document `text` read from `path`: malformed JSON and duplicate keys refused, naming where.
Json parse_document(const std::string& text, const std::string& path);

}  // namespace adadiff::manifest_json
