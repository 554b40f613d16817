"""The plugin's anomalib models. Importing this module registers them with anomalib's CLI and
``anomalib.models.get_model`` (each is a direct subclass of ``AnomalibModule``)."""

from .anomalyclip import AnomalyCLIP

__all__ = ["AnomalyCLIP"]
