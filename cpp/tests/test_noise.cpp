// The C++ torch CPU normal stream against the Python runtime's TorchCPUGenerator (both kernels) and, where the
// fixture has them, torch.randn itself: successive draws on one generator, sizes below, at and above 16.
#include <cmath>
#include <cstring>
#include <string>

#include "check.h"
#include "json.h"
#include "noise.h"
#include "util.h"

static bool file_ok(const std::string &p) { return sdrt::file_exists(p); }

int main(int argc, char **argv) {
    if (argc < 2) return check::skip("usage: test_noise FIXTURES_DIR");
    std::string path = std::string(argv[1]) + "/noise.json";
    if (!file_ok(path)) return check::skip("no " + path + " (the Python fixture step did not run)");
    sdrt::Json fx = sdrt::Json::parse_file(path);
    size_t values = 0, torch_values = 0, mismatched = 0, torch_mismatched = 0;
    for (const auto &c : fx.at("cases").as_array()) {
        sdrt::CpuKernel kernel = sdrt::parse_cpu_kernel(c.at("kernel").as_string());
        uint64_t seed = uint64_t(c.at("seed").as_number());  // exact for the seeds used (< 2**53, or 2**64-1)
        if (c.at("seed").as_number() >= 18446744073709551615.0) seed = ~uint64_t(0);
        sdrt::TorchCpuGenerator g(seed, kernel);
        const auto &sizes = c.at("sizes").as_array();
        for (size_t k = 0; k < sizes.size(); ++k) {
            std::vector<float> got = g.randn(size_t(sizes[k].as_int()));
            const auto &want = c.at("values").as_array()[k].as_array();
            CHECK(got.size() == want.size(), "size");
            for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
                float w = float(want[i].as_number());
                ++values;
                if (std::memcmp(&got[i], &w, 4) != 0) {
                    ++mismatched;
                    CHECK(false, "seed " + std::to_string(seed) + " kernel " + c.at("kernel").as_string() + " draw " + std::to_string(k) +
                                     " [" + std::to_string(i) + "]: c++ " + std::to_string(got[i]) + " python " + std::to_string(w));
                }
            }
            if (const sdrt::Json *t = c.find("torch")) {
                const auto &tw = t->as_array()[k].as_array();
                for (size_t i = 0; i < got.size() && i < tw.size(); ++i) {
                    float w = float(tw[i].as_number());
                    ++torch_values;
                    if (std::memcmp(&got[i], &w, 4) != 0) {
                        ++torch_mismatched;
                        CHECK(false, "vs torch: seed " + std::to_string(seed) + " draw " + std::to_string(k) + " [" + std::to_string(i) +
                                         "]: c++ " + std::to_string(got[i]) + " torch " + std::to_string(w));
                    }
                }
            }
        }
    }
    std::printf("%zu values vs the Python runtime: %zu differ; %zu vs torch.randn: %zu differ (bit for bit)\n", values, mismatched,
                torch_values, torch_mismatched);
    return check::finish("test_noise");
}
