"""One exception family, so CLIs and the dashboard can turn any expected failure into one clear line."""


class CaptionScopeError(ValueError):
    """Base of every error CaptionScope raises on purpose; the message is meant for the user."""


class DataError(CaptionScopeError):
    """A dataset folder, caption file or split list is missing or malformed."""


class ImageError(CaptionScopeError):
    """An image cannot be decoded, is too large, or is not an image at all."""


class CheckpointError(CaptionScopeError):
    """A checkpoint is not ours, is corrupt, or its metadata disagrees with its weights."""


class ConfigError(CaptionScopeError):
    """A setting (decoding, training, encoder choice) is out of range or inconsistent."""
