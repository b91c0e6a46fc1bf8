"""The digit oracle: reads the digit and the stroke colour of a 64x64 digits-model image (ONNX Runtime, no torch).

    from sdrt.oracle import DigitOracle
    oracle = DigitOracle.load()
    oracle.classify(images)            # [(7, "red"), ...]

A small CNN trained by sdrt.export.digits.oracle on real coloured digits (scikit-learn's handwriting and
DejaVu fonts, never on generated images); its labels and held-out accuracy are in digits_oracle.json.
Tests use it to judge what an image shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from sdrt.errors import InputError, ModelError

MODELS_DIR = Path(__file__).parent / "models"


class DigitOracle:
    def __init__(self, session, meta: dict):
        self.session, self.meta = session, meta
        self.colours: list[str] = meta["colours"]
        self.size = int(meta["input"]["shape"][-1])

    @classmethod
    def load(cls, path: str | Path | None = None) -> "DigitOracle":
        """Load the ONNX oracle (default: the one shipped in sdrt/models/) and its .json labels."""
        import onnxruntime as ort

        path = Path(path) if path is not None else MODELS_DIR / "digits_oracle.onnx"
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise ModelError(f"no digit oracle at {path} (+ .json); build it with `python -m sdrt.export.digits.oracle`")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return cls(session, json.loads(meta_path.read_text()))

    def _batch(self, images) -> np.ndarray:
        """list of PIL images or uint8 [N,H,W,3] -> float32 [N,3,size,size] in [0,1]."""
        if isinstance(images, np.ndarray):
            if images.ndim == 3:
                images = images[None]
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise InputError(f"images array of shape {images.shape} and dtype {images.dtype}: "
                                 "pass uint8 [N,H,W,3] or a list of PIL images")
            images = list(images)
        out = []
        for im in images:
            im = Image.fromarray(im) if isinstance(im, np.ndarray) else im
            im = im.convert("RGB")
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), Image.BILINEAR)
            out.append(np.asarray(im, np.float32) / 255.0)
        if not out:
            raise InputError("no images to classify")
        return np.stack(out).transpose(0, 3, 1, 2).copy()

    def probabilities(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(digit probabilities [N,10], colour probabilities [N,len(colours)])."""
        digit_logits, colour_logits = self.session.run(None, {"images": self._batch(images)})
        return _softmax(digit_logits), _softmax(colour_logits)

    def classify(self, images) -> list[tuple[int, str]]:
        """The most likely (digit, colour name) of each image."""
        pd, pc = self.probabilities(images)
        return [(int(d), self.colours[int(c)]) for d, c in zip(pd.argmax(1), pc.argmax(1))]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
