"""Make a clean render look photographed: rotation, perspective, blur, noise, JPEG artefacts."""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageFilter

from docpipe.config import DegradationConfig


def _perspective_coefficients(src: list[tuple[float, float]], dst: list[tuple[float, float]]) -> list[float]:
    """The 8 coefficients PIL's PERSPECTIVE transform needs to map ``dst`` corners onto ``src``."""
    rows = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.array(rows, float), np.array(src, float).reshape(8)).tolist()


def _perspective(image: Image.Image, rng: random.Random, strength: float, fill: tuple) -> Image.Image:
    w, h = image.size
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    moved = [(x + rng.uniform(-strength, strength) * w, y + rng.uniform(-strength, strength) * h) for x, y in corners]
    coefficients = _perspective_coefficients(corners, moved)
    return image.transform(
        image.size, Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BICUBIC, fillcolor=fill
    )


def degrade(image: Image.Image, rng: random.Random, config: DegradationConfig) -> tuple[bytes, list[str]]:
    """The degraded image as JPEG bytes, and the effects applied (for the record)."""
    applied = []
    background = tuple(max(0, c - rng.randint(30, 90)) for c in image.getpixel((0, 0)))
    if rng.random() < config.perspective:
        image = _perspective(image, rng, config.perspective_strength, background)
        applied.append("perspective")
    if rng.random() < config.rotate:
        angle = rng.uniform(-config.max_rotation_deg, config.max_rotation_deg)
        image = image.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=background)
        applied.append(f"rotate{angle:+.1f}")
    if rng.random() < config.blur:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, config.max_blur_radius)))
        applied.append("blur")
    if rng.random() < config.noise:
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0, config.noise_sigma, (image.height, image.width, 1))
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))
        applied.append("noise")
    quality = rng.randint(*config.jpeg_quality)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    applied.append(f"jpeg{quality}")
    return buffer.getvalue(), applied
