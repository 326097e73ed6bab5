"""Checking a labelled document's image: it decodes fully, within limits, upright."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

from docpipe.config import DatasetConfig

ACCEPTED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
_EXIF_ORIENTATION = 0x0112


class ImageRejected(ValueError):
    """The image cannot be used; the message says why."""


@dataclass(frozen=True)
class CheckedImage:
    sha256: str  # of the bytes as they arrived: the document's identity
    extension: str
    width: int  # after EXIF orientation
    height: int
    upright: bytes | None  # re-encoded with EXIF orientation applied, or None where it already was


def check_image(data: bytes, limits: DatasetConfig) -> CheckedImage:
    """Decode ``data`` fully and apply EXIF orientation; ImageRejected says what is wrong."""
    digest = hashlib.sha256(data).hexdigest()
    if len(data) > limits.max_image_bytes:
        raise ImageRejected(f"{len(data)} bytes, over the limit of {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise ImageRejected(f"format {image.format} is not one of {sorted(ACCEPTED_FORMATS)}")
            pixels = image.width * image.height
            if pixels > limits.max_image_pixels:  # checked before decoding: a decompression bomb stops here
                raise ImageRejected(f"{image.width}x{image.height} pixels, over the limit of {limits.max_image_pixels}")
            image.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's own guard, at open
        raise ImageRejected(f"decompression bomb refused: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(f"does not decode fully: {exc}") from exc
    if min(image.size) < limits.min_image_side:
        raise ImageRejected(f"{image.width}x{image.height} pixels, a side under {limits.min_image_side}")
    upright = None
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless: the rotation must not cost detail
        upright = buffer.getvalue()
    extension = "png" if upright else ACCEPTED_FORMATS[image.format or "PNG"]
    return CheckedImage(digest, extension, image.width, image.height, upright)
