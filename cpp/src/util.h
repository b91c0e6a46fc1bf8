// Internal helpers shared by the library's files: the one exception type (never crosses the C API) and files.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "sdrt.h"

namespace sdrt {

// Every failure inside the library is an Error with the status the C API returns and a message that names
// the bad value and the fix. api.cpp catches it (and std::bad_alloc, and anything else) at the boundary.
class Error : public std::runtime_error {
public:
    Error(sdrt_status status, const std::string &message) : std::runtime_error(message), status_(status) {}
    sdrt_status status() const { return status_; }

private:
    sdrt_status status_;
};

inline Error model_error(const std::string &m) { return Error(SDRT_ERR_MODEL, m); }
inline Error input_error(const std::string &m) { return Error(SDRT_ERR_INVALID_ARGUMENT, m); }

bool file_exists(const std::string &path);
bool is_directory(const std::string &path);
long long file_size(const std::string &path);  // -1 if absent
std::string read_file(const std::string &path);  // throws model_error naming the file
std::string join_path(const std::string &a, const std::string &b);
std::string format_number(double v);  // as Python's repr(float): the shortest text that reads back the same, "0.8"

}  // namespace sdrt
