"""Train the digit oracle (a small CNN: digit and stroke colour) on real coloured digits and export it to ONNX.

    python -m sdrt.export.digits.oracle            # ~10 min on 2 CPU cores; writes runtime/models/digits_oracle.*

It learns only from data.py's generator (scikit-learn's real handwriting, the DejaVu fonts), never from
generated images; the last 20% of load_digits is held out and reported. The runtime side is sdrt.oracle.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdrt.export.digits import data

MODELS = Path(__file__).resolve().parents[2] / "runtime" / "models"


class Oracle(torch.nn.Module):
    """[N,3,64,64] float in [0,1] -> (digit logits [N,10], colour logits [N,len(COLOURS)])."""

    def __init__(self, n_colours: int = len(data.COLOURS), widths=(32, 64, 128)):
        super().__init__()
        def block(a, b):
            return [torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.BatchNorm2d(b), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        c1, c2, c3 = widths
        self.features = torch.nn.Sequential(torch.nn.AvgPool2d(2), *block(3, c1), *block(c1, c2), *block(c2, c3),
                                            torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(c3 * 16, 128),
                                            torch.nn.ReLU())
        self.digit = torch.nn.Linear(128, 10)
        self.colour = torch.nn.Linear(128, n_colours)

    def forward(self, x):
        h = self.features(x)
        return self.digit(h), self.colour(h)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and small brightness/contrast changes, so decoded (soft, slightly off) images still read."""
    n = x.shape[0]
    blur = torch.rand(n, 1, 1, 1, generator=g) < 0.5
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    x = torch.where(blur, F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3), x)
    x = x * (1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)) + 0.1 * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    x = x + 0.03 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1)


def to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def accuracy(model, images, labels) -> tuple[float, float]:
    model.eval()
    d, c = [], []
    for i in range(0, len(images), 500):
        dl, cl = model(to_input(images[i:i + 500]))
        d.append(dl.argmax(1))
        c.append(cl.argmax(1))
    d, c = torch.cat(d).numpy(), torch.cat(c).numpy()
    return float((d == labels[:, 0]).mean()), float((c == labels[:, 1]).mean())


def train(n: int, epochs: int, seed: int, log=print) -> tuple[Oracle, dict]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    images, labels = data.make_dataset(n, seed=seed + 100, split="train")
    hw_test = data.make_dataset(2000, seed=seed + 101, split="test", font_fraction=0.0)
    mixed_test = data.make_dataset(2000, seed=seed + 102, split="test")
    log(f"data {time.time() - t0:.0f}s")
    model = Oracle()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (n // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    y = torch.from_numpy(labels)
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - 127, 128):
            idx = perm[i:i + 128]
            x = augment(to_input(images[idx.numpy()]), g)
            dl, cl = model(x)
            loss = F.cross_entropy(dl, y[idx, 0], label_smoothing=0.05) + F.cross_entropy(cl, y[idx, 1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        log(f"epoch {epoch} loss {loss.item():.4f} held-out handwritten digit/colour {accuracy(model, *hw_test)} "
            f"({time.time() - t0:.0f}s)")
    hw_d, hw_c = accuracy(model, *hw_test)
    mx_d, mx_c = accuracy(model, *mixed_test)
    figures = {"held_out_handwritten": {"digit_accuracy": hw_d, "colour_accuracy": hw_c, "images": 2000},
               "held_out_mixed_fonts_and_handwriting": {"digit_accuracy": mx_d, "colour_accuracy": mx_c, "images": 2000},
               "train_images": n, "epochs": epochs, "seed": seed}
    return model.eval(), figures


def export(model: Oracle, figures: dict, onnx_path: Path) -> None:
    torch.onnx.export(model, (torch.rand(2, 3, 64, 64),), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["digit_logits", "colour_logits"],
                      dynamic_axes={"images": {0: "batch"}, "digit_logits": {0: "batch"}, "colour_logits": {0: "batch"}})
    meta = {
        "input": {"name": "images", "shape": ["N", 3, 64, 64], "dtype": "float32", "range": [0.0, 1.0],
                  "layout": "NCHW, RGB"},
        "outputs": {"digit_logits": list(range(10)), "colour_logits": data.COLOUR_NAMES},
        "colours": data.COLOUR_NAMES,
        "colour_rgb": {k: list(v) for k, v in data.COLOURS.items()},
        "backgrounds": data.BACKGROUND_NAMES,
        "trained_on": "sdrt.export.digits.data: scikit-learn load_digits (first 80%) upscaled with affine jitter, "
                      "and DejaVu font digits, coloured on white/black/grey; never on generated images",
        "accuracy": figures,
    }
    onnx_path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=24000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=MODELS / "digits_oracle.onnx")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, figures = train(a.images, a.epochs, a.seed)
    print(json.dumps(figures, indent=2))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    export(model, figures, a.out)
    print(f"wrote {a.out} and {a.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
