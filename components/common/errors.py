"""The project's own errors: each is bad input or a fault the user can fix, and its message
says what is wrong and what to do. The command lines end any of them in one line and exit
status 2 (`components.common.cli.run`); any other exception is a bug and keeps its traceback."""


class DataError(ValueError):
    """The data cannot be used; the message names what is wrong and where."""


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and what would do."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or not one of this project's; the message says what to do."""


class TrackingError(RuntimeError):
    """ClearML is configured but cannot be used; the message says what to do."""


class WriteError(OSError):
    """A file could not be written (a full disk, a read-only folder); the message names it and why."""


class TrainingError(RuntimeError):
    """A process of a data-parallel training job failed; the message names which, why, and what to do."""


INPUT_ERRORS = (DataError, ConfigError, CheckpointError, TrackingError, WriteError, TrainingError)


def first_line(error: BaseException | str) -> str:
    """The first line of an error's message (its type's name when it has none), to quote inside
    one of ours."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
