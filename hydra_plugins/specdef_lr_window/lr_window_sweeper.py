"""Hydra instantiates a sweeper only from a class of the `hydra_plugins` namespace package, which its
plugin scan imports at start-up: this module registers runner.lr_window_sweeper.LrWindowSweeper under
that name (conf/hydra/sweeper/lr_window.yaml). Keep it light: every Hydra start imports it."""
from runner.lr_window_sweeper import LrWindowSweeper as _LrWindowSweeper


class LrWindowSweeper(_LrWindowSweeper):
    """The sweeper of experiment=lr_window (runner/lr_window_sweeper.py)."""
