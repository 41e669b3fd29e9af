"""Chart images: read from the artefact root only (a size cap and a PNG check first), then bounded
in pixels before the model sees them.

The vision encoder's cost grows with the pixel count (Qwen2.5-VL makes one token per 28x28
pixels), so a 1000x750 chart is downscaled to a bound first; together with the model's
image-token cap this bounds the prompt."""

from __future__ import annotations

import io

from libs.common.artefacts import ArtefactRefused, ArtefactRoot


class UnreadableImage(ValueError):
    """The chart's image cannot be used (outside the artefact root, missing, not a PNG, too large,
    not an image); one line."""


def read_uri(uri: str, root: ArtefactRoot) -> bytes:
    """The chart's PNG bytes, read only from the artefact root (libs/common/artefacts.py)."""
    try:
        return root.read_png(uri)
    except ArtefactRefused as exc:
        raise UnreadableImage(exc.reason) from None


def bounded_png(data: bytes, max_side: int) -> tuple[bytes, int, int]:
    """The image as RGB PNG, no side longer than ``max_side``; returns (png, width, height)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"not a readable image: {type(exc).__name__}: {exc}"[:200]) from None
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, "PNG")
    return out.getvalue(), rgb.width, rgb.height


def load_chart_png(uri: str, max_side: int, root: ArtefactRoot) -> tuple[bytes, int, int]:
    return bounded_png(read_uri(uri, root), max_side)
