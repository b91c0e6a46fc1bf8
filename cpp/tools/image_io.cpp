// PNG and PPM files (see image_io.h). PNG compression is zlib's; chunk CRCs are zlib's crc32.
#include "image_io.h"

#include <sys/stat.h>
#include <zlib.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <cstring>
#include <fstream>
#include <sstream>

namespace sdrt_tools {

namespace {

constexpr size_t kMaxPixels = size_t(1) << 26;  // 8192 x 8192: past any model's size, short of a memory blow-up

void put32(std::string &s, uint32_t v) {
    for (int i = 3; i >= 0; --i) s += char((v >> (8 * i)) & 0xFF);
}

uint32_t get32(const std::string &s, size_t at) {
    return uint32_t(uint8_t(s[at])) << 24 | uint32_t(uint8_t(s[at + 1])) << 16 | uint32_t(uint8_t(s[at + 2])) << 8 | uint8_t(s[at + 3]);
}

void chunk(std::string &png, const char *type, const std::string &data) {
    put32(png, uint32_t(data.size()));
    std::string body = std::string(type, 4) + data;
    png += body;
    put32(png, uint32_t(crc32(0, reinterpret_cast<const Bytef *>(body.data()), uInt(body.size()))));
}

int paeth(int a, int b, int c) {
    int p = a + b - c, pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
    return (pa <= pb && pa <= pc) ? a : (pb <= pc ? b : c);
}

std::string read_ppm(const std::string &bytes, Rgb &out) {
    std::istringstream in(bytes);
    std::string magic;
    int w = 0, h = 0, maxval = 0;
    in >> magic;
    auto next_int = [&](int &v) {
        in >> std::ws;
        while (in.peek() == '#') {
            std::string comment;
            std::getline(in, comment);
            in >> std::ws;
        }
        in >> v;
    };
    next_int(w), next_int(h), next_int(maxval);
    if (magic != "P6" || !in || w < 1 || h < 1 || maxval != 255) return "not a binary PPM (P6) with maxval 255";
    if (size_t(w) * size_t(h) > kMaxPixels) return "the image is " + std::to_string(w) + "x" + std::to_string(h) + "; at most 2^26 pixels are read";
    in.get();
    const std::streamoff pos = in ? std::streamoff(in.tellg()) : -1;
    size_t n = size_t(w) * size_t(h) * 3, at = size_t(pos);
    if (pos < 0 || bytes.size() < at || bytes.size() - at < n) return "the PPM's pixel data is truncated";
    out.width = w, out.height = h;
    out.data.assign(bytes.begin() + long(at), bytes.begin() + long(at + n));
    return "";
}

std::string read_png(const std::string &s, Rgb &out) {
    size_t at = 8;
    int w = 0, h = 0, depth = 0, ctype = -1, interlace = 0;
    std::string idat, palette, trns;
    while (at + 12 <= s.size()) {
        uint32_t len = get32(s, at);
        if (at + 12 + len > s.size()) return "a PNG chunk runs past the end of the file";
        std::string type = s.substr(at + 4, 4), data = s.substr(at + 8, len);
        at += 12 + len;
        if (type == "IHDR" && len >= 13) {
            w = int(get32(data, 0)), h = int(get32(data, 4));
            depth = uint8_t(data[8]), ctype = uint8_t(data[9]), interlace = uint8_t(data[12]);
        } else if (type == "PLTE") {
            palette = data;
        } else if (type == "tRNS") {
            trns = data;
        } else if (type == "IDAT") {
            idat += data;
        } else if (type == "IEND") {
            break;
        }
    }
    const int channels = ctype == 0 ? 1 : ctype == 2 ? 3 : ctype == 3 ? 1 : ctype == 4 ? 2 : ctype == 6 ? 4 : 0;
    if (w < 1 || h < 1 || w > 65536 || h > 65536 || !channels) return "not a PNG this reader knows (bad IHDR)";
    if (depth != 8 || interlace) return "only 8-bit, non-interlaced PNGs are read; convert the image first";
    if (size_t(w) * size_t(h) > kMaxPixels) return "the image is " + std::to_string(w) + "x" + std::to_string(h) + "; at most 2^26 pixels are read";
    const size_t stride = size_t(w) * size_t(channels);
    std::vector<uint8_t> raw((stride + 1) * size_t(h));
    uLongf raw_len = uLongf(raw.size());
    if (uncompress(raw.data(), &raw_len, reinterpret_cast<const Bytef *>(idat.data()), uLong(idat.size())) != Z_OK || raw_len != raw.size())
        return "the PNG's image data is damaged";
    std::vector<uint8_t> px(stride * size_t(h));
    for (size_t y = 0; y < size_t(h); ++y) {
        const uint8_t filter = raw[y * (stride + 1)];
        const uint8_t *line = &raw[y * (stride + 1) + 1];
        uint8_t *cur = &px[y * stride];
        const uint8_t *up = y ? &px[(y - 1) * stride] : nullptr;
        for (size_t x = 0; x < stride; ++x) {
            int a = x >= size_t(channels) ? cur[x - size_t(channels)] : 0, b = up ? up[x] : 0;
            int c = (up && x >= size_t(channels)) ? up[x - size_t(channels)] : 0, v = line[x];
            switch (filter) {
                case 0: break;
                case 1: v += a; break;
                case 2: v += b; break;
                case 3: v += (a + b) / 2; break;
                case 4: v += paeth(a, b, c); break;
                default: return "the PNG has an unknown row filter";
            }
            cur[x] = uint8_t(v);
        }
    }
    out.width = w, out.height = h;
    out.data.resize(size_t(w) * size_t(h) * 3);
    for (size_t p = 0; p < size_t(w) * size_t(h); ++p) {
        const uint8_t *q = &px[p * size_t(channels)];
        int rgb[3], alpha = 255;
        if (ctype == 3) {
            if (size_t(q[0]) * 3 + 2 >= palette.size()) return "a PNG palette index is out of range";
            for (int c = 0; c < 3; ++c) rgb[c] = uint8_t(palette[size_t(q[0]) * 3 + size_t(c)]);
            if (q[0] < trns.size()) alpha = uint8_t(trns[q[0]]);
        } else if (channels <= 2) {
            rgb[0] = rgb[1] = rgb[2] = q[0];
            if (channels == 2) alpha = q[1];
        } else {
            rgb[0] = q[0], rgb[1] = q[1], rgb[2] = q[2];
            if (channels == 4) alpha = q[3];
        }
        for (int c = 0; c < 3; ++c) out.data[p * 3 + size_t(c)] = uint8_t((rgb[c] * alpha + 255 * (255 - alpha) + 127) / 255);
    }
    return "";
}

}  // namespace

std::string write_png(const std::string &path, const uint8_t *rgb, int width, int height,
                      const std::vector<std::pair<std::string, std::string>> &text) {
    const size_t stride = size_t(width) * 3;
    std::string raw;
    raw.reserve((stride + 1) * size_t(height));
    for (int y = 0; y < height; ++y) {
        raw += '\0';  // filter: none
        raw.append(reinterpret_cast<const char *>(rgb + size_t(y) * stride), stride);
    }
    uLongf zlen = compressBound(uLong(raw.size()));
    std::string z(zlen, '\0');
    if (compress2(reinterpret_cast<Bytef *>(&z[0]), &zlen, reinterpret_cast<const Bytef *>(raw.data()), uLong(raw.size()), 6) != Z_OK)
        return "zlib could not compress the image";
    z.resize(zlen);
    std::string png = "\x89PNG\r\n\x1a\n", ihdr;
    put32(ihdr, uint32_t(width)), put32(ihdr, uint32_t(height));
    ihdr += std::string("\x08\x02\x00\x00\x00", 5);  // 8-bit RGB, deflate, no filter method, no interlace
    chunk(png, "IHDR", ihdr);
    for (const auto &kv : text)  // iTXt: UTF-8, uncompressed
        chunk(png, "iTXt", kv.first + std::string("\0\0\0\0\0", 5) + kv.second);
    chunk(png, "IDAT", z);
    chunk(png, "IEND", "");
    std::string tmp = path + ".tmp";
    FILE *f = std::fopen(tmp.c_str(), "wb");
    if (!f) return "cannot write " + tmp;
    bool ok = std::fwrite(png.data(), 1, png.size(), f) == png.size();
    ok = std::fclose(f) == 0 && ok;
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        return "cannot write " + path;
    }
    return "";
}

std::string read_image(const std::string &path, Rgb &out) {
    // stat first and C stdio after: an ifstream on a folder opens, then throws from inside its first read.
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) return path + " does not exist; pass a PNG or binary PPM file";
    if (S_ISDIR(st.st_mode)) return path + " is a folder; pass a PNG or binary PPM file";
    if (!S_ISREG(st.st_mode)) return path + " is not a regular file; pass a PNG or binary PPM file";
    if (st.st_size > (off_t(1) << 30)) return path + " is over 1 GiB; pass a smaller image";
    FILE *f = std::fopen(path.c_str(), "rb");
    if (!f) return path + " cannot be opened (" + std::strerror(errno) + ")";
    std::string bytes(size_t(st.st_size), '\0');
    size_t got = bytes.empty() ? 0 : std::fread(&bytes[0], 1, bytes.size(), f);
    std::fclose(f);
    if (got != bytes.size()) return path + " could not be read whole";
    std::string err;
    if (bytes.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0) err = read_png(bytes, out);
    else if (bytes.compare(0, 2, "P6") == 0) err = read_ppm(bytes, out);
    else err = "not a PNG or binary PPM";
    return err.empty() ? "" : path + ": " + err;
}

}  // namespace sdrt_tools
