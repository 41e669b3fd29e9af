"""Chart images: read from the artifact store, bounded in size before the model sees them.

The vision encoder's cost grows with the pixel count (Qwen2.5-VL makes one token per 28x28
pixels), so a 1000x750 chart is downscaled to a bound first; together with the model's
image-token cap this bounds the prompt."""

from __future__ import annotations

import io

MAX_IMAGE_BYTES = 32 * 1024 * 1024  # a chart PNG is ~100 KB; anything this large is not one


class UnreadableImage(ValueError):
    """The chart's image cannot be used (missing, not an image, too large); one line."""


def read_uri(uri: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise UnreadableImage(f"cannot read {uri}: {type(exc).__name__}: {exc}"[:200]) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise UnreadableImage(f"{uri} is larger than {MAX_IMAGE_BYTES} bytes")
    return data


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


def load_chart_png(uri: str, max_side: int) -> tuple[bytes, int, int]:
    return bounded_png(read_uri(uri), max_side)
