"""Where images go and how they are written: checked before any work, written atomically.

`output_paths` resolves `-o` before the pipeline loads (an unwritable or odd path fails first, not after a
long generation); `save_image` writes PNG, JPEG or WebP by the suffix, with the parameters embedded, through a
temporary name in the same folder and a rename, so no half-written file is ever left. A server reuses both.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdrt.errors import InputError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # the Exif sub-IFD and its UserComment tag, where A1111 puts `parameters`
NUMBERED = re.compile(r"^(\d{5})-")


def _writable_folder(folder: Path, output: str) -> None:
    """The nearest existing ancestor must be a folder we can create files in (probed: access() lies for root)."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"output {output!r}: {probe} is a file, not a folder; choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".sdrt-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise InputError(f"output {output!r}: cannot write in {probe} ({err.strerror or err}); choose a writable folder") from None


def output_paths(output, count: int, prefix: str = "sdrt") -> list[Path]:
    """The files `count` images go to. A folder (existing, or ending in /) gets numbered files PREFIX-NNNNN.png
    after the highest there; a file name gets -1, -2... with several images; no suffix means .png; a suffix
    that is not .png/.jpg/.jpeg/.webp is refused."""
    if not isinstance(output, (str, os.PathLike)) or not str(output).strip():
        raise InputError(f"output {output!r} is empty; pass a file such as out.png, or a folder")
    text = str(output)
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        _writable_folder(path, text)
        taken = [int(m.group(1)) for p in (path.iterdir() if path.is_dir() else ()) if (m := NUMBERED.match(p.name))]
        start = max(taken, default=0) + 1
        return [path / f"{start + k:05d}-{prefix}.png" for k in range(count)]
    if path.suffix.lower() not in FORMATS:
        if path.suffix and not path.suffix[1:].isdigit():
            raise InputError(f"output {text!r} has suffix {path.suffix!r}, not an image type sdrt writes; use .png, .jpg or .webp")
        path = path.with_name(path.name + ".png")
    _writable_folder(path.parent, text)
    paths = [path] if count == 1 else [path.with_name(f"{path.stem}-{k + 1}{path.suffix}") for k in range(count)]
    for p in paths:
        if p.is_dir():
            raise InputError(f"output {p} is a folder; pass a file name, or the folder itself to number files in it")
    return paths


def _exif_with_comment(text: str) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")  # as A1111 (piexif) writes it
    return exif


def save_image(image: Image.Image, path: str | Path, params: dict | None = None, parameters_text: str | None = None) -> Path:
    """Write by suffix (PNG text chunks; JPEG/WebP: EXIF UserComment), through a temporary file and a rename."""
    from sdrt.images import a1111_parameters

    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path} has suffix {path.suffix!r}, not an image type sdrt writes; use .png, .jpg or .webp")
    text = parameters_text if parameters_text is not None else (a1111_parameters(params) if params else None)
    options: dict = {}
    if fmt == "PNG" and (text or params):
        info = PngImagePlugin.PngInfo()
        if text:
            info.add_text("parameters", text)
        if params:
            info.add_text("sdrt", json.dumps(params, sort_keys=True))
        options["pnginfo"] = info
    elif text:
        options["exif"] = _exif_with_comment(text)
    if fmt == "JPEG":
        options["quality"] = 95
        image = image.convert("RGB")
    elif fmt == "WEBP":
        options["quality"] = 95
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **options)
        chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def chmod_default(path) -> None:
    """Give a file made by mkstemp (0600) the permissions an ordinary new file gets under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_parameters(path: str | Path) -> str | None:
    """The A1111 `parameters` text of an image sdrt wrote (PNG text, or EXIF UserComment)."""
    with Image.open(path) as image:
        if "parameters" in image.info:
            return image.info["parameters"]
        raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if isinstance(raw, bytes) and raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be")
    return raw
