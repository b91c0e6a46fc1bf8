// The JSON reader: a recursive-descent parser over UTF-8 text (\u escapes, surrogate pairs, depth limit).
#include "json.h"

#include <cmath>
#include <cstdlib>

#include "util.h"

namespace sdrt {

class JsonParser {
public:
    JsonParser(const std::string &text, const std::string &where) : s_(text), where_(where) {}

    Json document() {
        Json v = value(0);
        skip_ws();
        if (pos_ != s_.size()) fail("unexpected text after the JSON value");
        return v;
    }

private:
    const std::string &s_;
    const std::string &where_;
    size_t pos_ = 0;

    [[noreturn]] void fail(const std::string &what) {
        throw model_error(where_ + " is not valid JSON (" + what + " at byte " + std::to_string(pos_) +
                          "); the file is damaged: re-export the model with `sdrt export`");
    }
    void skip_ws() {
        while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
    }
    bool literal(const char *word) {
        size_t n = std::char_traits<char>::length(word);
        if (s_.compare(pos_, n, word) != 0) return false;
        pos_ += n;
        return true;
    }

    Json value(int depth) {
        if (depth > 256) fail("nesting too deep");
        skip_ws();
        if (pos_ >= s_.size()) fail("unexpected end");
        Json v;
        char c = s_[pos_];
        if (c == '{') {
            v.type_ = Json::Type::Object;
            ++pos_;
            skip_ws();
            if (pos_ < s_.size() && s_[pos_] == '}') { ++pos_; return v; }
            for (;;) {
                skip_ws();
                if (pos_ >= s_.size() || s_[pos_] != '"') fail("expected a key");
                std::string key = string();
                skip_ws();
                if (pos_ >= s_.size() || s_[pos_] != ':') fail("expected ':'");
                ++pos_;
                v.object_.emplace_back(std::move(key), value(depth + 1));
                skip_ws();
                if (pos_ < s_.size() && s_[pos_] == ',') { ++pos_; continue; }
                if (pos_ < s_.size() && s_[pos_] == '}') { ++pos_; break; }
                fail("expected ',' or '}'");
            }
        } else if (c == '[') {
            v.type_ = Json::Type::Array;
            ++pos_;
            skip_ws();
            if (pos_ < s_.size() && s_[pos_] == ']') { ++pos_; return v; }
            for (;;) {
                v.array_.push_back(value(depth + 1));
                skip_ws();
                if (pos_ < s_.size() && s_[pos_] == ',') { ++pos_; continue; }
                if (pos_ < s_.size() && s_[pos_] == ']') { ++pos_; break; }
                fail("expected ',' or ']'");
            }
        } else if (c == '"') {
            v.type_ = Json::Type::String;
            v.string_ = string();
        } else if (literal("true")) {
            v.type_ = Json::Type::Bool, v.bool_ = true;
        } else if (literal("false")) {
            v.type_ = Json::Type::Bool, v.bool_ = false;
        } else if (literal("null")) {
            v.type_ = Json::Type::Null;
        } else if (literal("NaN")) {  // Python's json writes these
            v.type_ = Json::Type::Number, v.number_ = NAN;
        } else if (literal("Infinity")) {
            v.type_ = Json::Type::Number, v.number_ = INFINITY;
        } else if (literal("-Infinity")) {
            v.type_ = Json::Type::Number, v.number_ = -INFINITY;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            const char *start = s_.c_str() + pos_;
            char *end = nullptr;
            v.type_ = Json::Type::Number;
            v.number_ = std::strtod(start, &end);  // the "C" locale is assumed, as for all of the library
            if (end == start) fail("bad number");
            pos_ += static_cast<size_t>(end - start);
        } else {
            fail(std::string("unexpected character '") + c + "'");
        }
        return v;
    }

