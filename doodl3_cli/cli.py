"""The `doodl3` command line: parse and validate options, then call one library function.

Errors from the library (`Doodl3Error`) become one line on stderr and exit code 1;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from doodl3_cli import __version__
from doodl3_cli.errors import Doodl3Error
from doodl3_cli.runfolder import RunFolder

app = typer.Typer(
    name="doodl3",
    help="Extract the global dynamics of neural-network training from checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

log = logging.getLogger("doodl3_cli")


class _State:
    debug = False


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def _configure_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("doodl3_cli")
    root.handlers.clear()
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=_stderr(), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"doodl3 {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    _State.debug = debug
    _configure_logging(verbose)


@contextlib.contextmanager
def _reported_errors() -> Iterator[None]:
    """Turn a Doodl3Error into one line on stderr and exit code 1 (unless --debug)."""
    try:
        yield
    except Doodl3Error as exc:
        if _State.debug:
            raise
        # Messages name TOML sections such as [model], which rich would take for markup tags.
        _stderr().print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)
        raise typer.Exit(code=1) from None


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[str], Callable[[int, int], None]]]:
    """Yield a factory of progress callbacks: a rich bar on a terminal, throttled log lines otherwise."""
    if sys.stderr.isatty():
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=_stderr(), transient=False,
        ) as bar:
            def factory(description: str) -> Callable[[int, int], None]:
                task = bar.add_task(description, total=None)
                return lambda done, total: bar.update(task, completed=done, total=total)

            yield factory
        return

    def plain_factory(description: str) -> Callable[[int, int], None]:
        last = [0.0]

        def update(done: int, total: int) -> None:
            now = time.monotonic()
            if done == total or now - last[0] >= 5.0:
                last[0] = now
                log.info("%s: %d/%d", description, done, total)

        return update

    yield plain_factory


def _run_folder(path: Path) -> RunFolder:
    run = RunFolder(path)
    run.require_exists()
    return run


def _parse_pairs(values: list[str], option: str) -> dict[str, object]:
    pairs: dict[str, object] = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=option)
        try:
            value: object = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = text
        pairs[key] = value
    return pairs


RunArgument = typer.Argument(
    ..., metavar="RUN", help="The run folder that holds doodl3.toml and the artifacts.", file_okay=False
)


@app.command()
def record(
    run: Path = typer.Argument(..., metavar="RUN", help="The run folder; created when missing.", file_okay=False),
    source: Path = typer.Option(..., "--from", help="Folder of .pt/.pth state_dict checkpoints, one training run."),
    trajectory: Optional[str] = typer.Option(None, "--trajectory", help="Name of the trajectory (default: the folder name)."),
    attr: list[str] = typer.Option([], "--attr", help="Run attribute KEY=VALUE, e.g. seed=0; repeatable."),
) -> None:
    """Ingest a folder of checkpoints into RUN/trajectory.h5 as one trajectory."""
    from doodl3_cli.record import record_directory

    attrs = _parse_pairs(attr, "--attr")
    with _reported_errors(), _progress() as progress:
        result = record_directory(run, source, trajectory=trajectory, attrs=attrs, progress=progress("recording"))
    typer.echo(
        f"{result.trajectory}: {result.added} checkpoints added, {result.skipped} already recorded, "
        f"{result.total} in {RunFolder(run).trajectory}"
    )


def _parse_extent(extent: Optional[str]) -> Optional[tuple[float, float, float, float]]:
    if extent is None:
        return None
    try:
        values = tuple(float(v) for v in extent.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not values[0] < values[1] or not values[2] < values[3]:
        raise typer.BadParameter(
            f"expected ALPHA_MIN,ALPHA_MAX,BETA_MIN,BETA_MAX with min < max, got {extent!r}", param_hint="--extent"
        )
    return values  # type: ignore[return-value]


def _sample_options(resolution: int, margin: float, center: Optional[str], extent: Optional[str], device: Optional[str], points_per_pass: int):
    from doodl3_cli.sample import SampleOptions

    return SampleOptions(
        resolution=resolution, margin=margin, center=center, extent=_parse_extent(extent),
        device=device, points_per_pass=points_per_pass,
    )


def _positive_or_none(value: Optional[float]) -> Optional[float]:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be a positive number, got {value!r}")
    return value


ResolutionOption = typer.Option(41, "--resolution", min=2, max=4001, help="Grid points per axis of the slice.")
MarginOption = typer.Option(0.25, "--margin", min=0.0, help="Extent beyond the trajectories, as a fraction of their span.")
CenterOption = typer.Option(None, "--center", help="Slice center TRAJECTORY or TRAJECTORY:INDEX (default: final state of the lowest-loss run).")
ExtentOption = typer.Option(None, "--extent", help="Grid extent ALPHA_MIN,ALPHA_MAX,BETA_MIN,BETA_MAX in slice coordinates.")
DeviceOption = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default: [evaluation].device of doodl3.toml).")
PointsOption = typer.Option(64, "--points-per-pass", min=1, help="Grid points evaluated in one vectorised forward pass.")
MinPersistenceOption = typer.Option(None, "--min-persistence", min=0.0, help="Persistence, in loss units, above which a feature is significant (default: 5% of the median depth, median minus minimum, of the finite losses).")
TauOption = typer.Option(None, "--tau", callback=_positive_or_none, help="Time of the gradient-flow map, in slice units squared per loss unit (default: chosen from the curvature at the minima).")


@app.command()
def sample(
    run: Path = RunArgument,
    resolution: int = ResolutionOption,
    margin: float = MarginOption,
    center: Optional[str] = CenterOption,
    extent: Optional[str] = ExtentOption,
    device: Optional[str] = DeviceOption,
    points_per_pass: int = PointsOption,
) -> None:
    """Sample the loss landscape on the PCA plane of the checkpoints into RUN/landscape.h5."""
    from doodl3_cli.sample import run_sample

    options = _sample_options(resolution, margin, center, extent, device, points_per_pass)
    with _reported_errors(), _progress() as progress:
        path = run_sample(_run_folder(run), options, progress=progress("sampling the landscape"))
    typer.echo(f"wrote {path}")


@app.command()
def topology(run: Path = RunArgument, min_persistence: Optional[float] = MinPersistenceOption) -> None:
    """Compute persistent homology, significant minima and basins of each slice into RUN/topology.h5."""
    from doodl3_cli.topology import run_topology

    with _reported_errors():
        path = run_topology(_run_folder(run), min_persistence=min_persistence)
    typer.echo(f"wrote {path}")


@app.command()
def dynamics(run: Path = RunArgument, tau: Optional[float] = TauOption) -> None:
    """Compute the gradient flow, Morse graph and trajectory diagnostics into RUN/dynamics.h5."""
    from doodl3_cli.dynamics.stage import run_dynamics

    with _reported_errors():
        path = run_dynamics(_run_folder(run), tau=tau)
    typer.echo(f"wrote {path}")


@app.command()
def report(run: Path = RunArgument) -> None:
    """Write RUN/report.html: one offline page with every figure."""
    from doodl3_cli.report.page import write_report

    with _reported_errors():
        path = write_report(_run_folder(run))
    typer.echo(f"wrote {path}")


@app.command("run")
def run_command(
    run: Path = RunArgument,
    force: bool = typer.Option(False, "--force", help="Rerun every stage, even those that are up to date."),
    resolution: int = ResolutionOption,
    margin: float = MarginOption,
    center: Optional[str] = CenterOption,
    extent: Optional[str] = ExtentOption,
    device: Optional[str] = DeviceOption,
    points_per_pass: int = PointsOption,
    min_persistence: Optional[float] = MinPersistenceOption,
    tau: Optional[float] = TauOption,
) -> None:
    """Run every stage whose artifact is missing or computed from other inputs."""
    from doodl3_cli.pipeline import PipelineOptions, run_pipeline

    options = PipelineOptions(
        sample=_sample_options(resolution, margin, center, extent, device, points_per_pass),
        min_persistence=min_persistence, tau=tau,
    )
    with _reported_errors(), _progress() as progress:
        ran = run_pipeline(
            _run_folder(run), options, force=force, progress=progress,
            on_stage=lambda stage, path: typer.echo(f"{stage}: wrote {path}"),
        )
    if not ran:
        typer.echo("every stage is up to date")


@app.command()
def demo(
    run: Path = typer.Argument(..., metavar="RUN", help="A new run folder for the demo.", file_okay=False),
    seeds: int = typer.Option(5, "--seeds", min=1, help="Runs per learning rate, with seeds 0..N-1."),
    steps: int = typer.Option(300, "--steps", min=2, help="Full-batch gradient steps per run."),
    record_every: int = typer.Option(5, "--record-every", min=1, help="Steps between recorded checkpoints."),
    resolution: int = ResolutionOption,
) -> None:
    """Train an MLP ensemble on the bundled digits while recording, then run every stage."""
    from doodl3_cli.demo import DemoOptions, prepare_demo_run
    from doodl3_cli.pipeline import PipelineOptions, run_pipeline
    from doodl3_cli.sample import SampleOptions

    options = DemoOptions(seeds=list(range(seeds)), steps=steps, record_every=record_every)
    started = time.monotonic()
    with _reported_errors(), _progress() as progress:
        folder = prepare_demo_run(run, options, progress=progress("training the ensemble"))
        typer.echo(f"record: wrote {folder.trajectory}")
        run_pipeline(
            folder, PipelineOptions(sample=SampleOptions(resolution=resolution)), progress=progress,
            on_stage=lambda stage, path: typer.echo(f"{stage}: wrote {path}"),
        )
    typer.echo(f"demo finished in {time.monotonic() - started:.0f} s; open {folder.report.resolve()}")


def main() -> None:
    """Entry point of the `doodl3` console script."""
    app()
