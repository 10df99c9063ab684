"""Item images: deterministic placeholders, and decoding at the model's resolution.

Placeholders. None of the bundled datasets ships item images (see
``shared/data/README.md``), yet the multimodal tokenizer, the shard format and
the data benchmark all need some. ``placeholder_image(key)`` renders one from a
hash of the item key:

- a background colour and a frame of that colour around the edge,
- 3 to 6 filled shapes (ellipse, rectangle or triangle) with their own colours,
  positions and sizes,
- the key itself, written in a box along the bottom edge,
- optionally (``texture > 0``) fine grey grain over everything, so that the JPEG
  is as large as a product photo's (flat shapes compress to a few KB; Amazon's
  500 x 500 "large" photos are tens of KB, and decoding time grows with that).

Every choice comes from a BLAKE2b byte stream over the key, and the grain is cut
at a keyed offset from one SHAKE-256 noise field (not from a random generator
whose stream could change between library versions), so the same key always gives the same picture and different
keys give visibly different ones. Placeholders carry no information about the
item beyond its key: they exercise the image path of the pipeline, they do not
help a model.

Decoding. The tokenizer consumes images at one fixed, smaller resolution
(e.g. 224 x 224) than they are stored at (about 500 x 500). ``load_image``
produces that input directly, two ways faster than the usual
``Image.open(f).convert("RGB").resize(size)``:

- JPEGs are decoded at a reduced scale with ``Image.draft``: libjpeg computes the
  1/2, 1/4 or 1/8 size image directly from the DCT coefficients (a scaled inverse
  DCT), the smallest scale that still covers the target size. A 500 px photo for a
  224 px model is decoded at 250 px: a quarter of the inverse-DCT, upsampling and
  colour-conversion work (the entropy decoding of the file stays the same), and
  the resize that follows is by 1.1x instead of 2.2x;
- the remaining resize (always by less than 2x after drafting) runs in torch's
  antialiased uint8 ``interpolate``, which is written to match PIL's bicubic
  filter (within 1-2 grey levels, see the tests) and is several times faster than
  PIL's own resize on CPU; the result is the ``(3, H, W)`` uint8 tensor a model
  takes anyway.

Storing at the model's resolution. When the resolution is known before
training, ``prepare_image`` does that same resize once, when the shards are
built, and re-encodes the result (JPEG quality 95 by default, as img2dataset
does, without chroma subsampling): the stored image is then exactly the model's size, and ``load_image``
at that size decodes it at full scale and skips the resize. What remains per
read is the entropy decoding of a much smaller file.
"""
from __future__ import annotations

import functools
import hashlib
import io
import numbers
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageDraw, ImageFont

ImageSource = Union[bytes, str, Path, BinaryIO]  # encoded image bytes, a file path, or an open binary file

__all__ = ["placeholder_image", "placeholder_bytes", "background_color", "open_rgb", "resize_uint8", "load_image",
           "image_hw", "image_format", "encode_uint8", "prepare_image"]

STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats images can be re-encoded to -> member ext

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


@functools.lru_cache(maxsize=4)
def _grain_field(side: int) -> Image.Image:
    """A ``side`` x ``side`` field of uniform grey noise from SHAKE-256 (computed once per side)."""
    return Image.frombytes("L", (side, side), hashlib.shake_256(f"megarec-grain/{side}".encode()).digest(side * side))


