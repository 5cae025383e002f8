"""The exception family of doodl3.

Library code raises these; the CLI turns each into one line on stderr and exit code 1.
Every message names the file, group or option at fault and what to do next.
"""


class Doodl3Error(Exception):
    """Base class of every error that doodl3 reports to the user."""


class RunFolderError(Doodl3Error):
    """The run folder is missing, or a required file in it is missing."""


class ConfigError(Doodl3Error):
    """doodl3.toml is invalid or names a factory that cannot be imported or called."""


class ArtifactError(Doodl3Error):
    """An HDF5 artifact is missing, unreadable, or of an unsupported schema."""


class CheckpointError(Doodl3Error):
    """A checkpoint cannot be loaded or does not match the model layout."""


class EvaluationError(Doodl3Error):
    """The model could not be evaluated at a parameter point."""


class AnalysisError(Doodl3Error):
    """An analysis stage cannot run on the given data."""
