// A minimal test harness for the C++ tests: CHECK counts failures and prints the first few (and gives the condition); main returns
// finish() (0 pass, 1 fail) or kSkip (77, ctest's SKIP_RETURN_CODE) when a fixture is missing - a failure instead
// when SDRT_REQUIRE_FIXTURES is set (CMake's -DSDRT_REQUIRE_FIXTURES=ON, which CI uses).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace check {

constexpr int kSkip = 77;
inline int failures = 0, checks = 0;

inline bool report(bool ok, const std::string &what, const char *file, int line) {
    ++checks;
    if (ok) return true;
    if (++failures <= 25) std::fprintf(stderr, "FAIL %s:%d: %s\n", file, line, what.c_str());
    return false;
}

inline int finish(const char *name) {
    std::printf("%s: %d checks, %d failures\n", name, checks, failures);
    return failures ? 1 : 0;
}

inline bool fixtures_required() {
    const char *v = std::getenv("SDRT_REQUIRE_FIXTURES");
    return v && *v && std::strcmp(v, "0") != 0;
}

inline int skip(const std::string &why) {
    if (fixtures_required()) {
        std::printf("FAIL (SDRT_REQUIRE_FIXTURES is set, so this cannot skip): %s\n", why.c_str());
        return 1;
    }
    std::printf("SKIP: %s\n", why.c_str());
    return kSkip;
}

}  // namespace check

#define CHECK(cond, what) ::check::report(static_cast<bool>(cond), what, __FILE__, __LINE__)
