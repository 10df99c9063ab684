"""Deterministic placeholder images for items that have none.

None of the bundled datasets ships item images (see ``shared/data/README.md``),
yet the multimodal tokenizer, the shard format and the data benchmark all need
some. ``placeholder_image(key)`` renders one from a hash of the item key:

- a background colour and a frame of that colour around the edge,
- 3 to 6 filled shapes (ellipse, rectangle or triangle) with their own colours,
  positions and sizes,
- the key itself, written in a box along the bottom edge.

Every choice comes from a BLAKE2b byte stream over the key (not from a random
generator whose stream could change between library versions), so the same key
always gives the same picture and different keys give visibly different ones.
Placeholders carry no information about the item beyond its key: they exercise
the image path of the pipeline, they do not help a model.
"""
from __future__ import annotations

import hashlib
import io
from typing import Iterator

from PIL import Image, ImageDraw, ImageFont

__all__ = ["placeholder_image", "placeholder_bytes", "background_color"]

_SHAPES = ("ellipse", "rectangle", "triangle")


def _byte_stream(key: str) -> Iterator[int]:
    """Endless deterministic bytes derived from ``key`` (BLAKE2b in counter mode)."""
    counter = 0
    while True:
        yield from hashlib.blake2b(f"{counter}:{key}".encode("utf-8"), digest_size=64).digest()
        counter += 1


def _color(bytes_: Iterator[int]) -> tuple[int, int, int]:
    return next(bytes_), next(bytes_), next(bytes_)


def background_color(key: str) -> tuple[int, int, int]:
    """The placeholder's background (and frame) colour for ``key``."""
    return _color(_byte_stream(key))


def placeholder_image(key: str, size: int = 256) -> Image.Image:
    """An RGB ``size`` x ``size`` image rendered deterministically from ``key``."""
    if size < 16:
        raise ValueError(f"placeholder size must be >= 16 pixels, got {size}")
    stream = _byte_stream(key)
    bg = _color(stream)
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    frame = max(2, size // 64)
    inner = size - 2 * frame
    for _ in range(3 + next(stream) % 4):
        kind = _SHAPES[next(stream) % len(_SHAPES)]
        fill = _color(stream)
        x0 = frame + next(stream) * inner // 256
        y0 = frame + next(stream) * inner // 256
        w = max(4, (32 + next(stream)) * inner // 512)
        h = max(4, (32 + next(stream)) * inner // 512)
        x1, y1 = min(x0 + w, size - frame - 1), min(y0 + h, size - frame - 1)
        if kind == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    font = ImageFont.load_default(size=max(8, size // 16))
    text = key if len(key) <= 40 else key[:37] + "..."
    box_top = size - frame - max(10, size // 10)
    draw.rectangle((frame, box_top, size - frame - 1, size - frame - 1), fill=(255, 255, 255))
    draw.text((frame + 2, box_top + 1), text, fill=(0, 0, 0), font=font)
    # The frame is drawn last so the border always shows the background colour.
    draw.rectangle((0, 0, size - 1, size - 1), outline=bg, width=frame)
    return img


def placeholder_bytes(key: str, size: int = 256, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """``placeholder_image(key, size)`` encoded as JPEG or PNG bytes."""
    fmt = fmt.upper().replace("JPG", "JPEG")
    if fmt not in ("JPEG", "PNG"):
        raise ValueError(f"placeholder format must be JPEG or PNG, got {fmt!r}")
    buf = io.BytesIO()
    opts = {"quality": quality} if fmt == "JPEG" else {}
    placeholder_image(key, size).save(buf, format=fmt, **opts)
    return buf.getvalue()
