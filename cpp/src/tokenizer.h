// CLIP's BPE tokenizer, giving the ids of the Python runtime's ClipTokenizer (runtime/tokenizer.py, built on the
// `tokenizers` library the way transformers builds CLIPTokenizer) for any UTF-8 text.
//
// Steps, as `tokenizers` runs them: special tokens (bos/eos/unk/pad, e.g. SD 2.x's pad "!") are matched in the
// raw text first, leftmost-longest, and become their ids; every other stretch is normalised (NFC, whitespace
// runs to one space, per-character full lower-casing), then split with CLIP's regex (and GPT-2's byte-level
// regex inside each piece), mapped byte to unicode, and merged by BPE with "</w>" word ends. Unicode data
// (NFC, case mapping, the \p{L} \p{N} \s classes) comes from ICU.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sdrt {

class ClipTokenizer {
public:
    // Reads a diffusers `tokenizer/` folder: tokenizer.json (if CLIP's) or vocab.json + merges.txt, plus
    // tokenizer_config.json / special_tokens_map.json for the special tokens and model_max_length, and added
    // (textual-inversion) tokens. Throws Error(SDRT_ERR_MODEL) naming what is missing.
    static ClipTokenizer from_folder(const std::string &folder);

    std::vector<int> encode(const std::string &text) const;     // ids without bos/eos, not truncated
    std::vector<int64_t> operator()(const std::string &text, bool *truncated = nullptr) const;  // [max_length], bos..eos, padded

    int max_length() const { return max_length_; }
    int bos_id() const { return bos_id_; }
    int eos_id() const { return eos_id_; }
    int pad_id() const { return pad_id_; }
    int vocab_size() const { return vocab_size_; }

private:
    std::unordered_map<std::string, int> vocab_;
    std::unordered_map<uint64_t, std::pair<int, int>> merges_;  // (left id, right id) -> (rank, merged id)
    std::vector<std::pair<std::string, int>> specials_;  // matched in the raw text
    std::vector<std::pair<std::string, int>> added_;     // plain added tokens, matched in the normalised text
    std::string byte_chars_[256];  // GPT-2's byte -> unicode map, as UTF-8
    int bos_id_ = 0, eos_id_ = 0, unk_id_ = 0, pad_id_ = 0, max_length_ = 77, vocab_size_ = 0;

    void bpe(const std::string &piece, std::vector<int> &out) const;
    void encode_normalized(const std::string &text, std::vector<int> &out) const;
    int id_of(const std::string &token) const;
};

// The tokenizer's normaliser alone (NFC, whitespace runs -> " ", lowercase), exposed for tests.
std::string clip_normalize(const std::string &text);

}  // namespace sdrt
