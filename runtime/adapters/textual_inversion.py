"""Textual-inversion embeddings: new rows of the runtime's token table, so they work on every backend, no re-export.

The text encoder networks take token embeddings (see sdrt.contracts), so an embedding is only a new tokenizer
token and a new table row. Formats read:
- diffusers: {token: vectors [n, hidden] or [hidden]} in .safetensors or .bin (or a folder holding
  learned_embeds.safetensors / learned_embeds.bin);
- A1111: .pt with string_to_param["*"] and name; .safetensors with emb_params (its token is the file's stem,
  as A1111 names it);
- SDXL: {"clip_l": [n, 768], "clip_g": [n, 1280]} (the refiner takes clip_g only), a row set per text encoder under
  one token (default: the file's stem), as diffusers loads it into tokenizer/text_encoder and their _2 twins.
A token with n vectors becomes the n tokens "<tok>", "<tok>_1" ... "<tok>_{n-1}", and a prompt's "<tok>" is expanded
to all of them before tokenising, as diffusers' maybe_convert_prompt does. Pickle files (.bin/.pt) load only
through torch.load(weights_only=True), and only when torch is installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdrt.errors import InputError, ModelError
from sdrt.model.weights import read_weights, to_numpy

FAMILY_BY_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL (second encoder)"}


# --- embeddings ---------------------------------------------------------------------------------------------------


def _embedding_file(path: Path) -> Path:
    if path.is_dir():  # a diffusers embedding folder (e.g. from sd-concepts-library)
        for name in ("learned_embeds.safetensors", "learned_embeds.bin"):
            if (path / name).is_file():
                return path / name
        raise ModelError(f"folder {path} holds no learned_embeds.safetensors or learned_embeds.bin; "
                         "pass the embedding file")
    return path


def read_embedding(source, token: str | None = None, width: int | None = None) -> tuple[str, np.ndarray, str]:
    """An embedding file, folder or {token: vectors} dict -> (token, float32 vectors [n, hidden], source name).

    `token` overrides the file's own placeholder. `width` (the model's token-embedding width) is checked.
    """
    if isinstance(source, dict):
        name, data = "the embedding dict", to_numpy(source)
        stem = None
    else:
        path = _embedding_file(Path(source).expanduser())
        name, stem = str(path), path.stem
        data, _ = read_weights(path, "textual-inversion embedding")
    if not isinstance(data, dict):
        if token is None:
            raise InputError(f"{name} holds a bare tensor with no token name; pass token='<name>' (CLI: FILE:<name>)")
        data = {token: data}

    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise ModelError(f"{name} is an A1111 embedding without string_to_param['*']; the file is damaged")
        file_token, vectors = data.get("name") or stem, params["*"]
    elif "emb_params" in data and len(data) == 1:  # A1111 .safetensors
        file_token, vectors = stem, data["emb_params"]
    elif {"clip_l", "clip_g"} & set(data):
        raise ModelError(f"{name} is an SDXL embedding (clip_l/clip_g); load it into an SDXL model")
    elif len(data) == 1:  # diffusers: {token: vectors}
        file_token, vectors = next(iter(data.items()))
    else:
        keys = ", ".join(list(map(str, data))[:6])
        raise ModelError(
            f"{name} is not a textual-inversion embedding sdrt knows (keys: {keys}); expected diffusers' "
            "{token: vectors} or A1111's string_to_param / emb_params"
        )
    token = token or file_token
    if not isinstance(token, str) or not token.strip() or token != token.strip():
        raise InputError(f"{name} gives the token {token!r}; pass a token without spaces, e.g. token='<my-style>'")
    vectors = np.asarray(vectors)
    if not np.issubdtype(vectors.dtype, np.floating) or vectors.ndim not in (1, 2) or vectors.size == 0:
        raise ModelError(f"{name}: the embedding has shape {vectors.shape} and dtype {vectors.dtype}; "
                         "expected float vectors [n, hidden]")
    vectors = np.ascontiguousarray(vectors.reshape(-1, vectors.shape[-1]), dtype=np.float32)
    if width is not None and vectors.shape[1] != width:
        made_for = FAMILY_BY_WIDTH.get(vectors.shape[1])
        raise ModelError(
            f"{name}: the embedding's vectors are {vectors.shape[1]} wide but this model's text encoder takes {width}"
            + (f" (it was made for {made_for})" if made_for else "")
            + "; use an embedding trained for this model's family"
        )
    if not np.all(np.isfinite(vectors)):
        raise ModelError(f"{name}: the embedding holds NaN/inf values; the file is damaged")
    return token, vectors, name


def vector_tokens(token: str, count: int) -> list[str]:
    """The tokens of an n-vector embedding, named as diffusers names them."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def add_embedding(tokenizer, table: np.ndarray, loaded: dict[str, list[str]], token: str, vectors: np.ndarray,
                  name: str) -> np.ndarray:
    """Add `token`'s vectors to the tokenizer and the token table; returns the new table. `loaded` (token -> its
    vector tokens) is updated. Nothing changes when a check fails."""
    tokens = vector_tokens(token, len(vectors))
    taken = [t for t in tokens if tokenizer.token_to_id(t) is not None]
    if taken:
        raise InputError(
            f"{name}: token {taken[0]!r} is already in the vocabulary (id {tokenizer.token_to_id(taken[0])}); pass "
            "another placeholder, e.g. token='<my-style>' (CLI: --embedding FILE:<my-style>), or unload the one loaded"
        )
    if table.shape[0] != tokenizer.vocab_size:
        raise ModelError(
            f"the token table has {table.shape[0]} rows but the tokenizer {tokenizer.vocab_size} tokens; "
            "the model folder's tokenizer and text encoder do not match"
        )
    ids = tokenizer.add_tokens(tokens)
    assert ids == list(range(table.shape[0], table.shape[0] + len(tokens))), ids
    loaded[token] = tokens
    return np.concatenate([table, vectors.astype(table.dtype)])


