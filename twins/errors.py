"""The project's errors. Library code raises them; only `train.py`, `export.py` and `interpret.py` turn
them into a one-line message (`label: message`) and an exit status, so the same calls work in a notebook."""


class TwinsError(Exception):
    """Something the user can fix: the message says what and where."""
    label = "Error"


class DataError(TwinsError):
    """Bad input data: the message says which file and which ids or paths."""
    label = "Data error"


class CheckpointError(TwinsError):
    """A checkpoint that is missing, unreadable, foreign, or does not fit the run; an --out that cannot be written."""
    label = "Checkpoint error"


class DivergedError(TwinsError):
    """The training loss became NaN or infinite: the run cannot go on."""
    label = "Training stopped"
