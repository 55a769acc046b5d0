"""The photo demo's thumbnails, without Django: size, orientation, watermark, and the errors a
user sees for files that are not photos."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from examples.photos.gallery import images
from PIL import Image


def jpeg(path: Path, size: tuple[int, int], orientation: int | None = None) -> Path:
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image = Image.new("RGB", size, "#3366aa")
    image.paste("#ffcc00", (0, 0, size[0] // 2, size[1] // 4))  # a marked corner, to see the turn
    image.save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path


def test_a_large_photo_fits_into_512_pixels(tmp_path: Path) -> None:
    seen: list[str] = []
    target, width, height = images.make_thumbnail(jpeg(tmp_path / "big.jpg", (6000, 4000)), tmp_path / "out" / "big",
                                                  lambda fraction, message: seen.append(message))
    assert (width, height) == (512, 341)
    assert target.suffix == images.SUFFIX and target.exists()
    with Image.open(target) as thumb:
        assert thumb.size == (512, 341)
    assert seen == ["reading", "resizing", "watermarking", "saving"]


def test_the_exif_orientation_turns_the_picture_upright(tmp_path: Path) -> None:
    _, width, height = images.make_thumbnail(jpeg(tmp_path / "side.jpg", (1200, 800), orientation=6), tmp_path / "side")
    assert (width, height) == (341, 512)


def test_the_watermark_is_stamped(tmp_path: Path) -> None:
    target, _, _ = images.make_thumbnail(jpeg(tmp_path / "plain.jpg", (1024, 682)), tmp_path / "plain")
    with Image.open(target) as thumb:
        corner = thumb.convert("L").crop((thumb.width // 2, thumb.height * 3 // 4, thumb.width, thumb.height))
        low, high = corner.getextrema()
    assert high - low > 40  # a flat blue corner, but for the text


def test_a_text_file_is_not_an_image(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(images.NotAnImage, match="not an image"):
        images.make_thumbnail(notes, tmp_path / "notes")


def test_a_truncated_photo_says_so(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((800, 600), 50).convert("RGB").save(buffer, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(images.NotAnImage, match="truncated"):
        images.make_thumbnail(cut, tmp_path / "cut")