def remove_embedding(tokenizer, table: np.ndarray, loaded: dict[str, list[str]], token: str | None = None) -> np.ndarray:
    """Remove one loaded embedding (all of its vector tokens), or all when token is None; returns the new table."""
    if token is None:
        tokens = [t for ts in loaded.values() for t in ts]
        loaded.clear()
    else:
        if token not in loaded:
            raise InputError(f"no textual inversion {token!r} is loaded; loaded: {sorted(loaded) or 'none'}")
        tokens = loaded.pop(token)
    if not tokens:
        return table
    ids = tokenizer.remove_tokens(tokens)
    return np.delete(table, ids, axis=0)


def expand_prompt(prompt: str, tokenizer, loaded: dict[str, list[str]]) -> str:
    """Write each multi-vector token of the prompt as all of its vector tokens ("<tok>" -> "<tok> <tok>_1 ...").

    As diffusers: only tokens the tokenizer finds in the prompt are expanded, by plain text replacement.
    """
    multi = {t: ts for t, ts in loaded.items() if len(ts) > 1}
    if not multi:
        return prompt
    ids = set(tokenizer.encode(prompt))
    for token, tokens in multi.items():
        if tokenizer.token_to_id(token) in ids:
            prompt = prompt.replace(token, " ".join(tokens))
    return prompt


# SDXL's two-embedding format: the key of each text encoder's vectors.
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def read_sdxl_embedding(source, token: str | None, widths: dict[str, int]) -> tuple[str, dict[str, np.ndarray], str]:
    """An SDXL embedding (clip_l / clip_g) -> (token, {network: float32 vectors [n, width]}, source name) for the text
    encoders in `widths` ({network: its token-embedding width}); each set checked as read_embedding checks one."""
    if isinstance(source, dict):
        name, data, stem = "the embedding dict", to_numpy(source), None
    else:
        path = _embedding_file(Path(source).expanduser())
        name, stem = str(path), path.stem
        data, _ = read_weights(path, "textual-inversion embedding")
    wanted = {network: SDXL_KEYS[network] for network in widths}
    if not isinstance(data, dict) or not set(wanted.values()) <= set(data):
        keys = ", ".join(list(map(str, data))[:6]) if isinstance(data, dict) else type(data).__name__
        raise ModelError(f"{name} is not an SDXL embedding for this model: it needs {' and '.join(wanted.values())}, "
                         f"it holds {keys}")
    vectors = {}
    for network, key in wanted.items():
        placeholder = token or stem or "<sdxl-embedding>"
        token, vectors[network], _ = read_embedding({placeholder: data[key]}, placeholder, widths[network])
    counts = {len(v) for v in vectors.values()}
    if len(counts) > 1:
        raise ModelError(f"{name}: clip_l and clip_g hold different numbers of vectors; the file is damaged")
    return token, vectors, name


def add_to_encoders(pipe, token: str, vectors: dict[str, np.ndarray], name: str) -> None:
    """Add `token` with each text encoder's own vectors (SDXL): every tokenizer gets the same new tokens and ids,
    every table its rows; checked on all of them first, so a refused embedding changes nothing."""
    encoders = pipe.text_encoders
    for _, tokenizer, table in encoders:
        if table.shape[0] != tokenizer.vocab_size or tokenizer.vocab_size != encoders[0][1].vocab_size:
            raise ModelError("the tokenizers and token tables of this model do not line up; reload the model")
        taken = [t for t in vector_tokens(token, len(vectors[encoders[0][0]])) if tokenizer.token_to_id(t) is not None]
        if taken:
            raise InputError(f"{name}: token {taken[0]!r} is already in the vocabulary; pass another placeholder, "
                             "e.g. token='<my-style>', or unload the one loaded")
    tables = []
    for network, tokenizer, table in encoders:
        tables.append(add_embedding(tokenizer, table, pipe.textual_inversions, token, vectors[network], name))
    pipe.token_table = tables[0]
    pipe.more_text_encoders = [(n, t, tables[k + 1]) for k, (n, t, _) in enumerate(pipe.more_text_encoders)]


def remove_from_encoders(pipe, token: str | None) -> None:
    """Remove one embedding (or all) from every tokenizer and table (SDXL)."""
    tables, loaded = [], dict(pipe.textual_inversions)
    for _, tokenizer, table in pipe.text_encoders:
        loaded = dict(pipe.textual_inversions)
        tables.append(remove_embedding(tokenizer, table, loaded, token))
    pipe.textual_inversions.clear()
    pipe.textual_inversions.update(loaded)
    pipe.token_table = tables[0]
    pipe.more_text_encoders = [(n, t, tables[k + 1]) for k, (n, t, _) in enumerate(pipe.more_text_encoders)]
