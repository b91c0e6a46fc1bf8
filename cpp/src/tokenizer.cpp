// The CLIP tokenizer (see tokenizer.h): folder reading, the normaliser and regex split (ICU), byte-level BPE.
#include "tokenizer.h"

#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/ustring.h>

#include <algorithm>
#include <map>
#include <queue>

#include "json.h"
#include "util.h"

namespace sdrt {

namespace {

// --- UTF-8 and ICU -------------------------------------------------------------------------------------------

std::vector<UChar32> decode_utf8(const std::string &s) {
    std::vector<UChar32> out;
    icu::UnicodeString u = icu::UnicodeString::fromUTF8(s);  // invalid bytes become U+FFFD
    for (int32_t i = 0; i < u.length();) {
        UChar32 c = u.char32At(i);
        out.push_back(c);
        i += U16_LENGTH(c);
    }
    return out;
}

void append_utf8(std::string &out, UChar32 c) {
    icu::UnicodeString u(c);
    u.toUTF8String(out);
}

bool is_space(UChar32 c) { return u_isUWhiteSpace(c); }                  // oniguruma's \s: White_Space
bool is_letter(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_L_MASK) != 0; }  // \p{L}
bool is_number(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_N_MASK) != 0; }  // \p{N}

// CLIP's split regex, `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`,
// as a backtracking engine runs it: at the leftmost position where anything matches, the first alternative that
// matches wins. Only whitespace matches nothing, and is dropped ("removed", inverted Split).
std::vector<std::u32string> clip_split(const std::vector<UChar32> &t) {
    static const char *literals[] = {"<|startoftext|>", "<|endoftext|>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"};
    std::vector<std::u32string> pieces;
    size_t i = 0, n = t.size();
    while (i < n) {
        UChar32 c = t[i];
        if (is_space(c)) { ++i; continue; }
        size_t len = 0;
        for (const char *lit : literals) {
            size_t k = 0;
            while (lit[k] && i + k < n && t[i + k] == UChar32(static_cast<unsigned char>(lit[k]))) ++k;
            if (!lit[k]) { len = k; break; }
        }
        if (!len) {
            if (is_letter(c)) {
                while (i + len < n && is_letter(t[i + len])) ++len;
            } else if (is_number(c)) {
                len = 1;
            } else {
                while (i + len < n && !is_space(t[i + len]) && !is_letter(t[i + len]) && !is_number(t[i + len])) ++len;
            }
        }
        pieces.emplace_back(t.begin() + long(i), t.begin() + long(i + len));
        i += len;
    }
    return pieces;
}

// GPT-2's byte-level regex inside one CLIP piece. It splits a piece differently only for the two literal special
// strings (reached when written in another case): "<|", "endoftext", "|>".
std::vector<std::u32string> byte_level_split(const std::u32string &piece) {
    if (piece == U"<|startoftext|>") return {U"<|", U"startoftext", U"|>"};
    if (piece == U"<|endoftext|>") return {U"<|", U"endoftext", U"|>"};
    return {piece};
}

std::string to_utf8(const std::u32string &s) {
    std::string out;
    for (char32_t c : s) append_utf8(out, UChar32(c));
    return out;
}

// Leftmost-longest split of `text` on `tokens`: (piece, -1) for text between matches, (token, id) for matches.
std::vector<std::pair<std::string, int>> split_on(const std::string &text, const std::vector<std::pair<std::string, int>> &tokens) {
    std::vector<std::pair<std::string, int>> out;
    size_t start = 0, i = 0;
    while (i < text.size()) {
        size_t best = 0;
        int id = -1;
        for (const auto &t : tokens)
            if (t.first.size() > best && text.compare(i, t.first.size(), t.first) == 0) best = t.first.size(), id = t.second;
        if (!best) { ++i; continue; }
        if (i > start) out.emplace_back(text.substr(start, i - start), -1);
        out.emplace_back(text.substr(i, best), id);
        i += best;
        start = i;
    }
    if (start < text.size()) out.emplace_back(text.substr(start), -1);
    return out;
}

