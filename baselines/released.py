"""`defense=checkpoint`: a defended model someone already trained and released (TAR, RepNoise, RMU, ELM
on the hub, or a local folder), used instead of retraining the defense; also SpecDef's base
(`defense=specdef defense.base=checkpoint defense.base_overrides.path=...`).

The released weights replace the run's model: the run's model (`model.path`) should be the checkpoint's
base model, so that the undefended row of a table is the model the release was made from. Weights come
from safetensors only and remote code stays off. A path that is neither a local folder nor in reach
stops the run at config validation, before any model is loaded (`check_config`).
"""
from __future__ import annotations

from harness.errors import ConfigError
from harness.models import check_model_path, from_pretrained

# The architecture fields a release must share with the run's model (the same family and size).
SAME = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")


class ReleasedCheckpoint:
    """path: hub id or local folder of a released defended model; revision: a hub commit or tag (null:
    the default branch). Loaded in the run model's dtype and attention kernel, on its device."""
    name = "checkpoint"
    cacheable = False  # the release is already on disk: a cached copy would only duplicate it

    # Hooks (harness/hooks.py): what the runner asks of the defense before anything is built.

    @staticmethod
    def check_config(cfg, node, key: str) -> None:
        """A release out of reach stops here (also as SpecDef's base: key defense.base_overrides)."""
        check_model_path(node.get("path"), key=f"{key}.path", revision=node.get("revision"))

    @staticmethod
    def memory_stages(node, shape, costs) -> list:
        return []  # loaded, not trained: the attack's and the evaluation's stages hold its weights

    def __init__(self, path: str, revision: str | None = None):
        self.path, self.revision = path, revision
        self.info: dict = {}

    def __call__(self, model, tokenizer, data):
        check_model_path(self.path, key="defense.path", revision=self.revision)
        param = next(model.parameters())
        dtype = str(param.dtype).removeprefix("torch.")
        released, released_tok = from_pretrained(self.path, dtype=dtype, device="cpu",
                                                 attn_implementation=model.config._attn_implementation,
                                                 revision=self.revision)
        self._check_same_family(model, tokenizer, released, released_tok)
        self.info.update({"path": self.path, "revision": self.revision, "dtype": dtype,
                          "commit": getattr(released.config, "_commit_hash", None)})
        return released.to(param.device)

    def _check_same_family(self, model, tokenizer, released, released_tok) -> None:
        """The run's tokenizer and evaluator serve the released model: they must be the same family."""
        for field in SAME:
            ours, theirs = getattr(model.config, field, None), getattr(released.config, field, None)
            if ours != theirs:
                raise ConfigError(f"defense.path={self.path!r}: its {field} is {theirs!r}, the run's model has "
                                  f"{ours!r}; allowed a release of the run's model (set model.path to its base model)")
        if released_tok.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"defense.path={self.path!r}: its tokenizer differs from the run's model's; allowed "
                              "a release of the run's model (set model.path to its base model)")
