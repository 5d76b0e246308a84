"""experiment=lr_window's Hydra sweeper, registered where Hydra looks for plugins (see lr_window_sweeper.py)."""
