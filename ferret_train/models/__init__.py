"""Model families; importing registers them."""

from .ferretnet import FerretConfig, FerretNet, from_config

__all__ = ["FerretConfig", "FerretNet", "from_config"]
