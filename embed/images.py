"""Opening images for embedding: every mode converted to RGB, large JPEGs decoded at reduced size, and
every failure turned into a reason instead of an exception."""
from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 100_000_000  # after JPEG draft reduction; beyond this an image is refused


class ImageFailure(Exception):
    """An image that cannot be embedded; the message is the reason recorded in failures.csv."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16/32-bit greyscale rescaled (not clipped), alpha composited on white,
    CMYK, palette and greyscale converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            lo, hi = float(np.nanmin(arr, initial=0)), float(np.nanmax(arr, initial=1))
            arr, top = (arr - lo), max(hi - lo, 1e-12)
        img = Image.fromarray(np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img if img.mode == "RGB" else img.convert("RGB")  # RGB already: no copy (40 MP: 114 MB)


def regular_file(path) -> None:
    """ImageFailure unless `path` (after links) is a regular file: a FIFO or a device named x.jpg would
    block or stream for ever once opened. Streams (an upload in memory) pass."""
    if not isinstance(path, (str, Path)):
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageFailure("file not found") from None
    except OSError as e:
        raise ImageFailure(f"unreadable: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise ImageFailure("not a regular file (a folder, FIFO, socket or device)")


def decoded_size(src, min_side_px: int) -> tuple[int, int]:
    """(width, height) of what decoding `src` makes (after JPEG draft reduction), read from its header alone:
    what a decoding budget charges for it. ImageFailure for what open_rgb would refuse to open."""
    regular_file(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(src) as img:
                img.draft("RGB", (min_side_px, min_side_px))
                w, h = img.size
    except Image.DecompressionBombError as e:
        raise ImageFailure(f"too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageFailure("not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageFailure(f"unreadable: {e}") from None
    finally:
        if hasattr(src, "seek"):
            src.seek(0)
    return w, h


def archive_member(path) -> io.BytesIO | None:
    """The bytes of `path` when it names a member of an archive ("<archive>::<member>", a zip or a tar:
    geovote.archives), read in place; None for any other path. ImageFailure with the reason when the
    member cannot be read (a bad CRC, a truncated archive)."""
    from geovote.archives import ArchiveError, read_member, split_path

    where = split_path(path)
    if where is None:
        return None
    try:
        return io.BytesIO(read_member(*where))
    except ArchiveError as e:
        raise ImageFailure(str(e)) from None


def open_rgb(path: str | Path, min_side_px: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` as RGB (a file, a stream, or a member of an archive read in place). JPEGs larger
    than needed are decoded at 1/2, 1/4 or 1/8 scale (PIL draft), keeping both sides >= `min_side_px`,
    which is what the model input needs anyway. Pillow's warnings (odd EXIF, truncated metadata) are not
    printed: what matters becomes the failure's reason."""
    member = archive_member(path)
    if member is not None:
        path = member
    else:
        regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # incl. DecompressionBombWarning: we apply our own limit
            img = Image.open(path)
            img.draft("RGB", (min_side_px, min_side_px))  # no-op for non-JPEGs
            w, h = img.size
            if w * h > max_pixels:
                raise ImageFailure(f"too large: {w}x{h} pixels (limit {max_pixels:,})")
            img.load()
            return to_rgb(img)
    except ImageFailure:
        raise
    except FileNotFoundError:
        raise ImageFailure("file not found") from None
    except Image.DecompressionBombError as e:
        raise ImageFailure(f"too large: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageFailure("not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise ImageFailure(f"unreadable: {e}") from None
