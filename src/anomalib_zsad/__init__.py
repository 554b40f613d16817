"""anomalib-zsad: CLIP-based zero-shot anomaly detection models for anomalib 2.x.

Importing this package is cheap; the models live in :mod:`anomalib_zsad.models`, which is
imported on demand (by anomalib's model registry through the import hook in
:mod:`anomalib_zsad._register`, or by the user).
"""

__version__ = "0.1.0"
