"""The LoRAs a server offers: the .safetensors files under `sdrt serve --lora-dir DIR`, by name.

A request names LoRAs (A1111's `<lora:NAME:SCALE>` in the prompt, or the `loras` field of the OpenAI and jobs
routes); each name is looked up in this folder's index, never joined to a path, so no request reaches a file
outside it. A file's name is its stem (`style.safetensors` -> `style`, subfolders included, as A1111 names them);
its alias is the `ss_output_name` of its metadata (kohya's trainer writes it), else the name; a request may use
either. A file is registered with a model's pipeline on first use (`Pipeline.register_lora`: its factors are read
once and kept) and switched per call from then on; the plan's batch key carries the set, so requests batch with
others of the same set only. Files added later are found (a miss rescans the folder); a file changed in place (its
mtime or size) is read again on its next request, and takes effect from the next batch (a re-registration never
switches the factors of a batch that is running: sdrt.adapters.lora_switch.register). Each model keeps at most
`max_registered` LoRAs registered: beyond that the least recently requested one not in use (active, queued or
running, or named by this request) is unregistered, and read again if asked for later. Only exports with LoRA slots
(and the PyTorch backend) take run-time LoRAs.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import weakref
from pathlib import Path

from sdrt.errors import InputError, SdrtError
from sdrt.serve.schemas import FieldError

log = logging.getLogger("sdrt.serve")

MAX_LORAS = 16  # LoRAs in one request
MAX_REGISTERED = 64  # LoRAs kept registered per model (their factors: ~27 MB each for a rank-16 SD 1.5 LoRA, fp32)


@dataclasses.dataclass(frozen=True)
class LoraFile:
    name: str
    alias: str
    path: Path
    relative: str  # the path inside the LoRA folder (what /sdapi/v1/loras shows: the server's own layout stays private)
    metadata: dict


def read_metadata(path: Path) -> dict:
    """A .safetensors file's `__metadata__` (values JSON-decoded where kohya stored JSON text, as A1111 shows them)."""
    import json

    from sdrt.model.weights import _read_header

    try:
        with open(path, "rb") as f:
            metadata = _read_header(f).get("__metadata__") or {}
    except (OSError, ValueError) as err:
        log.warning("LoRA %s: unreadable header (%s); listed without metadata", path, err)
        return {}
    out = {}
    for key, value in metadata.items():
        if isinstance(value, str) and value[:1] in "{[":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


def check_name(name, field) -> str:
    """A request's LoRA name: text naming a file of the index, never a path."""
    if not isinstance(name, str) or not name.strip():
        raise FieldError(field, f"LoRA name {name!r} must be a non-empty name from GET /sdapi/v1/loras")
    if any(c in name for c in "/\\\0") or name.strip() in (".", ".."):
        raise FieldError(field, f"LoRA name {name!r} must be a bare name (no path); see GET /sdapi/v1/loras")
    return name.strip()


