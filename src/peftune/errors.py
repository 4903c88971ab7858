"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class PeftuneError(Exception):
    """Bad input from the user: a file, column, flag or value, named in the message."""


class ConfigError(PeftuneError):
    """An invalid config key, type or value."""


class DataError(PeftuneError):
    """A dataset that cannot be used as given."""


class ModelError(PeftuneError):
    """A model or adapter that cannot be loaded as given."""


class Diverged(PeftuneError):
    """The loss became NaN or infinite, or the gradient norm exploded."""


class Interrupted(PeftuneError):
    """Training stopped on a signal after saving a checkpoint."""
