// A small JSON reader for the files an sdrt export holds (manifest, configs, vocab, safetensors headers).
// Parses all of JSON (objects keep their key order); numbers are doubles. Throws sdrt::Error on bad input.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace sdrt {

class Json {
public:
    enum class Type { Null, Bool, Number, String, Array, Object };

    Json() = default;
    static Json boolean(bool v);
    static Json number(double v);
    static Json string(const std::string &v);
    static Json parse(const std::string &text, const std::string &where);  // where: a file name, for messages
    static Json parse_file(const std::string &path);

    Type type() const { return type_; }
    bool is_null() const { return type_ == Type::Null; }
    bool is_bool() const { return type_ == Type::Bool; }
    bool is_number() const { return type_ == Type::Number; }
    bool is_string() const { return type_ == Type::String; }
    bool is_array() const { return type_ == Type::Array; }
    bool is_object() const { return type_ == Type::Object; }

    bool as_bool() const;
    double as_number() const;
    long long as_int() const;  // refuses non-integral numbers
    const std::string &as_string() const;
    const std::vector<Json> &as_array() const;
    const std::vector<std::pair<std::string, Json>> &as_object() const;

    bool has(const std::string &key) const { return find(key) != nullptr; }
    const Json *find(const std::string &key) const;  // nullptr if absent or not an object (a linear search)
    const Json &at(const std::string &key) const;    // throws naming the key
    size_t size() const;

    // Python-style truthiness, for config flags that may be null/false/0.
    bool truthy() const;

private:
    friend class JsonParser;
    Type type_ = Type::Null;
    bool bool_ = false;
    double number_ = 0.0;
    std::string string_;
    std::vector<Json> array_;
    std::vector<std::pair<std::string, Json>> object_;
};

}  // namespace sdrt
