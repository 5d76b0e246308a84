#!/bin/bash
# Every advertised combination across the tracks, run once for one attack step: each must run, or refuse in one
# `error:` line; a traceback is a bug. Prints one verdict per combination and exits 1 if any ended in a traceback.
#   bash scripts/check_combinations.sh            (54 runs, ~15 min on one core; the shipped tiny models, no pretraining)
# Runs in a throwaway cache and output folder; set SPECDEF_CACHE to reuse a cache of defended models.
set -u
cd "$(dirname "$0")/.."
work=$(mktemp -d)
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export SPECDEF_CACHE=${SPECDEF_CACHE:-$work/cache} SPECDEF_OUTPUTS=$work/out
STEP="attack.steps=1 attack.eval_every=1 threads=1 cache_defended=false"
# v: vision, d: diffusion (2 samples per class, for speed), D: diffusion as preset, l: the language track
declare -A TRACK=([v]="experiment=vision" [d]="experiment=diffusion eval.samples_per_class=2" [D]="experiment=diffusion"
                  [l]="")
bad=0
i=0
while read -r track args; do
  [ -z "$track" ] && continue
  i=$((i + 1))
  out=$(timeout 600 python run.py ${TRACK[$track]} $STEP $args hydra.run.dir="$work/runs/$i" 2>&1)
  rc=$?
  if echo "$out" | grep -q "Traceback"; then
    verdict="TRACEBACK"; bad=1
  elif [ $rc -eq 0 ]; then
    verdict="ok"
  else
    # the harness's one `error:` line, else Hydra's own first line (e.g. an override of a key the config lacks)
    verdict="refused: $(echo "$out" | grep '^error:' | tail -1)"
    [ "$verdict" = "refused: " ] && verdict="refused: $(echo "$out" | grep -v '^\s*$' | head -1)"
  fi
  echo "$i [$track] $args -> $verdict"
done <<'LIST'
v defense=rmu
v defense=npo
v defense=tar
v defense=specdef
v defense=specdef_vit attack=mezo lr=1e-3
v defense=specdef_vit attack=sgld lr=1e-3
v defense=specdef_vit attack=lion lr=1e-4
v defense=specdef_vit attack=signsgd lr=1e-4
v defense=specdef_vit attack=schedulefree_adamw lr=1e-4
v defense=specdef_vit attack=adagrad lr=1e-3
v defense=specdef_vit attack=adam_lora lr=1e-3
v defense=specdef_vit attack.undo=collapse
v defense=specdef_vit attack.undo=spectral
v defense=specdef_vit attack/partial=freeze_defended
v defense=specdef_vit attack/partial=attention
v defense=specdef_vit attack/partial=embeddings_norms
v defense=specdef_vit attack/peft=lora lr=1e-3
v defense=specdef_vit logger=wandb
v defense=specdef_vit attack.sharpness_every=1
v defense=esd
v defense=class_npo attack.recovery_rule=legacy
v defense=condition_number model.spec.exclude_hazard=[0,1]
v eval=synthetic
v plan=true
d defense=rmu
d defense=class_npo
d defense=specdef_unet attack=mezo lr=1e-3
d defense=specdef_unet attack=sgld lr=1e-3
d defense=specdef_unet attack.undo=collapse
d defense=specdef_unet attack/partial=freeze_defended
d defense=specdef_unet_esd attack/peft=lora lr=1e-3
d defense=imma attack=adam_lora lr=1e-3
d defense=specdef_unet logger=wandb
d defense=specdef_unet attack.sharpness_every=1
d defense=specdef_vit
D eval=vision
d plan=true
l defense=class_npo
l defense=condition_number
l defense=imma
l defense=esd
l defense=specdef_vit
l defense=specdef_unet
l defense=specdef_sd
l model=tiny_vit
l model=tiny_unet
l model=stable_diffusion
l data=synthetic_images
l eval=vision
l eval=stable_diffusion
l attack=adam_lora lr=1e-3
l experiment=vision model=tiny
l experiment=diffusion model=tiny_vit
l experiment=vision dist=fsdp
LIST
rm -rf "$work"
exit $bad
