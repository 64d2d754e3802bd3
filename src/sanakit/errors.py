"""User-facing errors: one line naming the thing and the fix; the CLI maps them to exit codes."""


class SanakitError(Exception):
    """An error caused by the user's input or environment, never by a bug in sanakit.

    The CLI prints ``str(err)`` as a single line (prefixed with ``error:``) and exits with
    ``exit_code``; no traceback is shown.
    """

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(" ".join(message.split()))  # always one line
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(SanakitError):
    """A config file, key, value or override is invalid."""


class DataError(SanakitError):
    """A dataset root, file or metadata is missing or unusable."""


class ArtifactError(SanakitError):
    """A derived artifact (null embedding, cache entry) cannot be built or stored."""


class CheckpointError(SanakitError):
    """A checkpoint is missing, incomplete, corrupt or incompatible."""


class ModelLoadError(SanakitError):
    """A model (text encoder, autoencoder, transformer) cannot be loaded offline."""
