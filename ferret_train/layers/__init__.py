"""Reusable blocks."""

from .lpd import LPD, lpd_fast, lpd_reference

__all__ = ["LPD", "lpd_fast", "lpd_reference"]
