"""The image tracks' memory plan (runner/image_memory_plan.py) against measured memory, and at real size.

    python -m benchmarks.image_memory_plan            # both parts
    python -m benchmarks.image_memory_plan --tiny     # measured vs planned only

`--tiny`: the attack stage of the tiny ViT and UNet beside the resident memory two Adam steps grow
(benchmarks/image_memory_probe.py, glibc's mmap threshold fixed), at batches where activations dominate.
Real size: the plans of Stable Diffusion 1.x (its UNet, VAE and CLIP text encoder's published architecture,
written below as config files, no weights) and ViT-B/16 for a few attacks and defenses, for an 80 GB GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.memory import GiB

REPO = Path(__file__).resolve().parents[1]
MiB = 2 ** 20
# Stable Diffusion 1.x (e.g. CompVis/stable-diffusion-v1-4, runwayml/stable-diffusion-v1-5): the non-default values
SD_UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
           "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
           "attention_head_dim": 8, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SD_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 4,
          "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512}
SD_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "max_position_embeddings": 77, "vocab_size": 49408}
GPU = ["model.device=cuda", "dist.device_memory_gb=80"]


def tiny_rows() -> list[str]:
    from runner.image_memory_plan import plan
    from tests.conftest import compose_cfg
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = []
    for track, batch in (("vision", 64), ("vision", 256), ("diffusion", 16), ("diffusion", 64)):
        out = subprocess.run([sys.executable, "-m", "benchmarks.image_memory_probe", track, str(batch)], cwd=REPO,
                             capture_output=True, text=True, env=env, check=True)
        measured = json.loads(out.stdout.splitlines()[-1])["grown"]
        stage = plan(compose_cfg(f"experiment={track}", f"attack.batch_size={batch}")).stages[0]
        planned = stage.total - stage.device.get("frozen parts", 0)
        rows.append(f"{track} batch {batch}: measured {measured / MiB:.1f} MiB, planned {planned / MiB:.1f} "
                    f"({planned / measured:.3f})")
    return rows


def write_sd(root: Path) -> Path:
    from transformers import CLIPTextConfig
    for part, config in (("unet", SD_UNET), ("vae", SD_VAE)):
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text(json.dumps(config))
    CLIPTextConfig(**SD_TEXT).save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return root


def write_vit(root: Path) -> Path:
    from transformers import ViTConfig
    ViTConfig(image_size=224, patch_size=16, num_labels=1000).save_pretrained(root)
    return root


def real_size_rows() -> list[str]:
    from runner.image_memory_plan import plan
    from tests.conftest import compose_cfg
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sd, vit = write_sd(Path(tmp) / "sd"), write_vit(Path(tmp) / "vit")
        cases = [
            ("SD 1.x, DreamBooth AdamW", ["scale=diffusion_paper", f"model.path={sd}", "attack=adamw"]),
            ("SD 1.x, DreamBooth-LoRA", ["scale=diffusion_paper", f"model.path={sd}", "attack=adamw", "attack/peft=lora"]),
            ("SD 1.x, SpecDef over ESD-x, AdamW", ["scale=diffusion_paper", f"model.path={sd}", "defense=specdef_sd_esd",
                                                  "attack=adamw"]),
            ("ViT-B/16, Adam", ["scale=vision_paper", f"model.path={vit}", "attack=adam"]),
            ("ViT-B/16, SpecDef, Adam", ["scale=vision_paper", f"model.path={vit}", "defense=specdef_vit", "attack=adam"]),
        ]
        for name, overrides in cases:
            cfg = compose_cfg(*overrides, *GPU)
            p = plan(cfg)
            attack = next(s for s in p.stages if s.name.startswith("attack"))
            items = ", ".join(f"{k} {v / GiB:.2f}" for k, v in attack.device.items() if v)
            rows.append(f"{name} (batch {cfg.attack.batch_size}): {attack.name} {p.stage_total(attack) / GiB:.2f} GiB "
                        f"({items}); largest stage {p.per_rank / GiB:.2f} GiB")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="measured vs planned only")
    args = parser.parse_args()
    for row in tiny_rows() + ([] if args.tiny else real_size_rows()):
        print(row, flush=True)


if __name__ == "__main__":
    main()
