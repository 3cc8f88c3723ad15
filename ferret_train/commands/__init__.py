"""Subcommands of ``ferret`` that need PyTorch."""
