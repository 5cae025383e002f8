"""The `topology` stage: persistent homology, pyramids of resolutions and basins of landscape slices.

`persistence` computes the diagram of a slice, `pyramid` compares it across
resolutions, `basins` labels the cells and checkpoints, and `stage` runs them over
landscape.h5 into topology.h5.
"""

from doodl3_cli.topology.basins import assign_checkpoints, label_basins
from doodl3_cli.topology.persistence import (
    CONVENTION,
    THRESHOLD_FRACTION,
    persistence_pairs,
    significance_threshold,
    vertex_diagram,
    wall_nonfinite,
)
from doodl3_cli.topology.pyramid import build_pyramid
from doodl3_cli.topology.stage import analyse_slice, run_topology, significant_minima

__all__ = [
    "CONVENTION",
    "THRESHOLD_FRACTION",
    "analyse_slice",
    "assign_checkpoints",
    "build_pyramid",
    "label_basins",
    "persistence_pairs",
    "run_topology",
    "significance_threshold",
    "significant_minima",
    "vertex_diagram",
    "wall_nonfinite",
]
