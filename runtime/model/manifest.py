"""The export manifest: the one saved configuration of an sdrt export folder (manifest.json).

It carries the model facts, each network's I/O contract, the shape limits the export serves, library
versions, and every file's size and sha256. Loading checks sizes (cheap) and refuses a truncated,
changed or foreign folder; `verify()` checks the hashes in full.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from sdrt.contracts import NetworkContract
from sdrt.errors import ModelError
from sdrt.families import family_spec
from sdrt.model.facts import ModelFacts

MANIFEST_NAME = "manifest.json"
FORMAT = "sdrt-export"
FORMAT_VERSION = 1
# What `sdrt export` writes into the graphs, beyond the contract (2: sub-pixel upsampling; 3: Winograd tiles
# chosen per conv, F(4x4) among them, batch folded into the GEMMs; 4: Winograd sub-pixel upsamplers; 5: LoRA slots
# gated, sdrt.export.lora_gates; 6: SDXL's pooled final text layer for one token, conv forms measured per machine with
# --conv-tactics measure, sdrt.export.tactics; 7: Winograd's output transform by a GEMM and depth-to-space, no transposed
# convolution, GroupNorm's affine step as one BatchNormalization; 8: the UNet's step split beside it,
# sdrt.export.step_split; 9: the int8 export's UNet with ORT's fused MultiHeadAttention for self-attention on >= 1024
# tokens and GEGLU as two MatMuls; 10: a --winograd export's UNet GEGLUs as two MatMuls; 11: an int8 export's convs
# as im2col + one int8 GEMM with a float output, sdrt.export.int8_conv_gemm). Exports of any
# revision run; caches of exports (sdrt bench) key on it so that a better graph is not hidden by an old one.
GRAPH_REVISION = 11
GRAPH_REWRITES = ("subpixel_upsamplers", "winograd_convs")  # extras keys: {network: modules rewritten}


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class Manifest:
    facts: ModelFacts
    contracts: dict[str, NetworkContract]
    networks: dict[str, dict]  # name -> {"file": relative path, "precision": "fp32"|"fp16", ...}
    files: dict[str, dict]  # relative path -> {"size": int, "sha256": str}
    limits: dict
    versions: dict
    tokenizer: str = "tokenizer"
    scheduler: str = "scheduler/scheduler_config.json"
    token_embeddings: str = "token_embeddings.safetensors"
    extras: dict = dataclasses.field(default_factory=dict)  # loras, embeddings, engine cache keys, source
    family: dict = dataclasses.field(default_factory=dict)  # sdrt.families' spec as written (filled in on write)

    def family_section(self) -> dict:
        """The "family" section: as read, or the spec of facts.family (exports made before it was written)."""
        return self.family or family_spec(self.facts.family).to_manifest(self.facts)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "facts": self.facts.to_dict(),
            "family": self.family_section(),
            "contracts": {k: c.to_dict() for k, c in self.contracts.items()},
            "networks": self.networks,
            "files": self.files,
            "limits": self.limits,
            "versions": self.versions,
            "tokenizer": self.tokenizer,
            "scheduler": self.scheduler,
            "token_embeddings": self.token_embeddings,
            "extras": self.extras,
        }

    def write(self, folder: Path) -> Path:
        """Write manifest.json atomically (temporary name, then rename)."""
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False))
        tmp.replace(path)
        return path

    def rewrite_counts(self) -> dict[str, int]:
        """How many modules each export-time graph rewrite replaced, over all networks (0 for older exports)."""
        return {key: sum(self.extras.get(key, {}).values()) for key in GRAPH_REWRITES}

    def record_files(self, folder: Path, relpaths) -> None:
        """Store size and sha256 of each file (relative to `folder`)."""
        for rel in relpaths:
            p = Path(folder) / rel
            self.files[str(rel)] = {"size": p.stat().st_size, "sha256": sha256_of(p)}

    def check_sizes(self, folder: Path) -> None:
        """Cheap load-time check: every file is there at its recorded size."""
        for rel, info in self.files.items():
            p = Path(folder) / rel
            if not p.exists():
                raise ModelError(f"{folder} is missing {rel}; the export is incomplete: re-export it with `sdrt export`")
            if p.stat().st_size != info["size"]:
                raise ModelError(
                    f"{p} is {p.stat().st_size} bytes but the manifest says {info['size']}: the file is truncated "
                    "or was changed; re-export the model with `sdrt export`"
                )

    def verify(self, folder: Path) -> list[str]:
        """Full check: sizes and sha256 of every file. Returns the bad files (empty when all is well)."""
        bad = []
        for rel, info in self.files.items():
            p = Path(folder) / rel
            if not p.exists() or p.stat().st_size != info["size"] or sha256_of(p) != info["sha256"]:
                bad.append(rel)
        return bad


def read_manifest(folder: str | Path) -> Manifest:
    """Read and check an export folder's manifest; raises ModelError with the fix when anything is off."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder} has no {MANIFEST_NAME}; it is not an sdrt export (create one with `sdrt export`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path} is damaged or truncated ({err}); re-export the model with `sdrt export`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"{path} is not an sdrt export manifest; re-export the model with `sdrt export`")
    if data.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{path} has manifest format {data.get('format_version')}, this sdrt reads {FORMAT_VERSION}; "
            "re-export the model with this version's `sdrt export`"
        )
    try:
        manifest = Manifest(
            facts=ModelFacts.from_dict(data["facts"]),
            contracts={k: NetworkContract.from_dict(v) for k, v in data["contracts"].items()},
            networks=data["networks"],
            files=data["files"],
            limits=data["limits"],
            versions=data["versions"],
            tokenizer=data.get("tokenizer", "tokenizer"),
            scheduler=data.get("scheduler", "scheduler/scheduler_config.json"),
            token_embeddings=data.get("token_embeddings", "token_embeddings.safetensors"),
            extras=data.get("extras", {}),
            family=data.get("family", {}),
        )
    except (KeyError, TypeError) as err:
        raise ModelError(f"{path} lacks {err}; the manifest is incomplete: re-export the model with `sdrt export`") from None
    check_family(manifest, path)
    manifest.check_sizes(folder)
    return manifest


def check_family(manifest: Manifest, path: Path) -> None:
    """The family section must name a family this sdrt runs, the facts' family, and networks the contracts cover."""
    section = manifest.family_section()
    spec = family_spec(section.get("name", manifest.facts.family))
    if spec.name != manifest.facts.family:
        raise ModelError(f"{path} says family {spec.name!r} but its facts say {manifest.facts.family!r}; re-export the model")
    missing = [n for n in section.get("networks", spec.networks) if n not in manifest.contracts]
    if missing:
        raise ModelError(f"{path} lists networks {missing} without contracts; re-export the model with `sdrt export`")
