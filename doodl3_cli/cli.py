"""The `doodl3` command line: parse and validate options, then call one library function.

Errors from the library (`Doodl3Error`) become one line on stderr and the exit code
of their class: 1 for failures at run time, 2 for usage errors (`UsageError`), 130
after Ctrl-C. `--debug` shows the traceback instead. When stderr is not a terminal
(a batch job's log file), every line is plain text without escape codes or carriage
returns.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.exceptions import TyperException

from doodl3_cli import __version__
from doodl3_cli.errors import Doodl3Error, with_run_path
from doodl3_cli.runfolder import DEVICE_PATTERN, RunFolder

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


def _print_error(message: str) -> None:
    """Print `message` as one ``error:`` line on stderr, in bold red only on a terminal."""
    line = " ".join(message.split())
    if sys.stderr.isatty():
        # Messages name TOML sections such as [model], which rich would take for markup tags.
        _stderr().print(f"[bold red]error:[/] {escape(line)}", markup=True, soft_wrap=True)
    else:
        sys.stderr.write(f"error: {line}\n")
        sys.stderr.flush()


@contextlib.contextmanager
def _reported_errors(run: Optional[Path] = None) -> Iterator[None]:
    """Turn an error into one line on stderr and its exit code, unless --debug re-raises it.

    A `Doodl3Error` exits with its class's code (1, or 2 for a `UsageError`), Ctrl-C
    with 130, and any other exception, which is a bug in doodl3, with 1. Typer's own
    exits and usage errors pass through unchanged.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, TyperException):
        raise
    except KeyboardInterrupt:
        _print_error("interrupted: what was written so far is kept; rerun the same command to resume or redo the stage")
        raise typer.Exit(code=130) from None
    except Doodl3Error as exc:
        if _State.debug:
            raise
        _print_error(with_run_path(str(exc), run))
        raise typer.Exit(code=exc.exit_code) from None
    except Exception as exc:  # a bug in doodl3 or in a library that it calls
        if _State.debug:
            raise
        _print_error(
            f"unexpected {type(exc).__name__}: {exc}; rerun with `doodl3 --debug ...` for the traceback "
            "and report it with the command line"
        )
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
    ..., metavar="RUN", help="The run folder that contains doodl3.toml and the artifacts.", file_okay=False
)


@app.command()
def record(
    run: Path = typer.Argument(..., metavar="RUN", help="The run folder; created when missing.", file_okay=False),
    source: Path = typer.Option(..., "--from", help="Folder of checkpoints of one training run (.pt, .pth, .bin, .ckpt, .safetensors files or checkpoint-N/ folders)."),
    trajectory: Optional[str] = typer.Option(None, "--trajectory", help="Name of the trajectory (default: the folder name)."),
    attr: list[str] = typer.Option([], "--attr", help="Run attribute KEY=VALUE, e.g. seed=0; repeatable; overrides hyper-parameters stored in the checkpoints."),
    order: str = typer.Option("auto", "--order", help="Training order: auto (stored step, else number in the file name, else stored epoch), step, name or mtime."),
    per_subfolder: bool = typer.Option(False, "--per-subfolder", help="Record each subfolder of --from as its own trajectory, named after it."),
    trust_checkpoints: bool = typer.Option(False, "--trust-checkpoints", help="Allow arbitrary unpickling (torch.load weights_only=False); only for files from a trusted source."),
    follow: bool = typer.Option(False, "--follow", help="Keep watching --from and record each checkpoint once it is complete; stop with Ctrl-C or --until-idle."),
    until_idle: Optional[str] = typer.Option(None, "--until-idle", help="With --follow: stop after this long without a new checkpoint, e.g. 90, 30s, 5m or 1h."),
    poll_interval: float = typer.Option(1.0, "--poll-interval", min=0.01, help="With --follow: seconds between two looks at --from."),
) -> None:
    """Ingest a folder of checkpoints into RUN/trajectory.h5, or follow one while training writes it."""
    from doodl3_cli.record import ORDERS

    attrs = _parse_pairs(attr, "--attr")
    if order not in ORDERS:
        raise typer.BadParameter(f"expected one of {', '.join(ORDERS)}, got {order!r}", param_hint="--order")
    if per_subfolder and trajectory is not None:
        raise typer.BadParameter("--per-subfolder names each trajectory after its subfolder; drop --trajectory", param_hint="--trajectory")
    if follow and (per_subfolder or order != "auto"):
        raise typer.BadParameter("--follow records one folder in the order checkpoints arrive; drop --per-subfolder and --order", param_hint="--follow")
    if until_idle is not None and not follow:
        raise typer.BadParameter("only applies with --follow", param_hint="--until-idle")
    idle_seconds = _parse_duration(until_idle, "--until-idle")

    if follow:
        _record_follow(run, source, trajectory, attrs, trust_checkpoints, poll_interval, idle_seconds)
        return
    from doodl3_cli.record import record_directory, record_subfolders

    with _reported_errors(run), _progress() as progress:
        if per_subfolder:
            results = record_subfolders(run, source, attrs=attrs, progress=progress("recording"), order=order, trust=trust_checkpoints)
        else:
            results = [record_directory(
                run, source, trajectory=trajectory, attrs=attrs, progress=progress("recording"), order=order,
                trust=trust_checkpoints,
            )]
    for result in results:
        typer.echo(
            f"{result.trajectory}: {result.added} checkpoints added, {result.skipped} already recorded, "
            f"{result.total} in {RunFolder(run).trajectory}"
        )


