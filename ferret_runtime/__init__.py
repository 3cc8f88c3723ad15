"""Torch-free FerretNet inference: preprocessing, backends and the ``Detector`` API."""

__version__ = "0.1.0"

from .detector import Detector, Result  # noqa: E402
from .errors import CheckpointError, ConfigError, FerretError, ImageError  # noqa: E402
from .preprocess import MEAN, STD, Preprocess  # noqa: E402

__all__ = ["Detector", "Result", "Preprocess", "MEAN", "STD",
           "FerretError", "ImageError", "CheckpointError", "ConfigError", "__version__"]
