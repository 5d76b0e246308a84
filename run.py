"""python run.py defense=<name> attack=<name> lr=<float>   (see README.md)"""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from harness.errors import ConfigError
from runner.objective import constrained_objective
from runner.pipeline import run, show_plan
from runner.diffusion import is_diffusion, run as run_diffusion
from runner.vision import is_vision, run as run_vision

log = logging.getLogger("run")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Returns the attacker's constrained objective (runner/objective.py): the post-attack hazard
    accuracy, minus a penalty when the attack broke the model; a sweeper maximises it."""
    try:
        if cfg.plan:
            show_plan(cfg)  # plan=true: the memory plan, nothing loaded, no record (every track)
            return None
        if is_vision(cfg):  # the image world (experiment=vision): its own runner, the same defenses and attacks
            record = run_vision(cfg, HydraConfig.get().runtime.output_dir)
        elif is_diffusion(cfg):  # the denoiser on the image world (experiment=diffusion): likewise
            record = run_diffusion(cfg, HydraConfig.get().runtime.output_dir)
        else:
            record = run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, InstantiationException) as e:
        # a ConfigError raised while Hydra builds a defense or attack arrives wrapped
        cause = e if isinstance(e, ConfigError) else e.__cause__
        if not isinstance(cause, ConfigError):
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
    objective = record.get("objective") or constrained_objective(record, OmegaConf.select(cfg, "objective"))
    return objective["value"]


if __name__ == "__main__":
    main()
