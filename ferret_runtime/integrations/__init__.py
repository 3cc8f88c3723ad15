"""Bridges to other frameworks, each imported on use (its framework is an optional extra)."""
