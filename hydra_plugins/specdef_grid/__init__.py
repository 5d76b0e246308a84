"""The grid-less-some-jobs Hydra sweeper, registered where Hydra looks for plugins (see grid_sweeper.py)."""
