"""Model families; importing registers them."""

from . import freqnet, peers  # noqa: F401  (registers the peer detectors)
from .ferretnet import FerretConfig, FerretNet, from_config

__all__ = ["FerretConfig", "FerretNet", "from_config"]
