"""Subcommands of ``ferret`` that need only the base install."""
