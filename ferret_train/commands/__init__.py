"""Subcommands of ``ferret`` that need PyTorch."""

REQUIRES = ("torch",)  # the 'train' extra; ferret_runtime.cli lists a command as unavailable without it