def _add_grain(img: Image.Image, stream: Iterator[int], amplitude: int) -> Image.Image:
    """``img`` plus grey noise uniform in ``[-amplitude, amplitude]``, cut from the shared field at a keyed offset."""
    size = img.size[0]
    x, y = (int.from_bytes(bytes((next(stream), next(stream))), "big") % size for _ in range(2))
    noise = _grain_field(2 * size).crop((x, y, x + size, y + size))
    noise = noise.point([v * (2 * amplitude + 1) // 256 for v in range(256)])  # 0 .. 2 * amplitude
    return ImageChops.add(img, Image.merge("RGB", (noise, noise, noise)), 1.0, -amplitude)  # clipped to 0..255


def placeholder_image(key: str, size: int = 256, texture: int = 0) -> Image.Image:
    """An RGB ``size`` x ``size`` image rendered deterministically from ``key``.

    ``texture`` is the amplitude (grey levels, 0..64) of a fine grain added last; 0 draws
    flat shapes only. About 5 gives a 500 px JPEG (quality 90) of ~45 KB, like a product photo.
    """
    if size < 16:
        raise ValueError(f"placeholder size must be >= 16 pixels, got {size}")
    if not 0 <= texture <= 64:
        raise ValueError(f"placeholder texture must be in [0, 64] grey levels, got {texture}")
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
    return _add_grain(img, stream, texture) if texture else img


def placeholder_bytes(key: str, size: int = 256, fmt: str = "JPEG", quality: int = 90, texture: int = 0) -> bytes:
    """``placeholder_image(key, size, texture)`` encoded as JPEG or PNG bytes."""
    fmt = fmt.upper().replace("JPG", "JPEG")
    if fmt not in ("JPEG", "PNG"):
        raise ValueError(f"placeholder format must be JPEG or PNG, got {fmt!r}")
    buf = io.BytesIO()
    opts = {"quality": quality} if fmt == "JPEG" else {}
    placeholder_image(key, size, texture).save(buf, format=fmt, **opts)
    return buf.getvalue()


# ----------------------------------------------------------------------------- decoding
def image_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of a model resolution given as one side or ``(height, width)``; checked."""
    hw = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in hw):
        raise ValueError(f"image size must be a positive int or (height, width) of positive ints, got {size!r}")
    return int(hw[0]), int(hw[1])


def open_rgb(src: ImageSource, size: int | tuple[int, int] | None = None, draft: bool = True) -> Image.Image:
    """Fully decoded RGB image from bytes, a path or a binary file.

    With ``size`` (``(height, width)`` or one side) and ``draft``, a JPEG is decoded at the
    smallest of libjpeg's 1/1, 1/2, 1/4, 1/8 scales that still covers ``size`` (``Image.draft``);
    other formats decode at full size. Truncated or corrupt data raises (PIL's ``OSError`` and
    friends), since the decode is forced here.
    """
    return _open_rgb(src, size, draft)[0]


def _open_rgb(src: ImageSource, size: int | tuple[int, int] | None, draft: bool
              ) -> tuple[Image.Image, tuple[int, int]]:
    """``open_rgb`` plus the image's ``(height, width)`` as stored (before drafting)."""
    with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src) as im:
        original = (im.height, im.width)
        if size is not None and draft:
            h, w = image_hw(size)
            im.draft("RGB", (w, h))  # a no-op for formats other than JPEG
        return im.convert("RGB"), original  # forces the whole decode (a copy, so the file can be closed)


def resize_uint8(image: Image.Image, size: int | tuple[int, int]) -> torch.Tensor:
    """An RGB PIL image as a ``(3, height, width)`` uint8 tensor at ``size``.

    Resampled with torch's antialiased bicubic ``interpolate`` on uint8 (a vectorised kernel
    written to reproduce PIL's bicubic resize, see the tests); by hand instead of
    ``image.resize`` because PIL's resize is several times slower and, after drafting, would
    again dominate the decode.
    """
    hw = image_hw(size)
    x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]  # channels-last strides
    if tuple(x.shape[2:]) != hw:
        x = F.interpolate(x, size=hw, mode="bicubic", antialias=True)
    return x[0].contiguous()


def load_image(src: ImageSource, size: int | tuple[int, int], draft: bool = True) -> torch.Tensor:
    """Decode an image straight to the model's input: a ``(3, height, width)`` uint8 RGB tensor.

    ``open_rgb(src, size, draft)`` then ``resize_uint8``. Aspect ratio is not kept (the
    image is stretched to ``size``), as with ``Image.resize(size)``.
    """
    return resize_uint8(open_rgb(src, size, draft), size)


# ----------------------------------------------------------------------------- storing at the model's resolution
def image_format(fmt: str) -> str:
    """PIL's name for a format images can be stored in (``"jpg"`` -> ``"JPEG"``); checked."""
    name = str(fmt).upper().replace("JPG", "JPEG")
    if name not in STORED_FORMATS:
        raise ValueError(f"image format must be one of {', '.join(STORED_FORMATS)}, got {fmt!r}")
    return name


def encode_uint8(image: torch.Tensor, fmt: str = "JPEG", quality: int = 95) -> bytes:
    """A ``(3, H, W)`` uint8 RGB tensor encoded as JPEG, PNG (lossless, ``quality`` unused) or WebP bytes.

    JPEGs keep full-resolution colour (4:4:4, no chroma subsampling): at model resolution every
    pixel counts, and for 224 px images it halves the error against the unencoded tensor
    (0.9 vs 1.7 grey levels at quality 95) for ~20% more bytes, at the same decode speed.
    """
    fmt = image_format(fmt)
    if not 1 <= quality <= 100:
        raise ValueError(f"image quality must be in [1, 100], got {quality}")
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB").save(
        buf, format=fmt, **{"JPEG": {"quality": quality, "subsampling": 0}, "PNG": {},
                            "WEBP": {"quality": quality}}[fmt])
    return buf.getvalue()


def prepare_image(src: ImageSource, size: int | tuple[int, int], fmt: str = "JPEG",
                  quality: int = 95) -> tuple[bytes, tuple[int, int]]:
    """An image resized to the model's resolution and re-encoded, for storing (img2dataset-style).

    Resized exactly as :func:`load_image` does (drafted JPEG decode, torch's uint8 bicubic
    resize), so that ``load_image(stored, size)`` decodes it at full scale and skips the resize.
    Returns the encoded bytes and the original image's ``(height, width)``.
    """
    image, original = _open_rgb(src, size, True)
    return encode_uint8(resize_uint8(image, size), fmt, quality), original