def _record_follow(run: Path, source: Path, trajectory: Optional[str], attrs: dict, trust: bool, poll_interval: float, until_idle: Optional[float]) -> None:
    from doodl3_cli.follow import record_follow

    with _reported_errors(run):
        result = record_follow(
            run, source, trajectory=trajectory, attrs=attrs, trust=trust, poll_interval=poll_interval,
            until_idle=until_idle, on_record=lambda item: typer.echo(f"recorded step {item.step} from {item.path}"),
        )
    typer.echo(
        f"{result.trajectory}: {result.added} checkpoints added, {result.skipped} already recorded, "
        f"{result.total} in {RunFolder(run).trajectory}"
    )
    for path, reason in result.failed.items():
        _print_error(f"{path}: not recorded ({reason})")
    if result.failed:
        raise typer.Exit(code=1)


_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_duration(text: Optional[str], option: str) -> Optional[float]:
    if text is None:
        return None
    number, unit = text.strip(), ""
    if number and number[-1] in "smh":
        number, unit = number[:-1], number[-1]
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise typer.BadParameter(f"expected a positive duration such as 90, 30s, 5m or 1h, got {text!r}", param_hint=option)
    return seconds


def _parse_extent(extent: Optional[str]) -> Optional[tuple[float, float, float, float]]:
    if extent is None:
        return None
    try:
        values = tuple(float(v) for v in extent.split(","))
    except ValueError:
        values = ()
    finite = len(values) == 4 and all(math.isfinite(v) for v in values)
    if not finite or not values[0] < values[1] or not values[2] < values[3]:
        raise typer.BadParameter(
            f"expected four finite numbers ALPHA_MIN,ALPHA_MAX,BETA_MIN,BETA_MAX with min < max, got {extent!r}",
            param_hint="--extent",
        )
    return values  # type: ignore[return-value]


def _sample_options(resolution: int, margin: float, center: Optional[str], extent: Optional[str], device: Optional[str], points_per_pass: int, **directions):
    from doodl3_cli.sample import SampleOptions

    return SampleOptions(
        resolution=resolution, margin=margin, center=center, extent=_parse_extent(extent),
        device=device, points_per_pass=points_per_pass, **directions,
    )


def _direction_options(method: str, runs: Optional[str], axes: Optional[str], directions_file: Optional[Path], line: Optional[str]) -> dict:
    """Check the cross-option rules of `sample` and split the comma-separated lists."""
    from doodl3_cli.sample import DIRECTION_METHODS

    if method not in DIRECTION_METHODS:
        raise typer.BadParameter(f"expected one of {', '.join(DIRECTION_METHODS)}, got {method!r}", param_hint="--directions")
    if (directions_file is not None) != (method == "file"):
        raise typer.BadParameter("--directions file and --directions-file PATH go together", param_hint="--directions-file")
    if runs is not None and method != "endpoints":
        raise typer.BadParameter("only applies with --directions endpoints", param_hint="--runs")
    if axes is not None and method != "axes":
        raise typer.BadParameter("only applies with --directions axes", param_hint="--axes")
    run_names = tuple(n.strip() for n in runs.split(",")) if runs is not None else None
    if run_names is not None and not 2 <= len(run_names) <= 3:
        raise typer.BadParameter(f"expected two or three trajectory names separated by commas, got {runs!r}", param_hint="--runs")
    # Axis names contain commas inside their brackets, so split only on commas outside brackets.
    axis_names = tuple(part.strip() for part in re.split(r",(?![^\[]*\])", axes)) if axes is not None else None
    if axis_names is not None and len(axis_names) != 2:
        raise typer.BadParameter(f"expected two axes NAME[i,...],NAME[j,...], got {axes!r}", param_hint="--axes")
    if line is not None and line.count(":") != 1:
        raise typer.BadParameter(f"expected A:B, two trajectory names, got {line!r}", param_hint="--line")
    return {"directions": method, "runs": run_names, "axes": axis_names, "directions_file": directions_file, "line": line}