std::string token_text(const Json *v) {  // a string, or an AddedToken dict {"content": ...}
    if (!v) return "";
    if (v->is_string()) return v->as_string();
    if (v->is_object() && v->find("content") && v->at("content").is_string()) return v->at("content").as_string();
    return "";
}

Json read_json_if_any(const std::string &path) { return file_exists(path) ? Json::parse_file(path) : Json(); }

}  // namespace

std::string clip_normalize(const std::string &text) {
    UErrorCode err = U_ZERO_ERROR;
    const icu::Normalizer2 *nfc = icu::Normalizer2::getNFCInstance(err);
    if (U_FAILURE(err)) throw Error(SDRT_ERR_INTERNAL, std::string("ICU's NFC normaliser is unavailable: ") + u_errorName(err));
    icu::UnicodeString u = nfc->normalize(icu::UnicodeString::fromUTF8(text), err);
    if (U_FAILURE(err)) throw Error(SDRT_ERR_INTERNAL, std::string("NFC normalisation failed: ") + u_errorName(err));
    std::string out;
    bool in_space = false;
    for (int32_t i = 0; i < u.length();) {
        UChar32 c = u.char32At(i);
        i += U16_LENGTH(c);
        if (is_space(c)) {
            if (!in_space) out += ' ';
            in_space = true;
            continue;
        }
        in_space = false;
        UChar src[2], dst[8];
        int32_t len = 0;
        U16_APPEND_UNSAFE(src, len, c);
        UErrorCode e = U_ZERO_ERROR;  // one character at a time, as Rust's char::to_lowercase (no final-sigma context)
        int32_t n = u_strToLower(dst, 8, src, len, "", &e);
        if (U_FAILURE(e)) {
            append_utf8(out, c);
            continue;
        }
        icu::UnicodeString(dst, n).toUTF8String(out);
    }
    return out;
}

int ClipTokenizer::id_of(const std::string &token) const {
    for (const auto &s : specials_)
        if (s.first == token) return s.second;
    auto it = vocab_.find(token);
    return it == vocab_.end() ? -1 : it->second;
}

