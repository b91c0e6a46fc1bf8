"""Coloured digits on plain backgrounds, with captions, generated on the fly (nothing is downloaded).

Glyphs come from scikit-learn's `load_digits` (1,797 real 8x8 handwritten digits, upscaled with random
affine jitter) and from the installed DejaVu fonts. `make_dataset` returns uint8 images [N,64,64,3] and
integer labels (digit, colour, background); `caption` turns one label into one of many caption styles.
"""

from __future__ import annotations

import glob

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SIZE = 64
COLOURS = {  # the digit-stroke colours; the oracle's colour head uses this order
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 180),
    "orange": (250, 135, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
COLOUR_NAMES = list(COLOURS)
BACKGROUND_NAMES = list(BACKGROUNDS)
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
HELD_OUT_FRACTION = 0.2  # the last 20% of load_digits (later writers) never trains anything


def sklearn_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Real 8x8 handwriting in [0,1] and labels; split is "train" (first 80%), "test" (last 20%) or "all"."""
    from sklearn.datasets import load_digits

    d = load_digits()
    cut = int(len(d.target) * (1 - HELD_OUT_FRACTION))
    sl = {"train": slice(0, cut), "test": slice(cut, None), "all": slice(None)}[split]
    return d.images[sl].astype(np.float32) / 16.0, d.target[sl].astype(np.int64)


def _fonts() -> list[str]:
    return sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))


def _jitter(mask: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Random rotation, scale, shear and shift of a 64x64 'L' mask centred on the canvas."""
    ang = np.deg2rad(rng.uniform(-12, 12))
    scale = rng.uniform(0.85, 1.15)
    shear = rng.uniform(-0.15, 0.15)
    tx, ty = rng.uniform(-4, 4, size=2)
    c, s = np.cos(ang) / scale, np.sin(ang) / scale
    a, b, d, e = c, s + shear * c, -s, c  # output -> input mapping
    cx = cy = SIZE / 2
    x0 = cx - a * (cx + tx) - b * (cy + ty)
    y0 = cy - d * (cx + tx) - e * (cy + ty)
    return mask.transform((SIZE, SIZE), Image.AFFINE, (a, b, x0, d, e, y0), resample=Image.BILINEAR)


def handwritten_mask(img8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = int(rng.integers(40, 54))
    small = Image.fromarray((img8 * 255).astype(np.uint8))
    big = small.resize((side, side), Image.BICUBIC).filter(ImageFilter.GaussianBlur(side / 40))
    canvas = Image.new("L", (SIZE, SIZE))
    canvas.paste(big, ((SIZE - side) // 2, (SIZE - side) // 2))
    m = np.asarray(_jitter(canvas, rng), np.float32) / 255.0
    lo = rng.uniform(0.25, 0.4)  # contrast stretch: crisp strokes of varied thickness
    return np.clip((m - lo) / 0.25, 0, 1)


def font_mask(digit: int, font: str, rng: np.random.Generator) -> np.ndarray:
    f = ImageFont.truetype(font, int(rng.integers(38, 52)))
    canvas = Image.new("L", (SIZE, SIZE))
    ImageDraw.Draw(canvas).text((SIZE / 2, SIZE / 2), str(digit), fill=255, font=f, anchor="mm")
    return np.asarray(_jitter(canvas, rng), np.float32) / 255.0


def make_dataset(n: int, seed: int, split: str = "train", font_fraction: float = 0.25):
    """n coloured digit images [n,64,64,3] uint8 and labels [n,3] (digit, colour index, background index)."""
    rng = np.random.default_rng(seed)
    hw, hw_labels = sklearn_digits(split)
    fonts = _fonts()
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    labels = np.empty((n, 3), np.int64)
    for i in range(n):
        if fonts and rng.random() < font_fraction:
            digit = int(rng.integers(10))
            mask = font_mask(digit, fonts[rng.integers(len(fonts))], rng)
        else:
            j = int(rng.integers(len(hw)))
            digit, mask = int(hw_labels[j]), handwritten_mask(hw[j], rng)
        colour = int(rng.integers(len(COLOURS)))
        bgs = [k for k, b in enumerate(BACKGROUND_NAMES) if b != COLOUR_NAMES[colour]]
        bg = bgs[rng.integers(len(bgs))]
        fg = np.clip(np.array(COLOURS[COLOUR_NAMES[colour]]) + rng.normal(0, 8, 3), 0, 255)
        back = np.clip(np.array(BACKGROUNDS[BACKGROUND_NAMES[bg]]) + rng.normal(0, 8, 3), 0, 255)
        img = back * (1 - mask[..., None]) + fg * mask[..., None]
        images[i] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        labels[i] = (digit, colour, bg)
    return images, labels


# Caption styles: {d} numeral, {w} word, {c} colour, {b} background.
_FULL = ["a {c} {d}", "a {c} {d} on a {b} background", "the number {w} in {c} on {b}", "{c} {d}",
         "a handwritten {c} {d}", "a {c} number {w}", "the digit {d} in {c}", "a {c} {w} on {b}",
         "{d} in {c}", "a {c} {d} on {b}", "the number {d}, {c}, on a {b} background", "{c} {w}"]
_DIGIT = ["{d}", "a {d}", "the number {w}", "the digit {d}", "{w}", "a handwritten {d}", "a {d} on a {b} background"]
_COLOUR = ["something {c}", "{c}", "a {c} digit", "a {c} number", "{c} on {b}"]


def caption(digit: int, colour: int, bg: int, rng: np.random.Generator, p_drop: float = 0.12) -> str:
    """One caption for a label; "" with probability p_drop (classifier-free guidance)."""
    r = rng.random()
    if r < p_drop:
        return ""
    pool = _FULL if r < 0.75 else _DIGIT if r < 0.9 else _COLOUR
    t = pool[rng.integers(len(pool))]
    return t.format(d=digit, w=WORDS[digit], c=COLOUR_NAMES[colour], b=BACKGROUND_NAMES[bg])


def negative_caption(digit: int, colour: int, bg: int, rng: np.random.Generator, p_drop: float = 0.12,
                     p_colour: float = 0.2, colour_true: float = 0.75) -> str:
    """A caption for the `negative` fine-tune phase: the usual mix, but with `p_colour` of captions colour-only
    ("blue", "something blue", ...), and those name the image's own colour with probability `colour_true`, another
    colour otherwise. A colour-only caption then means "more likely this colour", not "certainly this colour":
    the UNet's prediction for it stays in distribution on an image of another colour, so a lone colour word as
    the negative prompt steers the colour without extrapolating into the off-manifold blobs that destroyed the
    digit (issue #14; full captions such as "a blue 3" stay exact)."""
    r = rng.random()
    if r < p_drop:
        return ""
    if r < p_drop + p_colour:
        if rng.random() >= colour_true:
            colour = int((colour + 1 + rng.integers(len(COLOURS) - 1)) % len(COLOURS))
        t = _COLOUR[rng.integers(len(_COLOUR))]
        bgs = [k for k, b in enumerate(BACKGROUND_NAMES) if b != COLOUR_NAMES[colour]]
        bg = bg if bg in bgs else bgs[rng.integers(len(bgs))]
        return t.format(c=COLOUR_NAMES[colour], b=BACKGROUND_NAMES[bg])
    return caption(digit, colour, bg, rng, p_drop=0.0)


def caption_matches(text_labels: np.ndarray, image_labels: np.ndarray) -> np.ndarray:
    """[T,I] bool: caption t (digit, colour, bg; -1 = not named) is true of image i."""
    t, i = text_labels[:, None, :], image_labels[None, :, :]
    return np.all((t < 0) | (t == i), axis=-1)


def caption_with_labels(digit: int, colour: int, bg: int, rng: np.random.Generator, p_drop: float = 0.0):
    """A caption and what it names (digit, colour, bg; -1 where it names nothing)."""
    text = caption(digit, colour, bg, rng, p_drop)
    words = text.replace(",", " ").split()
    named_d = digit if (str(digit) in words or WORDS[digit] in words) else -1
    named_c = colour if COLOUR_NAMES[colour] in words else -1  # the background never has the digit's colour
    named_b = bg if (f"on {BACKGROUND_NAMES[bg]}" in text or f"on a {BACKGROUND_NAMES[bg]}" in text) else -1
    return text, (named_d, named_c, named_b)
