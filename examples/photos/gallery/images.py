"""Thumbnails: fit into 512 px, upright as the camera meant, with a watermark. Pure Pillow, no
Django, so it can be tried on its own."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError, features

SIZE = 512
WATERMARK = "offload photos"
#: WebP where this Pillow can write it, JPEG otherwise.
FORMAT, SUFFIX = ("WEBP", ".webp") if features.check("webp") else ("JPEG", ".jpg")

Progress = Callable[[float, str], None]


class NotAnImage(ValueError):
    """The file is not a picture Pillow can read, or it is cut short."""


def make_thumbnail(source: Path, target_stem: Path, progress: Progress = lambda f, m: None) -> tuple[Path, int, int]:
    """Write the thumbnail of ``source`` next to ``target_stem`` (suffix added); return its path
    and size."""
    progress(0.1, "reading")
    try:
        with Image.open(source) as image:
            # A JPEG decodes straight at 1/2, 1/4 or 1/8 of its size: a 6000x4000 photo is read
            # as 1500x1000 instead of 24 million pixels, most of the time saved.
            image.draft("RGB", (SIZE * 2, SIZE * 2))
            image.load()
            progress(0.4, "resizing")
            upright = ImageOps.exif_transpose(image)  # phones store portraits sideways plus a tag
    except UnidentifiedImageError:
        raise NotAnImage("not an image (Pillow cannot read this file)") from None
    except (OSError, SyntaxError) as e:
        # "image file is truncated", "broken data stream": an upload cut short, a damaged file.
        raise NotAnImage(f"damaged or truncated image ({e})") from None
    upright = upright.convert("RGB")
    upright.thumbnail((SIZE, SIZE), Image.Resampling.LANCZOS, reducing_gap=2.0)
    progress(0.7, "watermarking")
    stamped = _watermark(upright)
    target = target_stem.with_suffix(SUFFIX)
    target.parent.mkdir(parents=True, exist_ok=True)
    progress(0.9, "saving")
    stamped.save(target, FORMAT, quality=82)
    return target, stamped.width, stamped.height


def _watermark(image: Image.Image) -> Image.Image:
    size = max(12, image.width // 24)
    font = ImageFont.load_default(size=size)
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), WATERMARK, font=font)
    margin = size // 2
    x, y = image.width - (right - left) - margin, image.height - (bottom - top) - margin
    draw.text((x + 1, y + 1), WATERMARK, font=font, fill=(0, 0, 0, 110))
    draw.text((x, y), WATERMARK, font=font, fill=(255, 255, 255, 170))
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")
