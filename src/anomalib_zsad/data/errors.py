"""The one exception type of :mod:`anomalib_zsad.data`.

Kept in its own dependency-free module so the demo generator and the validators can raise it
without importing anomalib (which takes ~10 s to import).
"""


class DatasetError(ValueError):
    """A data set is missing, empty, inconsistent or unreadable.

    Subclasses :class:`ValueError` so generic callers still catch it; the message always names
    the offending file or folder and says what to do about it.
    """
