"""Errors the CLI turns into one clear line and exit code 2."""


class CycleOptunaError(Exception):
    """Base of every error caused by the user's input or environment (exit code 2). Its message
    is masked (redact.mask): the Python API raises it to callers that print it as it is."""

    def __init__(self, *args: object) -> None:
        from cycle_optuna.redact import mask

        super().__init__(*(mask(a) if isinstance(a, str) else a for a in args))


class ConfigError(CycleOptunaError):
    """The study file is invalid."""


class DataError(CycleOptunaError):
    """The data file or its contents are invalid."""


class StorageError(CycleOptunaError):
    """The storage URL is invalid, unreachable, or holds an incompatible study."""


class TrainingError(CycleOptunaError):
    """Training gave no usable model (it diverged); the CLI exits 1 for it, not 2."""
