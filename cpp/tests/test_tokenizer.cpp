// The C++ CLIP tokenizer against the Python runtime's: the same ids (unpadded and padded) on a corpus of tricky
// prompts (accents, decomposed characters, other scripts, emoji, numbers, punctuation, special tokens, long
// text) for SD 1.x and SD 2.x ("!" padding) tokenizer folders, textual-inversion tokens, and the exports' folders.
#include <dirent.h>

#include <string>
#include <vector>

#include "check.h"
#include "json.h"
#include "tokenizer.h"

static std::string show(const std::vector<long long> &v) {
    std::string s;
    for (long long x : v) s += (s.empty() ? "" : " ") + std::to_string(x);
    return s;
}

int main(int argc, char **argv) {
    if (argc < 2) return check::skip("usage: test_tokenizer FIXTURES_DIR");
    std::string dir = argv[1];
    std::vector<std::string> files;
    if (DIR *d = opendir(dir.c_str())) {
        while (dirent *e = readdir(d)) {
            std::string n = e->d_name;
            if (n.rfind("tokenizer_", 0) == 0 && n.size() > 5 && n.substr(n.size() - 5) == ".json") files.push_back(n);
        }
        closedir(d);
    }
    if (files.empty()) return check::skip("no tokenizer fixtures in " + dir + " (the Python fixture step did not run)");
    int cases = 0;
    for (const auto &f : files) {
        sdrt::Json fx = sdrt::Json::parse_file(dir + "/" + f);
        sdrt::ClipTokenizer tok = sdrt::ClipTokenizer::from_folder(fx.at("folder").as_string());
        for (const auto &c : fx.at("cases").as_array()) {
            const std::string &text = c.at("text").as_string();
            std::vector<long long> want, got, want_padded, got_padded;
            for (const auto &v : c.at("ids").as_array()) want.push_back(v.as_int());
            for (const auto &v : c.at("padded").as_array()) want_padded.push_back(v.as_int());
            for (int id : tok.encode(text)) got.push_back(id);
            for (int64_t id : tok(text)) got_padded.push_back(id);
            CHECK(got == want, f + ": \"" + text + "\"\n  python " + show(want) + "\n  c++    " + show(got));
            CHECK(got_padded == want_padded, f + ": padded ids differ for \"" + text + "\"");
            ++cases;
        }
    }
    std::printf("%d prompts over %zu tokenizer folders\n", cases, files.size());
    return check::finish("test_tokenizer");
}
