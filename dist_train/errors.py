"""Errors that mean "the user's input is wrong", as opposed to a bug in dist-train.

The command line turns each into a one-line message and exit code 2, so that a bad config
or a broken shard is reported before any training work starts, naming what is at fault.
"""


class UserInputError(Exception):
    """Base class: the message names the culprit (a config key, a file, a shard key)."""


class ConfigError(UserInputError):
    """An unknown key, a value of the wrong type, or values that contradict each other."""


class DataError(UserInputError):
    """Missing, unreadable or malformed data: shard files, manifests, labels, images."""


class CheckpointError(UserInputError):
    """A checkpoint that is missing, incomplete, tampered with or of the wrong kind."""


class TrainingDiverged(UserInputError):
    """The training loss became NaN or infinite: settings (usually the LR) the run cannot train with."""
