"""A small PNG encoder for opaque RGB charts.

Pillow's encoder (what ``savefig`` uses) spends ~40 ms on a 1200x900 chart choosing
per-row filters; charts are mostly flat colour, so no filter at zlib level 3
gives smaller files in a third of the time, with the very same pixels.
Dropping the alpha channel of Agg's RGBA buffer is left to Pillow's packer: a
strided numpy copy of every third byte costs as much as the compression.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # PNG spec (ISO/IEC 15948) section 5.2
COLOR_TYPE_RGB = 2
FILTER_NONE = 0
ZLIB_LEVEL = 3


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """``pixels``: (height, width, 3 or 4) uint8; alpha is dropped (charts are opaque)."""
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4) or pixels.dtype != np.uint8:
        raise ValueError(f"expected (h, w, 3|4) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    h, w = pixels.shape[:2]
    raw = np.empty((h, w * 3 + 1), dtype=np.uint8)
    raw[:, 0] = FILTER_NONE
    if pixels.shape[2] == 4:
        rgba = np.ascontiguousarray(pixels)
        rgb = Image.frombuffer("RGBA", (w, h), rgba, "raw", "RGBA", 0, 1).tobytes("raw", "RGB")
        raw[:, 1:] = np.frombuffer(rgb, dtype=np.uint8).reshape(h, w * 3)
    else:
        raw[:, 1:].reshape(h, w, 3)[:] = pixels
    header = struct.pack(">IIBBBBB", w, h, 8, COLOR_TYPE_RGB, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), ZLIB_LEVEL))
        + _chunk(b"IEND", b"")
    )
