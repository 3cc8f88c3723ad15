"""Subcommands of ``ferret`` that need the export extra."""
