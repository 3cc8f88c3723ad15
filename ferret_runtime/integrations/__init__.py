"""Bridges to other frameworks, each imported on use (its framework is an optional extra).

``ray``: Ray Data's ``map_batches`` (an alias of :mod:`ferret_runtime.scan.ray`, where a scan's Ray path lives).
"""
