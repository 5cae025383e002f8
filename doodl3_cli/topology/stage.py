"""The `topology` stage: analyse every slice of landscape.h5 into topology.h5."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from doodl3_cli.artifacts import landscape as landscape_artifact
from doodl3_cli.artifacts import topology as topology_artifact
from doodl3_cli.artifacts._common import WriterLock, atomic_h5, read_content_id, write_root_attrs
from doodl3_cli.artifacts.topology import Minima, PersistencePairs, SliceTopology, Superlevel
from doodl3_cli.errors import AnalysisError, ArtifactError
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.topology.basins import assign_checkpoints, label_basins
from doodl3_cli.topology.persistence import (
    CONVENTION,
    NOISE_MULTIPLE,
    THRESHOLD_FRACTION,
    SortedGrid,
    betti_levels,
    negate_pairs,
    persistence_pairs,
    significance_threshold,
    summarise,
    wall_nonfinite,
)
from doodl3_cli.topology.pyramid import build_pyramid

log = logging.getLogger(__name__)

STDERR_METRIC = "loss_stderr"


def significant_minima(pairs: PersistencePairs, alpha: np.ndarray, beta: np.ndarray) -> Minima:
    """Collect the births of the significant H0 pairs, deepest first.

    Parameters
    ----------
    pairs : PersistencePairs
        In filtration units (for a superlevel analysis, the negated loss).
    alpha : ndarray of shape (nx,), float64
    beta : ndarray of shape (ny,), float64

    Returns
    -------
    Minima
        Sorted by filtration value, ties by grid index.
    """
    keep = (pairs.dim == 0) & pairs.significant
    return _cells_of(pairs.birth_cell[keep], pairs.birth[keep], pairs.persistence[keep], alpha, beta)


def significant_saddles(pairs: PersistencePairs, alpha: np.ndarray, beta: np.ndarray) -> Minima:
    """Collect the death cells of the significant finite H0 pairs: the saddles at which basins meet.

    Returns
    -------
    Minima
        One row per saddle, lowest first; `persistence` is that of the pair it kills.
    """
    keep = (pairs.dim == 0) & pairs.significant & ~pairs.essential
    return _cells_of(pairs.death_cell[keep], pairs.death[keep], pairs.persistence[keep], alpha, beta)


def _cells_of(
    cell: np.ndarray, value: np.ndarray, persistence: np.ndarray, alpha: np.ndarray, beta: np.ndarray
) -> Minima:
    order = np.lexsort((cell[:, 1], cell[:, 0], value))
    cell = cell[order].astype(np.int64).reshape(-1, 2)
    coords = np.column_stack([alpha[cell[:, 0]], beta[cell[:, 1]]]).reshape(-1, 2)
    return Minima(
        cell=cell,
        coords=np.asarray(coords, dtype=np.float64),
        value=value[order],
        persistence=persistence[order],
    )


def _analyse_superlevel(
    loss: np.ndarray, alpha: np.ndarray, beta: np.ndarray, threshold: float
) -> Superlevel:
    """Compute the superlevel-set diagram (maxima and ridges) and its summary, in loss units."""
    filtration, nonfinite, _ = wall_nonfinite(-loss)
    pairs, _ = persistence_pairs(filtration, nonfinite, alpha, beta, threshold)
    maxima = significant_minima(pairs, alpha, beta)
    levels = betti_levels(filtration, nonfinite)
    summary = summarise(pairs.dim, pairs.birth, pairs.death, pairs.significant, levels)

    summary.betti_levels = -summary.betti_levels
    maxima.value = -maxima.value
    return Superlevel(pairs=negate_pairs(pairs), maxima=maxima, summary=summary)


def analyse_slice(
    name: str,
    loss: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    projections: dict[str, np.ndarray],
    *,
    min_persistence: float | None = None,
    loss_stderr: np.ndarray | None = None,
    superlevel: bool = False,
) -> SliceTopology:
    """Compute the persistence, pyramid, basins and checkpoint assignments of one slice.

    Parameters
    ----------
    name : str
        Slice name.
    loss : ndarray of shape (nx, ny), float64
        Loss grid indexed ``[i, j]`` = (alpha[i], beta[j]); NaN and +-inf cells become a wall.
    alpha : ndarray of shape (nx,), float64
    beta : ndarray of shape (ny,), float64
    projections : dict of str to ndarray of shape (T, 2)
        (alpha, beta) of the checkpoints of each trajectory.
    min_persistence : float, optional
        Persistence threshold in loss units; overrides the rules of `significance_threshold`.
    loss_stderr : ndarray of shape (nx, ny), float64, optional
        Standard error of the loss at each cell; sets the threshold when
        `min_persistence` is not given.
    superlevel : bool
        Also compute the superlevel-set diagram (maxima and ridges).

    Returns
    -------
    SliceTopology

    Raises
    ------
    AnalysisError
        When the grid is empty or its shape does not match `alpha` and `beta`,
        when no cell is finite, or when `min_persistence` or `loss_stderr` is invalid.
    """
    loss = np.asarray(loss, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1)
    beta = np.asarray(beta, dtype=np.float64).reshape(-1)
    if loss.ndim != 2 or loss.shape != (len(alpha), len(beta)) or loss.size == 0:
        raise AnalysisError(
            f"loss grid of shape {loss.shape} does not match alpha ({len(alpha)}) x beta ({len(beta)}) "
            "or is empty; resample the slice with `doodl3 sample RUN`"
        )

    filtration, nonfinite, wall = wall_nonfinite(loss)
    threshold, rule = significance_threshold(filtration, nonfinite, min_persistence, loss_stderr)
    grid = SortedGrid.of(filtration)

    pairs, locator = persistence_pairs(filtration, nonfinite, alpha, beta, threshold, grid)
    minima = significant_minima(pairs, alpha, beta)
    saddles = significant_saddles(pairs, alpha, beta)
    summary = summarise(pairs.dim, pairs.birth, pairs.death, pairs.significant, betti_levels(filtration, nonfinite))
    pyramid = build_pyramid(filtration, nonfinite, threshold)
    basins, boundary = label_basins(grid, nonfinite, pairs, minima)

    assignments = {
        trajectory: assign_checkpoints(coords, alpha, beta, basins)
        for trajectory, coords in projections.items()
    }
    final_basins = {
        trajectory: int(assigned[-1]) if len(assigned) else -1
        for trajectory, assigned in assignments.items()
    }

    return SliceTopology(
        name=name,
        alpha=alpha,
        beta=beta,
        pairs=pairs,
        minima=minima,
        basins=basins,
        boundary=boundary,
        nonfinite=nonfinite,
        assignments=assignments,
        final_basins=final_basins,
        threshold=threshold,
        threshold_rule=rule,
        convention=CONVENTION,
        wall_value=wall,
        saddles=saddles,
        summary=summary,
        pyramid=pyramid,
        locator=locator,
        superlevel=_analyse_superlevel(loss, alpha, beta, threshold) if superlevel else None,
    )


def run_topology(run: RunFolder, *, min_persistence: float | None = None, superlevel: bool = False) -> Path:
    """Analyse every slice of landscape.h5 and write topology.h5.

    topology.h5 is written under a temporary name and renamed into place, so an
    interrupted run leaves the previous file untouched. The writer lock of
    topology.h5 is held from the first slice on, so a second concurrent run fails
    at once.

    Parameters
    ----------
    run : RunFolder
        The run folder; reads ``run.landscape`` and writes ``run.topology``.
    min_persistence : float, optional
        Persistence threshold in loss units for every slice. By default each
        slice derives it from its ``loss_stderr`` grid when landscape.h5 stores
        one, else from its finite losses (see `significance_threshold`).
    superlevel : bool
        Also compute the superlevel-set diagram of each slice.

    Returns
    -------
    Path
        The topology.h5 written.

    Raises
    ------
    ArtifactError
        When landscape.h5 is missing, unreadable, of another schema, contains no
        slice, or a slice has no loss grid; or when another process is writing
        topology.h5.
    AnalysisError
        When a slice cannot be analysed (no finite cell, invalid `min_persistence`
        or standard error grid).
    """
    names = landscape_artifact.list_slices(run.landscape)
    if not names:
        raise ArtifactError(f"{run.landscape}: contains no slice; rerun `{landscape_artifact.COMMAND}`")
    upstream_id = read_content_id(run.landscape)
    if upstream_id is None:
        raise ArtifactError(
            f"{run.landscape}: root attribute 'content_id' is missing; rewrite it with "
            f"`{landscape_artifact.COMMAND}`"
        )

    with WriterLock(run.topology, writer="topology run"):
        results = _analyse_slices(run, names, min_persistence=min_persistence, superlevel=superlevel)
        settings = {
            "min_persistence": min_persistence,
            "threshold_fraction": THRESHOLD_FRACTION,
            "noise_multiple": NOISE_MULTIPLE,
            "superlevel": superlevel,
        }
        with atomic_h5(run.topology, locked=True) as f:
            write_root_attrs(
                f,
                schema=topology_artifact.SCHEMA,
                schema_version=topology_artifact.SCHEMA_VERSION,
                settings=settings,
                upstream={"landscape.h5": upstream_id},
            )
            for topology in results:
                topology_artifact.write_slice(f, topology)

    log.info("wrote %s (%d slices)", run.topology, len(results))
    return run.topology


def _analyse_slices(
    run: RunFolder, names: list[str], *, min_persistence: float | None, superlevel: bool
) -> list[SliceTopology]:
    results = []
    for name in names:
        landscape_slice = landscape_artifact.read_slice(run.landscape, name, with_vectors=False)
        if "loss" not in landscape_slice.metrics:
            raise ArtifactError(
                f"{run.landscape}: slice '{name}' has no 'loss' grid; rerun `{landscape_artifact.COMMAND}`"
            )

        projections = {trajectory: p.coords for trajectory, p in landscape_slice.projections.items()}
        try:
            topology = analyse_slice(
                name, landscape_slice.loss, landscape_slice.alpha, landscape_slice.beta, projections,
                min_persistence=min_persistence,
                loss_stderr=landscape_slice.metrics.get(STDERR_METRIC),
                superlevel=superlevel,
            )
        except AnalysisError as exc:
            raise AnalysisError(f"{run.landscape}: slice '{name}': {exc}") from exc

        _log_slice(topology)
        results.append(topology)
    return results


def _log_slice(topology: SliceTopology) -> None:
    if topology.nonfinite_cells:
        log.warning(
            "slice %s: %d of %d cells are NaN or infinite and were treated as a wall",
            topology.name, topology.nonfinite_cells, topology.nonfinite.size,
        )
    log.info(
        "slice %s: %d pairs, %d significant minima, threshold %g (%s), cells located by %s",
        topology.name, len(topology.pairs), len(topology.minima), topology.threshold,
        topology.threshold_rule, topology.locator,
    )
    pyramid = topology.pyramid
    if pyramid is not None and pyramid.unstable:
        log.warning(
            "slice %s: the significant features change between the finest level and half its resolution "
            "(%s vs %s per dimension); sample the slice more finely",
            topology.name, pyramid.significant_counts[0].tolist(),
            pyramid.significant_counts[1].tolist() if len(pyramid.stride) > 1 else "no coarser level",
        )
