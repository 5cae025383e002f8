"""`doodl3 demo`: train a real ensemble on scikit-learn's bundled digits while recording.

The ensemble is a small MLP trained by full-batch gradient descent from several
seeds at two learning rates: a moderate one that descends with a few early spikes
and a high one, far above 2 / sharpness, at which the loss rises between many
recorded checkpoints. Full-batch descent keeps each run deterministic given its seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from doodl3_cli import zoo
from doodl3_cli.errors import RunFolderError
from doodl3_cli.record import Recorder
from doodl3_cli.runfolder import RunFolder

log = logging.getLogger(__name__)

DEMO_CONFIG = """\
# Written by `doodl3 demo`: how doodl3 rebuilds the model, the data and the loss.
[model]
factory = "doodl3_cli.zoo:mlp"
kwargs = {{ in_features = 64, hidden = [{hidden}], classes = 10 }}

[data]
factory = "doodl3_cli.zoo:digits"
kwargs = {{ split = "train" }}

[loss]
factory = "torch.nn.functional:cross_entropy"

[evaluation]
batch_size = 2048
device = "cpu"
"""


@dataclass
class DemoOptions:
    """Settings of the demo ensemble.

    Attributes
    ----------
    seeds : list of int
        One run per seed and learning rate.
    learning_rates : list of float
        Full-batch gradient-descent step sizes.
    steps : int
        Gradient steps per run.
    record_every : int
        Steps between recorded checkpoints (the first and last step are always recorded).
    hidden : list of int
        Hidden layer widths of the MLP.
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    learning_rates: list[float] = field(default_factory=lambda: [0.3, 1.2])
    steps: int = 300
    record_every: int = 5
    hidden: list[int] = field(default_factory=lambda: [64, 32])


def write_demo_config(run: RunFolder, options: DemoOptions) -> Path:
    """Write doodl3.toml for the demo's model, data and loss."""
    text = DEMO_CONFIG.format(hidden=", ".join(str(h) for h in options.hidden))
    run.config_path.write_text(text, encoding="utf-8")
    return run.config_path


def train_ensemble(run: RunFolder, options: DemoOptions, *, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Train one MLP per (learning rate, seed) on the digits training split, recording as it trains.

    Returns
    -------
    list of str
        The trajectory names, e.g. ``"lr0.3-seed0"``.
    """
    inputs, targets = zoo.digits("train")
    names = []
    total = len(options.learning_rates) * len(options.seeds)
    for lr in options.learning_rates:
        for seed in options.seeds:
            name = f"lr{lr:g}-seed{seed}"
            torch.manual_seed(seed)
            model = zoo.mlp(64, options.hidden, 10)
            optimizer = torch.optim.SGD(model.parameters(), lr=lr)

            with Recorder(run.path, model, trajectory=name, attrs={"seed": seed, "learning_rate": lr, "optimizer": "full-batch SGD"}) as recorder:
                for step in range(options.steps + 1):
                    loss = F.cross_entropy(model(inputs), targets)
                    if step % options.record_every == 0 or step == options.steps:
                        recorder.record(step, epoch=float(step), loss=loss.item(), lr=lr)
                    if step == options.steps:
                        break
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()

            log.info("trained %s: final train loss %.4f", name, loss.item())
            names.append(name)
            if progress is not None:
                progress(len(names), total)
    return names


def prepare_demo_run(path: Path, options: DemoOptions, *, progress=None) -> RunFolder:
    """Create the run folder, write doodl3.toml and record the trained ensemble.

    Raises
    ------
    RunFolderError
        When the folder already contains a trajectory.h5, a doodl3.toml other than
        the demo's, or a folder named doodl3.toml: the demo never overwrites the
        user's work.
    """
    run = RunFolder(path)
    if run.trajectory.exists():
        raise RunFolderError(
            f"{run.trajectory}: already exists; pass a new folder to `doodl3 demo` or run "
            f"`doodl3 run {run.path}` to reanalyse it"
        )
    if run.config_path.is_dir():
        raise RunFolderError(
            f"{run.config_path}: is a folder, not a file; pass a new folder to `doodl3 demo`"
        )
    demo_config = DEMO_CONFIG.format(hidden=", ".join(str(h) for h in options.hidden))
    if run.config_path.exists() and run.config_path.read_text(encoding="utf-8", errors="replace") != demo_config:
        raise RunFolderError(
            f"{run.config_path}: already exists and is not the demo's configuration; pass a new folder to `doodl3 demo`"
        )
    run.path.mkdir(parents=True, exist_ok=True)
    write_demo_config(run, options)
    train_ensemble(run, options, progress=progress)
    return run