ClipTokenizer ClipTokenizer::from_folder(const std::string &folder) {
    ClipTokenizer tok;
    std::vector<std::pair<std::string, std::string>> merges;
    std::map<long long, std::string> extra;
    bool loaded = false;
    Json tj = read_json_if_any(join_path(folder, "tokenizer.json"));
    if (const Json *model = tj.find("model")) {
        const Json *type = model->find("type"), *suffix = model->find("end_of_word_suffix"), *vocab = model->find("vocab");
        if (type && type->is_string() && type->as_string() == "BPE" && suffix && suffix->is_string() &&
            suffix->as_string() == "</w>" && vocab && vocab->is_object() && vocab->find("<|startoftext|>")) {
            for (const auto &kv : vocab->as_object()) tok.vocab_[kv.first] = int(kv.second.as_int());
            if (const Json *m = model->find("merges"))
                for (const auto &e : m->as_array()) {
                    if (e.is_string()) {
                        const std::string &s = e.as_string();
                        size_t sp = s.find(' ');
                        merges.emplace_back(s.substr(0, sp), sp == std::string::npos ? "" : s.substr(sp + 1));
                    } else if (e.is_array() && e.size() == 2) {
                        merges.emplace_back(e.as_array()[0].as_string(), e.as_array()[1].as_string());
                    }
                }
            if (const Json *at = tj.find("added_tokens"); at && at->is_array())
                for (const auto &t : at->as_array()) extra[t.at("id").as_int()] = t.at("content").as_string();
            loaded = true;
        }
    }
    if (!loaded) {
        std::string vf = join_path(folder, "vocab.json"), mf = join_path(folder, "merges.txt");
        if (!file_exists(vf) || !file_exists(mf))
            throw model_error("tokenizer folder " + folder + " has neither a CLIP tokenizer.json nor vocab.json + merges.txt");
        Json vocab = Json::parse_file(vf);
        for (const auto &kv : vocab.as_object()) tok.vocab_[kv.first] = int(kv.second.as_int());
        std::string text = read_file(mf);
        size_t pos = 0;
        while (pos < text.size()) {
            size_t end = text.find('\n', pos);
            if (end == std::string::npos) end = text.size();
            std::string line = text.substr(pos, end - pos);
            pos = end + 1;
            if (!line.empty() && line.back() == '\r') line.pop_back();
            if (line.rfind("#version", 0) == 0 || line.empty()) continue;
            size_t sp = line.find(' ');
            if (sp == std::string::npos) throw model_error(mf + " has a line without a space: \"" + line + "\"");
            merges.emplace_back(line.substr(0, sp), line.substr(sp + 1));
        }
    }
    int rank = 0;
    for (const auto &m : merges) {
        auto a = tok.vocab_.find(m.first), b = tok.vocab_.find(m.second), ab = tok.vocab_.find(m.first + m.second);
        if (a == tok.vocab_.end() || b == tok.vocab_.end() || ab == tok.vocab_.end())
            throw model_error("tokenizer folder " + folder + ": merge \"" + m.first + " " + m.second + "\" uses tokens missing from the vocabulary");
        tok.merges_[(uint64_t(uint32_t(a->second)) << 32) | uint32_t(b->second)] = {rank++, ab->second};
    }
    tok.vocab_size_ = int(tok.vocab_.size());

    // Special tokens, as runtime/tokenizer.py reads them; unknown ones get ids after the vocabulary.
    Json config = read_json_if_any(join_path(folder, "tokenizer_config.json"));
    Json smap = read_json_if_any(join_path(folder, "special_tokens_map.json"));
    const char *keys[4] = {"bos_token", "eos_token", "unk_token", "pad_token"};
    const char *defaults[4] = {"<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"};
    std::string names[4];
    for (int k = 0; k < 4; ++k) {
        const Json *v = smap.find(keys[k]);
        if (!v || v->is_null()) v = config.find(keys[k]);
        names[k] = token_text(v);
        if (names[k].empty()) names[k] = defaults[k];
    }
    int *ids[4] = {&tok.bos_id_, &tok.eos_id_, &tok.unk_id_, &tok.pad_id_};
    for (int k = 0; k < 4; ++k) {
        int id = tok.id_of(names[k]);
        if (id < 0) id = tok.vocab_size_++;
        bool seen = false;
        for (const auto &s : tok.specials_) seen = seen || s.first == names[k];
        if (!seen) tok.specials_.emplace_back(names[k], id);
        *ids[k] = id;
    }
    if (const Json *ml = config.find("model_max_length"); ml && ml->is_number() && ml->as_number() <= 4096)
        tok.max_length_ = int(ml->as_number());

    // Textual-inversion tokens left in the folder, ids after the vocabulary without gaps.
    if (const Json *dec = config.find("added_tokens_decoder"); dec && dec->is_object())
        for (const auto &kv : dec->as_object()) extra[std::stoll(kv.first)] = token_text(&kv.second);
    Json added_json = read_json_if_any(join_path(folder, "added_tokens.json"));
    if (added_json.is_object())
        for (const auto &kv : added_json.as_object()) extra[kv.second.as_int()] = kv.first;
    long long expect = static_cast<long long>(tok.vocab_.size());
    for (const auto &kv : extra) {
        if (kv.first < static_cast<long long>(tok.vocab_.size()) || kv.second.empty() ||
            std::find(names, names + 4, kv.second) != names + 4)
            continue;
        if (kv.first != expect++)
            throw model_error("tokenizer folder " + folder + ": added token ids do not follow the vocabulary without gaps");
        tok.added_.emplace_back(clip_normalize(kv.second), tok.vocab_size_++);
    }
    if (tok.max_length_ < 2) throw model_error("tokenizer folder " + folder + ": model_max_length must be at least 2");
    // GPT-2's bytes_to_unicode: printable latin-1 bytes map to themselves, the rest to U+0100 upwards.
    int n = 0;
    for (int b = 0; b < 256; ++b) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        tok.byte_chars_[b].clear();
        append_utf8(tok.byte_chars_[b], printable ? b : 256 + n++);
    }
    return tok;
}