def _device_or_none(value: Optional[str]) -> Optional[str]:
    if value is not None and not DEVICE_PATTERN.fullmatch(value):
        raise typer.BadParameter(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def _positive_or_none(value: Optional[float]) -> Optional[float]:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be a positive number, got {value!r}")
    return value


def _non_negative_or_none(value: Optional[float]) -> Optional[float]:
    # A callback instead of min=0: click's range check calls NaN "not >= 0", which hides why it is invalid.
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"must be a finite number, 0 or more, got {value!r}")
    return value


ResolutionOption = typer.Option(41, "--resolution", min=2, max=4001, help="Grid points per axis of the slice.")
MarginOption = typer.Option(0.25, "--margin", callback=_non_negative_or_none, help="Extent beyond the trajectories, as a fraction of their span.")
CenterOption = typer.Option(None, "--center", help="Slice center: TRAJECTORY, or TRAJECTORY:INDEX with INDEX counted from 0, or from -1 for the last checkpoint (default: final state of the lowest-loss run).")
ExtentOption = typer.Option(None, "--extent", help="Grid extent ALPHA_MIN,ALPHA_MAX,BETA_MIN,BETA_MAX in slice coordinates.")
DeviceOption = typer.Option(None, "--device", callback=_device_or_none, help="auto, cpu, cuda or cuda:N (default: [evaluation].device of doodl3.toml).")
PointsOption = typer.Option(16, "--points-per-pass", min=1, help="Grid points evaluated in one vectorised forward pass.")
MinPersistenceOption = typer.Option(None, "--min-persistence", callback=_non_negative_or_none, help="Persistence, in loss units, above which a feature is significant (default: 5 x sqrt(2) x the median loss standard error when landscape.h5 stores a loss_stderr grid, else 5% of the median depth, median minus minimum, of the finite losses).")
SuperlevelOption = typer.Option(False, "--superlevel", help="Also compute superlevel-set persistence (maxima and ridges), reported in loss units.")
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
    directions: str = typer.Option("pca", "--directions", help="How the slice's two directions are chosen: pca, random, endpoints, hessian, axes or file."),
    seed: int = typer.Option(0, "--seed", help="Seed of random directions, of the Lanczos start vector and of the BatchNorm recompute subset."),
    bias: str = typer.Option("zero", "--bias", help="Random directions: zero one-dimensional tensors (biases, norm parameters) or scale each as a whole vector."),
    runs: Optional[str] = typer.Option(None, "--runs", help="Endpoint directions: two or three trajectories A,B[,C] (default: the first three recorded)."),
    axes: Optional[str] = typer.Option(None, "--axes", help="Axis directions: two parameters NAME[i,...],NAME[j,...] (default: the two that spread most across runs)."),
    directions_file: Optional[Path] = typer.Option(None, "--directions-file", exists=True, dir_okay=False, help="File directions: a .npy array or .h5 dataset 'directions' of shape (2, P)."),
    batchnorm: str = typer.Option("fixed", "--batchnorm", help="BatchNorm statistics at each grid point: fixed (the center's) or recompute (from a data subset)."),
    recompute_samples: int = typer.Option(256, "--recompute-samples", min=1, help="Samples used to re-estimate BatchNorm statistics with --batchnorm recompute."),
    line: Optional[str] = typer.Option(None, "--line", help="Also sample the line A:B through the final states of two trajectories, and its loss barrier."),
) -> None:
    """Sample a slice of the loss landscape (PCA plane by default) into RUN/landscape.h5."""
    from doodl3_cli.evaluate import BATCHNORM_POLICIES
    from doodl3_cli.directions import BIAS_RULES
    from doodl3_cli.sample import run_sample

    if batchnorm not in BATCHNORM_POLICIES:
        raise typer.BadParameter(f"expected one of {', '.join(BATCHNORM_POLICIES)}, got {batchnorm!r}", param_hint="--batchnorm")
    if bias not in BIAS_RULES:
        raise typer.BadParameter(f"expected one of {', '.join(BIAS_RULES)}, got {bias!r}", param_hint="--bias")
    options = _sample_options(
        resolution, margin, center, extent, device, points_per_pass, seed=seed, bias=bias, batchnorm=batchnorm,
        recompute_samples=recompute_samples, **_direction_options(directions, runs, axes, directions_file, line),
    )
    with _reported_errors(run), _progress() as progress:
        path = run_sample(_run_folder(run), options, progress=progress("sampling the landscape"))
    typer.echo(f"wrote {path}")