    unsigned hex4() {
        if (pos_ + 4 > s_.size()) fail("short \\u escape");
        unsigned v = 0;
        for (int i = 0; i < 4; ++i) {
            char c = s_[pos_++];
            v <<= 4;
            if (c >= '0' && c <= '9') v |= unsigned(c - '0');
            else if (c >= 'a' && c <= 'f') v |= unsigned(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v |= unsigned(c - 'A' + 10);
            else fail("bad \\u escape");
        }
        return v;
    }

    static void append_utf8(std::string &out, unsigned cp) {
        if (cp < 0x80) {
            out += char(cp);
        } else if (cp < 0x800) {
            out += char(0xC0 | (cp >> 6)), out += char(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += char(0xE0 | (cp >> 12)), out += char(0x80 | ((cp >> 6) & 0x3F)), out += char(0x80 | (cp & 0x3F));
        } else {
            out += char(0xF0 | (cp >> 18)), out += char(0x80 | ((cp >> 12) & 0x3F));
            out += char(0x80 | ((cp >> 6) & 0x3F)), out += char(0x80 | (cp & 0x3F));
        }
    }

    std::string string() {
        ++pos_;  // the opening quote
        std::string out;
        for (;;) {
            if (pos_ >= s_.size()) fail("unterminated string");
            char c = s_[pos_++];
            if (c == '"') return out;
            if (c != '\\') { out += c; continue; }
            if (pos_ >= s_.size()) fail("unterminated escape");
            char e = s_[pos_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    unsigned cp = hex4();
                    if (cp >= 0xD800 && cp < 0xDC00 && pos_ + 6 <= s_.size() && s_[pos_] == '\\' && s_[pos_ + 1] == 'u') {
                        size_t save = pos_;
                        pos_ += 2;
                        unsigned lo = hex4();
                        if (lo >= 0xDC00 && lo < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        else pos_ = save;  // a lone high surrogate; keep it as is
                    }
                    append_utf8(out, cp);
                    break;
                }
                default: fail("bad escape");
            }
        }
    }
};

Json Json::boolean(bool v) {
    Json j;
    j.type_ = Type::Bool, j.bool_ = v;
    return j;
}
Json Json::number(double v) {
    Json j;
    j.type_ = Type::Number, j.number_ = v;
    return j;
}
Json Json::string(const std::string &v) {
    Json j;
    j.type_ = Type::String, j.string_ = v;
    return j;
}

Json Json::parse(const std::string &text, const std::string &where) { return JsonParser(text, where).document(); }

Json Json::parse_file(const std::string &path) { return parse(read_file(path), path); }

static const char *type_name(Json::Type t) {
    switch (t) {
        case Json::Type::Null: return "null";
        case Json::Type::Bool: return "a boolean";
        case Json::Type::Number: return "a number";
        case Json::Type::String: return "a string";
        case Json::Type::Array: return "an array";
        default: return "an object";
    }
}

static Error wrong_type(Json::Type got, const char *want) {
    return model_error(std::string("a JSON value is ") + type_name(got) + " where " + want + " was expected");
}

bool Json::as_bool() const {
    if (type_ != Type::Bool) throw wrong_type(type_, "a boolean");
    return bool_;
}
double Json::as_number() const {
    if (type_ == Type::Bool) return bool_ ? 1.0 : 0.0;  // Python: True == 1
    if (type_ != Type::Number) throw wrong_type(type_, "a number");
    return number_;
}
long long Json::as_int() const {
    double v = as_number();
    if (!(std::floor(v) == v) || std::fabs(v) > 9.0e15) throw model_error("a JSON number " + std::to_string(v) + " is not an integer");
    return static_cast<long long>(v);
}
const std::string &Json::as_string() const {
    if (type_ != Type::String) throw wrong_type(type_, "a string");
    return string_;
}
const std::vector<Json> &Json::as_array() const {
    if (type_ != Type::Array) throw wrong_type(type_, "an array");
    return array_;
}
const std::vector<std::pair<std::string, Json>> &Json::as_object() const {
    if (type_ != Type::Object) throw wrong_type(type_, "an object");
    return object_;
}

const Json *Json::find(const std::string &key) const {
    if (type_ != Type::Object) return nullptr;
    const Json *found = nullptr;
    for (const auto &kv : object_)
        if (kv.first == key) found = &kv.second;  // the last duplicate wins, as in Python
    return found;
}

const Json &Json::at(const std::string &key) const {
    const Json *v = find(key);
    if (!v) throw model_error("a JSON object lacks the key \"" + key + "\"");
    return *v;
}

size_t Json::size() const {
    if (type_ == Type::Array) return array_.size();
    if (type_ == Type::Object) return object_.size();
    return 0;
}

bool Json::truthy() const {
    switch (type_) {
        case Type::Null: return false;
        case Type::Bool: return bool_;
        case Type::Number: return number_ != 0.0;
        case Type::String: return !string_.empty();
        case Type::Array: return !array_.empty();
        default: return !object_.empty();
    }
}

}  // namespace sdrt
