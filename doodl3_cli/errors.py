"""The exception family of doodl3.

Library code raises these, and the CLI turns each into one line on stderr, starting
with ``error:``, and the exit code in the class's `exit_code`:

- 1 for a failure at run time: a file in the run folder, a checkpoint or
  doodl3.toml cannot be used, or an analysis cannot run on the data;
- 2 for a usage error (`UsageError`): an option or argument value is malformed, out
  of range, or names a trajectory, parameter, device or folder that does not exist.
  Typer exits 2 as well for the usage errors that it detects itself.

Every message names the file, group or option at fault, what was expected, what was
found and what to do next.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path



class Doodl3Error(Exception):
    """Base class of every error that doodl3 reports to the user."""

    exit_code = 1


class UsageError(Doodl3Error):
    """An option or argument value is invalid, so the command line must change."""

    exit_code = 2


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


def with_run_path(message: str, run: Path | None) -> str:
    """Replace the placeholder RUN in the commands that a message suggests with the run folder itself."""
    if run is None:
        return message
    return re.sub(r"(`doodl3 [a-z]+ )RUN\b", lambda m: m.group(1) + shlex.quote(str(run)), message)
