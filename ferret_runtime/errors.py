"""Named exceptions: every message says what was received and what was expected."""


class FerretError(Exception):
    """Base class for the toolkit's user-facing errors (the CLI prints them without a traceback)."""


class ImageError(FerretError):
    """An input image that cannot be read or decoded."""


class CheckpointError(FerretError):
    """A checkpoint that cannot be loaded into the model it describes."""


class ConfigError(FerretError):
    """An unknown or invalid option, model name or configuration key."""
