"""What one request may ask for (`Limits`): checked before a request is queued, each refusal a 422 naming the
request's own field and the allowed range. The defaults protect a 24 GB machine."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class Limits:
    """What one request may ask for; the defaults protect a 24 GB machine."""

    max_pixels: int | None = None  # per image; None: 4x the model's default area
    max_steps: int = 150
    max_images: int = 8  # images per request
    max_prompt_chars: int = 2000
    max_body_bytes: int = 20 * 2**20
    max_input_pixels: int = 4096 * 4096  # an uploaded init image, checked before it is decompressed

    def pixels_for(self, facts) -> int:
        return self.max_pixels if self.max_pixels is not None else 4 * facts.default_size**2

    def check(self, facts, *, prompt: str, negative_prompt: str | None, steps: int, images: int,
              width: int | None, height: int | None, fields: dict | None = None) -> None:
        """Raise FieldError (422) naming the request's own field and the allowed range."""
        from sdrt.serve.schemas import FieldError

        name = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "images": "n",
                "width": "width", "height": "height", "size": "width x height", **(fields or {})}
        for key, text in (("prompt", prompt), ("negative_prompt", negative_prompt or "")):
            if len(text) > self.max_prompt_chars:
                raise FieldError(name[key], f"{name[key]} has {len(text)} characters; at most {self.max_prompt_chars} are accepted")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise FieldError(name[key], f"{name[key]} is not valid Unicode text") from None
        if not 1 <= steps <= self.max_steps:
            raise FieldError(name["steps"], f"{name['steps']} {steps} is outside 1..{self.max_steps}")
        if not 1 <= images <= self.max_images:
            raise FieldError(name["images"], f"{name['images']} asks for {images} images; 1..{self.max_images} per request")
        w = facts.default_size if width is None else width
        h = facts.default_size if height is None else height
        limit = self.pixels_for(facts)
        if w * h > limit:
            side = int(math.isqrt(limit)) // facts.size_step * facts.size_step
            raise FieldError(name["width"], f"{name['size']} {w}x{h} is {w * h} pixels; at most {limit} per image on this server "
                                            f"(e.g. {side}x{side})")
