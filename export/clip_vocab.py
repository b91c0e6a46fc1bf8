"""The real CLIP tokenizer files, built offline from the BPE merges that the `openai-clip` package ships.

No model hub is reachable here; `openai-clip` (a small sdist) carries `bpe_simple_vocab_16e6.txt.gz`.
Building vocab.json and merges.txt from it follows OpenAI's SimpleTokenizer, which gives the ids of
openai/clip-vit-large-patch14's tokenizer.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

VOCAB_SIZE = 49408


def _bpe_path() -> Path:
    # Never `import clip`: its __init__ imports torchvision.
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the CLIP vocabulary comes from the `openai-clip` package: pip install openai-clip==1.0.1")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> Path:
    """Write a diffusers-style `tokenizer/` folder (vocab.json, merges.txt, configs) for CLIPTokenizer.

    pad_token "<|endoftext|>" is SD 1.x's; SD 2.x pads with "!" (id 0).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = dict(specials, tokenizer_class="CLIPTokenizer", model_max_length=model_max_length, do_lower_case=True,
                  errors="replace", add_prefix_space=False, clean_up_tokenization_spaces=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder
