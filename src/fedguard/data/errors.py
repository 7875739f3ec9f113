"""Errors raised by the data layer.

Two types, one per boundary: :class:`DataError` when a data set cannot be loaded as asked (a missing
file, a missing key, an unsupported layout, an unknown name), :class:`PartitionError` when a data
set cannot be split over clients as asked (too few samples, a parameter out of range). Both are
``ValueError`` subclasses, so callers that only care about "bad input" can catch that.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data set could not be loaded: the message names the source and what is wrong with it."""


class PartitionError(ValueError):
    """A data set could not be split over clients: the message names the parameter and its range."""
