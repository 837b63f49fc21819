"""Typed errors raised while reading or validating GGUF files."""

from __future__ import annotations


class GGUFError(ValueError):
    """Base class: a GGUF file is malformed or unsupported."""


class TruncatedError(GGUFError):
    pass


class BadMagicError(GGUFError):
    pass


class UnsupportedVersionError(GGUFError):
    pass


class BadValueTypeError(GGUFError):
    pass


class NestedArrayError(GGUFError):
    pass


class BadStringError(GGUFError):
    pass


class DuplicateKeyError(GGUFError):
    pass


class DuplicateTensorError(GGUFError):
    pass


class AlignmentError(GGUFError):
    pass


class UnknownTensorTypeError(GGUFError):
    pass


class DimensionError(GGUFError):
    """Bad dimension count, a negative or overflowing shape, or a row not a whole number of blocks."""


class TensorRangeError(GGUFError):
    """A tensor's data lies outside the data section, overlaps another or is misaligned."""


class CountError(GGUFError):
    """A count or length is larger than the file could hold."""