class LoraLibrary:
    """The index of a LoRA folder (None: the server serves no LoRAs) and the registration of its files with pipelines."""

    def __init__(self, folder: str | Path | None, max_registered: int = MAX_REGISTERED):
        if isinstance(max_registered, bool) or not isinstance(max_registered, int) or max_registered < MAX_LORAS:
            raise InputError(f"max_registered {max_registered!r} must be an integer >= {MAX_LORAS} (the LoRAs one request may name)")
        self.max_registered = max_registered
        # pipe -> {registered name: (path, mtime_ns, size) read}, least recently requested first
        self._registered: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.folder = Path(folder).expanduser().resolve() if folder else None
        if self.folder is not None and not self.folder.is_dir():
            raise InputError(f"--lora-dir {folder}: no such folder; give a folder of .safetensors LoRA files")
        self._files: dict[str, LoraFile] = {}
        self._metadata: dict[tuple, dict] = {}  # (path, mtime_ns, size) -> metadata: a rescan reads new files only
        self._lock = threading.Lock()
        self.scan()

    def scan(self) -> dict[str, LoraFile]:
        """Re-read the folder: name -> file (a name found twice: the first in sorted path order, with a warning)."""
        files: dict[str, LoraFile] = {}
        if self.folder is not None:
            for path in sorted(self.folder.rglob("*.safetensors")):
                if not path.is_file():
                    continue
                name = path.stem
                if name in files:
                    log.warning("LoRA %s: the name %r is taken by %s; not served", path, name, files[name].path)
                    continue
                stat = path.stat()
                key = (path, stat.st_mtime_ns, stat.st_size)
                if key not in self._metadata:
                    self._metadata[key] = read_metadata(path)
                metadata = self._metadata[key]
                alias = metadata.get("ss_output_name") if isinstance(metadata.get("ss_output_name"), str) else name
                files[name] = LoraFile(name, alias or name, path, path.relative_to(self.folder).as_posix(), metadata)
        self._files = files
        return files

    def listing(self) -> list[dict]:
        """A1111's /sdapi/v1/loras entries: name, alias, path, metadata."""
        return [{"name": f.name, "alias": f.alias, "path": f.relative, "metadata": f.metadata} for f in self.scan().values()]

    def find(self, name: str, field) -> LoraFile:
        name = check_name(name, field)
        for files in (self._files, None):
            files = files if files is not None else self.scan()  # a miss: the file may have been added since
            found = files.get(name) or next((f for f in files.values() if f.alias == name), None)
            if found is not None:
                return found
        served = ", ".join(sorted(self._files)) or f"none: {self.folder} holds no .safetensors files"
        raise FieldError(field, f"LoRA {name!r} is not in the server's LoRA folder; served: {served}")

    def prepare(self, pipe, model: str, loras: dict, field, in_use=()) -> dict:
        """{request name or alias: scale} -> {registered name: scale} for `pipe.plan(loras=...)`, every file registered
        with `pipe` (again when it changed since). Raises FieldError (422) for a server without a LoRA folder, a
        model without LoRA slots, an unknown name or a file the model cannot take. in_use: names the model's queued
        and running requests hold (never evicted). Reads files: call it from a worker thread."""
        from sdrt.adapters.lora_switch import SLOT_NETWORKS

        if self.folder is None:
            raise FieldError(field, "this server serves no LoRAs; start it with `sdrt serve --lora-dir DIR`")
        if len(loras) > MAX_LORAS:
            raise FieldError(field, f"{len(loras)} LoRAs in one request; at most {MAX_LORAS}")
        if not any(pipe.backend.lora_slots(network) for network in SLOT_NETWORKS.values()):
            raise FieldError(field, f"model {model!r} takes no run-time LoRAs: its export has no LoRA slots; re-export it "
                                    "with `sdrt export MODEL OUT --lora-slots all` (or serve it with --backend torch)")
        out: dict[str, float] = {}
        for name, scale in loras.items():
            file = self.find(name, field)
            with self._lock:
                self._register(pipe, file, field)
            out[file.name] = out.get(file.name, 0.0) + float(scale)
        with self._lock:
            self._evict(pipe, keep=set(out) | set(in_use))
        return out

    def registered(self, pipe) -> list[str]:
        """The names registered with `pipe` through this library, least recently requested first."""
        with self._lock:
            return list(self._registered.get(pipe, ()))

    def _register(self, pipe, file: LoraFile, field) -> None:
        seen = self._registered.setdefault(pipe, collections.OrderedDict())
        try:
            stat = file.path.stat()
        except OSError as err:
            raise FieldError(field, f"LoRA {file.name!r} cannot be read ({err.strerror}); it was removed or moved") from None
        state = (str(file.path), stat.st_mtime_ns, stat.st_size)
        if seen.get(file.name) != state or file.name not in pipe.registered_loras:
            try:
                pipe.register_lora(file.path, name=file.name)
            except SdrtError as err:  # another model's LoRA, a corrupt file: the loader names the problem
                seen.pop(file.name, None)
                raise FieldError(field, f"LoRA {file.name!r}: {err}") from None
            if file.name in seen:
                log.info("LoRA %s changed on disk; read again", file.path)
            seen[file.name] = state
        seen.move_to_end(file.name)

    def _evict(self, pipe, keep: set) -> None:
        seen = self._registered.get(pipe)
        active = {n for n, _ in (pipe.active_loras or ())}
        for name in list(seen or ()):
            if len(seen) <= self.max_registered:
                return
            if name in keep or name in active:
                continue
            del seen[name]
            if name in pipe.registered_loras:
                pipe.unregister_lora(name)
                log.info("LoRA %s unregistered from a model (least recently used of %d)", name, self.max_registered + 1)
