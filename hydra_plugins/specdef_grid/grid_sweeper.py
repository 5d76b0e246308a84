"""Hydra instantiates a sweeper only from a class of the `hydra_plugins` namespace package, which its
plugin scan imports at start-up: this module registers runner.grid_sweeper.GridSweeper under that name
(conf/hydra/sweeper/grid.yaml). Keep it light: every Hydra start imports it."""
from runner.grid_sweeper import GridSweeper as _GridSweeper


class GridSweeper(_GridSweeper):
    """Hydra's basic sweeper less the jobs `skip` names (runner/grid_sweeper.py)."""