@app.command()
def topology(
    run: Path = RunArgument,
    min_persistence: Optional[float] = MinPersistenceOption,
    superlevel: bool = SuperlevelOption,
) -> None:
    """Compute persistent homology across resolutions, significant minima and basins of each slice into RUN/topology.h5."""
    from doodl3_cli.topology import run_topology

    with _reported_errors(run):
        path = run_topology(_run_folder(run), min_persistence=min_persistence, superlevel=superlevel)
    typer.echo(f"wrote {path}")


@app.command()
def dynamics(
    run: Path = RunArgument,
    tau: Optional[float] = TauOption,
    sharpness_checkpoints: int = typer.Option(
        3, "--sharpness-checkpoints", min=0,
        help="Checkpoints per run, evenly spaced, at which the top Hessian eigenvalue is computed (0 skips it; needs doodl3.toml).",
    ),
    device: Optional[str] = DeviceOption,
    map_name: str = typer.Option(
        "gradient", "--map",
        help="Map whose Morse graph is computed: gradient (time-tau map of the gradient flow), ensemble (Gaussian process fitted to the runs' checkpoints) or trajectory (recorded displacements regressed onto the grid).",
    ),
    confidence: float = typer.Option(
        0.95, "--confidence", min=0.0, max=1.0,
        help="Confidence level of the ensemble map: each image is widened to hold the model's image with this probability.",
    ),
) -> None:
    """Compute the gradient flow, Morse graph, Conley indices, diagnostics and findings into RUN/dynamics.h5."""
    from doodl3_cli.dynamics.stage import MAPS, run_dynamics

    if map_name not in MAPS:
        raise typer.BadParameter(f"expected one of {', '.join(MAPS)}, got {map_name!r}", param_hint="--map")
    with _reported_errors(run):
        path = run_dynamics(
            _run_folder(run), tau=tau, sharpness_checkpoints=sharpness_checkpoints, device=device,
            map_name=map_name, confidence=confidence,
        )
    typer.echo(f"wrote {path}")


class PlotlyJs(str, Enum):
    """Placement of plotly.js for `doodl3 report`: inside the page or in a file beside it."""

    inline = "inline"
    beside = "beside"


@app.command()
def report(
    run: Path = RunArgument,
    plotly_js: PlotlyJs = typer.Option(
        PlotlyJs.inline, "--plotly-js",
        help="inline: embed plotly.js in the page (one self-contained file, about 4.6 MiB more); "
        "beside: write it once as RUN/plotly.min.js next to the page.",
    ),
) -> None:
    """Write RUN/report.html: one offline page with every figure."""
    from doodl3_cli.report.page import write_report

    with _reported_errors(run):
        path = write_report(_run_folder(run), plotly_js=plotly_js.value)
    typer.echo(f"wrote {path}")


# The stage that each option of `run` configures: giving the option reruns that stage.
_RUN_OPTION_STAGES = {
    "resolution": "sample", "margin": "sample", "center": "sample", "extent": "sample",
    "device": "sample", "points_per_pass": "sample", "min_persistence": "topology", "tau": "dynamics",
}


@app.command("run")
def run_command(
    ctx: typer.Context,
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
    """Run every stage whose artifact is missing or computed from other inputs.

    A stage whose option is given on the command line reruns, with the stages after it.
    """
    from doodl3_cli.pipeline import PipelineOptions, run_pipeline

    options = PipelineOptions(
        sample=_sample_options(resolution, margin, center, extent, device, points_per_pass),
        min_persistence=min_persistence, tau=tau,
    )
    given = {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"}
    forced = frozenset(_RUN_OPTION_STAGES[name] for name in given if name in _RUN_OPTION_STAGES)
    with _reported_errors(run), _progress() as progress:
        ran = run_pipeline(
            _run_folder(run), options, force=force, force_stages=forced, progress=progress,
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
    with _reported_errors(run), _progress() as progress:
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
