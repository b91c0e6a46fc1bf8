// Shared by api.cpp and api_v1.cpp: the message buffer every failing call fills.
#pragma once

namespace sdrt_api {

// A fixed buffer, so that recording a failure never allocates (and so never throws, out of memory included).
struct ErrorText {
    char text[2048] = "";
    void set(const char *message) noexcept;  // truncates to fit
};

}  // namespace sdrt_api
