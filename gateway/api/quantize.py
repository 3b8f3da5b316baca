"""Quantized embeddings (``embedding_type`` on ``/v1/embeddings``), done once at the edge: the
vectors travel the queue as float32 and are quantized for the client.

The precisions and their arithmetic are sentence-transformers' ``quantize_embeddings``
(``sentence_transformers/quantization.py``):

- ``int8`` / ``uint8``: each component mapped onto 256 steps over a calibration range
  ``[low, high]`` (per model, ``embedding_task.quantization_range``; default ``[-1, 1]``, the
  range of L2-normalised vectors): ``step = (high - low) / 255``,
  ``uint8 = clip(floor((x - low) / step), 0, 255)``, ``int8 = uint8 - 128``;
- ``binary`` / ``ubinary``: the sign bits (``x > 0``) packed 8 per byte, first component in the
  most significant bit (``numpy.packbits``): ``dim / 8`` values; ``binary`` is the packed byte
  minus 128 (int8), ``ubinary`` the byte itself (uint8).
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np

from common.protocol import ModelAdvert

EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary"]
#: The calibration range of a model that advertises none: that of L2-normalised vectors.
DEFAULT_RANGE = [-1.0, 1.0]


def value_range(advert: ModelAdvert | None) -> list[float]:
    """The [low, high] a model's 8-bit embeddings are quantized over: its advertised
    ``quantization_range``, else :data:`DEFAULT_RANGE`."""
    return (advert.quantization_range if advert else None) or DEFAULT_RANGE


def quantize(vectors: np.ndarray, kind: EmbeddingType, value_range: list[float]) -> np.ndarray:
    """``vectors`` float32 [n, dim] -> int8 / uint8 [n, dim] (``int8``, ``uint8``) or
    [n, ceil(dim / 8)] (``binary``, ``ubinary``); ``value_range`` = [low, high] for the
    8-bit types. ``float`` returns the vectors unchanged. Raises ValueError for an unknown
    kind."""
    if kind == "float":
        return vectors
    if kind in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return (packed.astype(np.int16) - 128).astype(np.int8) if kind == "binary" else packed
    low, high = float(value_range[0]), float(value_range[1])
    steps = (high - low) / 255
    levels: np.ndarray = np.clip(np.floor((vectors.astype(np.float32) - low) / steps), 0, 255)
    if kind == "uint8":
        return levels.astype(np.uint8)
    if kind == "int8":
        return (levels - 128).astype(np.int8)
    raise ValueError(f"unknown embedding type {kind!r}")


def encode_rows(
    matrix: np.ndarray, kind: EmbeddingType, value_range: list[float], encoding_format: str
) -> list[Any]:
    """A per-token embedding float32 [rows, dim] for the client: each row as one vector of
    ``kind`` (:func:`quantize`), a list of numbers, or with ``encoding_format="base64"`` the
    base64 of its bytes (float32 little-endian, or the integers)."""
    out = quantize(matrix, kind, value_range)
    if encoding_format == "base64":
        out = np.ascontiguousarray(out, dtype="<f4" if kind == "float" else out.dtype)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in out]
    rows: list[Any] = out.tolist()
    return rows
