"""Errors the CLI turns into one clear line and exit code 2."""


class CycleOptunaError(Exception):
    """Base of every error caused by the user's input or environment (exit code 2)."""


class ConfigError(CycleOptunaError):
    """The study file is invalid."""


class DataError(CycleOptunaError):
    """The data file or its contents are invalid."""


class StorageError(CycleOptunaError):
    """The storage URL is invalid, unreachable, or holds an incompatible study."""


class TrainingError(CycleOptunaError):
    """Training gave no usable model (it diverged); the CLI exits 1 for it, not 2."""
