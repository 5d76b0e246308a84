"""SpecDef: spectral reparameterization with compensation layers (arXiv 2602.18868).

- `apply_specdef(model, alpha=, k=, layers=)`: the transform (specdef/core.py) on nn.Linear,
  transformers Conv1D and MoE experts modules (specdef/modules.py).
- `specdef.defense.SpecDef`: the harness defense (`defense=specdef`), with drift measurement.
- `specdef.release`: save / load a defended model (safetensors + manifest).
- `specdef.hessian`: top Hessian eigenvalue by Lanczos / power iteration with Hessian-vector products.
"""
from specdef.core import apply_specdef, specdef_modules, transform
from specdef.modules import SpecDefExperts, SpecDefLinear, SpecDefModule

__all__ = ["SpecDefExperts", "SpecDefLinear", "SpecDefModule", "apply_specdef", "specdef_modules", "transform"]
