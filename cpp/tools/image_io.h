// Image files for the sdrt host and tests: PNG writing (zlib, with text metadata) and PNG / PPM reading.
// PNG reading covers 8-bit non-interlaced grey, grey+alpha, RGB, RGBA and palette images; alpha is composited
// on white, as the Python runtime does.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace sdrt_tools {

struct Rgb {
    int width = 0, height = 0;
    std::vector<uint8_t> data;  // height * width * 3
};

// Returns "" on success, else the reason.
std::string write_png(const std::string &path, const uint8_t *rgb, int width, int height,
                      const std::vector<std::pair<std::string, std::string>> &text = {});
std::string read_image(const std::string &path, Rgb &out);  // .png or .ppm (P6, maxval 255), by content

}  // namespace sdrt_tools
