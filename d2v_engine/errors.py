"""User-facing errors: printed as one line by the entry points, never as a traceback wall."""


class D2VError(Exception):
    """Base class of every error caused by the user's input (config, data, checkpoints)."""


class ConfigError(D2VError):
    """A config file, key or value is wrong; the message names the key and what is allowed."""


class DataError(D2VError):
    """A data path, manifest or file is missing, empty or unreadable; the message names the file."""


class CheckpointError(D2VError):
    """No usable checkpoint where one is required, or a checkpoint that does not fit the run."""


class TrainingError(D2VError):
    """The run cannot go on: updates non-finite too many times in a row, or collapsed targets."""