// tokenizers' Word::merge_all: a min-heap of (rank, position), stale entries skipped.
void ClipTokenizer::bpe(const std::string &piece, std::vector<int> &out) const {
    struct Sym { int id; long prev, next; bool alive; };
    std::vector<Sym> syms;
    std::vector<std::string> chars;
    for (unsigned char b : piece) chars.push_back(byte_chars_[b]);
    for (size_t i = 0; i < chars.size(); ++i) {
        std::string s = chars[i] + (i + 1 == chars.size() ? "</w>" : "");
        auto it = vocab_.find(s);
        int id = it == vocab_.end() ? unk_id_ : it->second;
        syms.push_back({id, long(i) - 1, i + 1 < chars.size() ? long(i + 1) : -1, true});
    }
    struct Merge { int rank; long pos; int new_id; };
    auto later = [](const Merge &a, const Merge &b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; };
    std::priority_queue<Merge, std::vector<Merge>, decltype(later)> queue(later);
    auto lookup = [&](int a, int b) -> const std::pair<int, int> * {
        auto it = merges_.find((uint64_t(uint32_t(a)) << 32) | uint32_t(b));
        return it == merges_.end() ? nullptr : &it->second;
    };
    for (size_t i = 0; i + 1 < syms.size(); ++i)
        if (auto m = lookup(syms[i].id, syms[i + 1].id)) queue.push({m->first, long(i), m->second});
    while (!queue.empty()) {
        Merge top = queue.top();
        queue.pop();
        Sym &cur = syms[size_t(top.pos)];
        if (!cur.alive || cur.next < 0) continue;
        Sym &right = syms[size_t(cur.next)];
        auto m = lookup(cur.id, right.id);
        if (!m || m->second != top.new_id) continue;  // an expired entry
        cur.id = top.new_id;
        right.alive = false;
        cur.next = right.next;
        if (cur.next >= 0) syms[size_t(cur.next)].prev = top.pos;
        if (cur.prev >= 0)
            if (auto p = lookup(syms[size_t(cur.prev)].id, cur.id)) queue.push({p->first, cur.prev, p->second});
        if (cur.next >= 0)
            if (auto nx = lookup(cur.id, syms[size_t(cur.next)].id)) queue.push({nx->first, top.pos, nx->second});
    }
    for (const auto &s : syms)
        if (s.alive) out.push_back(s.id);
}

void ClipTokenizer::encode_normalized(const std::string &text, std::vector<int> &out) const {
    for (const auto &part : split_on(text, added_)) {
        if (part.second >= 0) {
            out.push_back(part.second);
            continue;
        }
        for (const auto &piece : clip_split(decode_utf8(part.first)))
            for (const auto &word : byte_level_split(piece)) bpe(to_utf8(word), out);
    }
}

std::vector<int> ClipTokenizer::encode(const std::string &text) const {
    std::vector<int> out;
    for (const auto &part : split_on(text, specials_)) {
        if (part.second >= 0) out.push_back(part.second);
        else encode_normalized(clip_normalize(part.first), out);
    }
    return out;
}

std::vector<int64_t> ClipTokenizer::operator()(const std::string &text, bool *truncated) const {
    std::vector<int> ids = encode(text);
    size_t keep = size_t(max_length_ - 2);
    if (truncated) *truncated = ids.size() > keep;
    if (ids.size() > keep) ids.resize(keep);
    std::vector<int64_t> row(size_t(max_length_), pad_id_);
    row[0] = bos_id_;
    for (size_t i = 0; i < ids.size(); ++i) row[i + 1] = ids[i];
    row[ids.size() + 1] = eos_id_;
    return row;
}

}  // namespace sdrt
