"""The plugin's anomalib models. Importing this module registers them with anomalib's CLI and
``anomalib.models.get_model`` (each is a direct subclass of ``AnomalibModule``)."""

from .aa_clip import AACLIP
from .adaclip import AdaCLIP
from .anomalyclip import AnomalyCLIP
from .bayes_pfl import BayesPFL
from .bgad import BGAD
from .clip_baseline import CLIPBaseline
from .coop import CoOp
from .glocalclip import GlocalCLIP
from .m3dm import M3DM
from .vand import Vand

__all__ = ["AACLIP", "AdaCLIP", "AnomalyCLIP", "BGAD", "BayesPFL", "CLIPBaseline", "CoOp", "GlocalCLIP", "M3DM", "Vand"]
