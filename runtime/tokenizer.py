"""CLIP's BPE tokenizer on the `tokenizers` library, giving the ids of transformers' CLIPTokenizer.

Built the way transformers (5.x) builds CLIPTokenizer, which is what diffusers' StableDiffusionPipeline
loads: BPE with "</w>" word ends; NFC, whitespace runs to one space, lowercase; CLIP's regex split then
byte-level. The bos/eos/unk/pad tokens are special added tokens matched in the raw text, so with SD 2.x's
pad token "!" every "!" of a prompt becomes id 0 (as in transformers), not the BPE token "!</w>".
Prompts are wrapped in bos ... eos, cut to `max_length` and padded with the folder's pad token, as
diffusers calls the tokenizer (padding="max_length", truncation=True).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from sdrt.errors import InputError, ModelError

CLIP_CONTEXT = 77
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""



def _clip_text(text: str, limit: int = 80) -> str:
    """The start of a dropped text and its length: a warning must stay readable for a 10,000-character prompt."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"

class TruncationWarning(UserWarning):
    """A prompt was longer than the text encoder's context and lost its end."""


def _token_text(value) -> str | None:
    # special_tokens_map.json / tokenizer_config.json hold a string or an AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _clip_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], dict[int, str]] | None:
    """vocab, merges and added tokens of a CLIP tokenizer.json (transformers takes only these from it and
    builds the rest itself), or None if there is no such file or it is not CLIP's."""
    data = _read_json(path)
    model = data.get("model", {})
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>" or not isinstance(vocab, dict):
        return None
    if "<|startoftext|>" not in vocab:
        return None
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return vocab, merges, {int(t["id"]): t["content"] for t in data.get("added_tokens", [])}


def _plain_token(text: str) -> AddedToken:
    # As transformers' add_tokens: not special, matched in the normalized (lowercased) text.
    return AddedToken(text, special=False, normalized=True)


class ClipTokenizer:
    """Token ids for CLIP text encoders: `tok(prompts) -> int64 [len(prompts), max_length]`."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], bos: str = "<|startoftext|>",
                 eos: str = "<|endoftext|>", unk: str = "<|endoftext|>", pad: str = "<|endoftext|>",
                 max_length: int = CLIP_CONTEXT):
        self._vocab, self._merges = vocab, merges
        self._specials = (bos, eos, unk, pad)
        self.max_length = max_length
        self._added: list[str] = []
        self._tok = self._build()
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = (self._tok.token_to_id(t) for t in self._specials)

    @classmethod
    def from_folder(cls, path: str | Path) -> "ClipTokenizer":
        """Read a diffusers `tokenizer/` folder: tokenizer.json (if CLIP's) or vocab.json + merges.txt, plus
        tokenizer_config.json / special_tokens_map.json for the special tokens and model_max_length."""
        path = Path(path)
        loaded = _clip_tokenizer_json(path / "tokenizer.json")
        if loaded is None:
            vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
            if not (vocab_file.is_file() and merges_file.is_file()):
                raise ModelError(f"tokenizer folder {path} has neither a CLIP tokenizer.json nor "
                                 "vocab.json + merges.txt")
            loaded = (*models.BPE.read_file(str(vocab_file), str(merges_file)), {})
        vocab, merges, extra = loaded
        config = _read_json(path / "tokenizer_config.json")
        config.update({k: v for k, v in _read_json(path / "special_tokens_map.json").items() if v is not None})
        defaults = {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>", "pad": "<|endoftext|>"}
        names = {k: _token_text(config.get(f"{k}_token")) or d for k, d in defaults.items()}
        max_length = config.get("model_max_length")
        # transformers writes ~1e30 when a tokenizer has no limit; CLIP text encoders have 77 positions.
        max_length = int(max_length) if isinstance(max_length, (int, float)) and max_length <= 4096 else CLIP_CONTEXT
        tok = cls(vocab, merges, max_length=max_length, **names)
        # Tokens a saved textual inversion left in the folder (ids after the vocabulary), in id order.
        extra.update({int(i): _token_text(t) for i, t in config.get("added_tokens_decoder", {}).items()})
        extra.update({i: t for t, i in _read_json(path / "added_tokens.json").items()})
        extra = {i: t for i, t in extra.items() if i >= len(vocab) and t not in names.values()}
        if extra:
            if sorted(extra) != list(range(len(vocab), len(vocab) + len(extra))):
                raise ModelError(f"tokenizer folder {path}: added token ids {sorted(extra)} do not follow the "
                                 f"vocabulary of {len(vocab)} without gaps")
            tok.add_tokens([extra[i] for i in sorted(extra)])
        return tok

    def _build(self) -> Tokenizer:
        tok = Tokenizer(models.BPE(vocab=self._vocab, merges=self._merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="</w>", fuse_unk=False, unk_token=self._specials[2]))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        specials = list(dict.fromkeys(self._specials))  # eos, unk and pad are often one token
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        tok.add_tokens([_plain_token(t) for t in self._added])
        return tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add textual-inversion tokens; returns their ids, which follow the current vocabulary."""
        for t in tokens:
            if not isinstance(t, str) or not t:
                raise InputError(f"token {t!r} is not a non-empty string")
            if self._tok.token_to_id(t) is not None:
                raise InputError(f"token {t!r} is already in the vocabulary (id {self._tok.token_to_id(t)}); "
                                 "pick another placeholder or remove it first")
        if len(set(tokens)) != len(tokens):
            raise InputError(f"tokens {tokens!r} repeat a token")
        start = self.vocab_size
        self._tok.add_tokens([_plain_token(t) for t in tokens])
        self._added += tokens
        ids = [self._tok.token_to_id(t) for t in tokens]
        assert ids == list(range(start, start + len(tokens))), ids
        return ids

    def remove_tokens(self, tokens: list[str]) -> list[int]:
        """Remove added tokens; returns the ids they had. Added tokens after them move down to keep ids
        contiguous (as diffusers' unload_textual_inversion does): drop the same rows from the token table."""
        missing = [t for t in tokens if t not in self._added]
        if missing:
            raise InputError(f"tokens {missing!r} were not added to this tokenizer; added tokens: {self._added!r}")
        removed = sorted(self._tok.token_to_id(t) for t in set(tokens))
        self._added = [t for t in self._added if t not in set(tokens)]
        self._tok = self._build()
        return removed

    @property
    def added_tokens(self) -> list[str]:
        return list(self._added)

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, without bos/eos and not truncated."""
        return self._tok.encode(prompt, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        # transformers' CLIPTokenizer turns the "</w>" word ends back into spaces.
        return self._tok.decode(list(ids), skip_special_tokens=False).replace("</w>", " ").strip()

    def __call__(self, prompts: list[str]) -> np.ndarray:
        if isinstance(prompts, str):
            raise InputError(f"prompts must be a list of strings, got the string {prompts!r}; wrap it in a list")
        keep = self.max_length - 2
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        for row, enc in enumerate(self._tok.encode_batch(list(prompts), add_special_tokens=False)):
            ids = enc.ids
            if len(ids) > keep:
                warnings.warn(
                    f"The following part of your input was truncated because CLIP can only handle sequences up to "
                    f"{self.max_length} tokens ({len(ids) - keep} tokens dropped from prompt {row}): "
                    f"{_clip_text(self.decode(ids[keep:]))!r}", TruncationWarning, stacklevel=2)
                ids = ids[:keep]
            out[row, : len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
        return out
