"""The exception types of :mod:`anomalib_zsad.data`.

Kept in their own dependency-free module so the demo generator and the validators can raise them
without importing anomalib (which takes ~10 s to import).
"""


class DatasetError(ValueError):
    """A data set is missing, empty, inconsistent or unreadable.

    Subclasses :class:`ValueError` so generic callers still catch it; the message always names
    the offending file or folder and says what to do about it.
    """


class CorruptFileError(DatasetError):
    """An image or mask file is damaged: not an image, truncated, or its decoder reported corrupt data.

    A :class:`DatasetError` (catch either); the message names the file and what the decoder said.
    """
