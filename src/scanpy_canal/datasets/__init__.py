"""Continual streams from data that ship with installed packages, and a seeded synthetic generator."""

from ._pbmc import pbmc68k_stream
from ._stream import Stream
from ._synthetic import synthetic_stream

__all__ = ["Stream", "pbmc68k_stream", "synthetic_stream"]
