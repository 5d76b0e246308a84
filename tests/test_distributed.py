"""dist=fsdp on CPU with gloo: two ranks train like one process, a killed rank's run resumes, what cannot
be sharded refuses, and the memory plan matches measured memory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.errors import ConfigError
from harness.record import read_record
from runner import memory_plan
from runner.validate import validate
from tests import dist_worker
from tests.conftest import SUITE_WORLD, TEST_OVERRIDES, compose_cfg

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "SPECDEF_OUTPUTS": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"}


def _relative(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


@pytest.fixture(scope="module")
def launch(tiny_path, tmp_path_factory):
    """One 2-rank torchrun launch of tests/dist_worker.py (every scenario, then a whole sharded run),
    while this process runs the same scenarios in one process."""
    tmp = tmp_path_factory.mktemp("launch")
    sharded, whole = tmp / "sharded", tmp / "whole"
    whole.mkdir()
    with open(tmp / "log.txt", "w") as log:
        proc = subprocess.Popen([*TORCHRUN, "-m", "tests.dist_worker", str(sharded), "dist=fsdp"], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env=_env(tmp))
        try:
            one = dist_worker.scenarios(whole)
        finally:
            proc.wait(timeout=600)
    assert proc.returncode == 0, (tmp / "log.txt").read_text()[-3000:]
    return {"one": one, "whole": whole, "two": json.loads((sharded / "results.json").read_text()),
            "sharded": sharded, "record": read_record(sharded / "run" / "result.json")}


def _weights(launch, name: str, one_process_name: str | None = None):
    w1 = load_file(launch["whole"] / f"{one_process_name or name}.safetensors")
    w2 = load_file(launch["sharded"] / f"{name}.safetensors")
    assert w1.keys() == w2.keys() and w1
    return w1, w2


@pytest.mark.parametrize("name, one_process", [("adam", "adam"), ("lora", "lora"), ("npo", "npo"),
                                               ("gpt2", "gpt2"), ("mixtral", "mixtral"),
                                               ("adam_checkpointed", "adam"), ("sgld", "sgld"), ("mezo", "mezo")])
def test_two_ranks_train_like_one_process(launch, name, one_process):
    """Adam, LoRA and NPO (a reference model) on the tiny model with SpecDef in every block, Adam on tiny
    GPT-2 (SpecDef on Conv1D) and Mixtral (SpecDef on MoE experts), Adam with activation checkpointing,
    SGLD and MeZO (seeded noise: each rank keeps its shard of one process's draw): the 2-rank run's
    losses and final weights equal the 1-process run's within 1e-5."""
    one, two = launch["one"][one_process], launch["two"][name]
    assert len(two) == len(one) == 3
    assert _relative(two, one) < 1e-5
    w1, w2 = _weights(launch, name, one_process)
    assert any("comp" in k for k in w1) or name == "lora"  # SpecDef's compensations trained too
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5


def _like_plain_run(launch, name: str, plain: str) -> None:
    """Scenario `name` (sharded) gives the losses and weights of the plain sharded scenario `plain` bit
    for bit, and those of the one-process run within 1e-5."""
    two, sharded, one = launch["two"][name], launch["two"][plain], launch["one"][plain]
    assert len(two) == len(one) == 3
    assert two == sharded and _relative(two, one) < 1e-5
    w_one, w_sharded = _weights(launch, plain)
    w = load_file(launch["sharded"] / f"{name}.safetensors")
    assert w.keys() == w_sharded.keys() and all(torch.equal(w[k], w_sharded[k]) for k in w)
    assert max(float((w[k] - w_one[k]).abs().max()) for k in w) < 1e-5


@pytest.mark.parametrize("name, plain", [("sgld_resumed", "sgld"), ("mezo_resumed", "mezo")])
def test_sgld_and_mezo_killed_and_resumed_from_a_sharded_checkpoint_train_like_one_process(launch, name, plain):
    """SGLD and MeZO keep their step counter in the param group, so torch's sharded state dict would
    'initialise' them by stepping them at lr 0 (MeZO raised at the first save; SGLD's noise moved on a
    step at every save and load). Checkpointed every step, killed at step 2 and resumed from step 1's
    sharded checkpoint, each trains like its uninterrupted run."""
    _like_plain_run(launch, name, plain)


@pytest.mark.parametrize("name", ["mezo_evaluated", "mezo_evaluated_blocks_gathered"])
def test_mezo_evaluated_between_its_steps_trains_sharded_like_one_process(launch, name):
    """An evaluation is a forward pass without a backward: it leaves the root's weights gathered (with
    dist.reshard_after_forward=false every block's), and MeZO's next perturbation of the shards did not
    reach them (its estimate used θ + εz with the embeddings, final norm and head unperturbed). MeZO
    evaluated after every step trains like MeZO evaluated only at the end."""
    _like_plain_run(launch, name, "mezo")


def test_muon_trains_sharded_like_one_process(launch, tiny_path):
    """Muon (scale=paper's third attack) on sharded matrices: torch's Muon orthogonalises each update in
    bfloat16, so rounding differences of the gradient become bfloat16 rounding of the update; the
    losses agree within 1e-4 and the weights within a tenth of their movement."""
    one, two = launch["one"]["muon"], launch["two"]["muon"]
    assert len(two) == len(one) == 3 and _relative(two, one) < 1e-4
    assert _distance(*_weights(launch, "muon"), load_file(tiny_path / "model.safetensors")) < 0.1


def _distance(w1: dict, w2: dict, w0: dict) -> float:
    """|w1 - w2| over how far w1 moved from w0 (Frobenius norms over the weights both have: SpecDef's
    layers are not in the pretrained model)."""
    common = [k for k in w1 if k in w0]
    diff = sum(float((w1[k].double() - w2[k].double()).norm() ** 2) for k in common) ** 0.5
    moved = sum(float((w1[k].double() - w0[k].double()).norm() ** 2) for k in common) ** 0.5
    assert moved > 0
    return diff / moved


@pytest.mark.parametrize("name", ["rmu", "repnoise", "elm", "tar"])
def test_every_training_based_defense_trains_sharded_like_one_process(launch, tiny_path, name):
    """RMU (a frozen copy), RepNoise (a loss coupling the rows of a batch), ELM (LoRA, text sampled once)
    and TAR (an inner adversary and its meta-gradient): the losses of every training step within 1e-5
    of the trajectory's scale, and the weights within 1e-3 of how far they moved. (AdamW's normalised
    step turns rounding in a near-zero gradient into a full step for that weight, so single weights may
    differ by a fraction of their movement.)"""
    one, two = launch["one"][name], launch["two"][name]
    assert len(two) == len(one) > 0
    scale = max(abs(x) for x in one)
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5 * scale
    assert _distance(*_weights(launch, name), load_file(tiny_path / "model.safetensors")) < 1e-3


def test_sharded_evaluation_gives_the_metrics_of_one_process(launch):
    assert launch["two"]["metrics"] == pytest.approx(launch["one"]["metrics"], rel=1e-6)


def test_sharded_run_writes_one_record(launch):
    record = launch["record"]
    assert record["provenance"]["world_size"] == 2 and record["config"]["dist"]["name"] == "fsdp"
    assert [p["step"] for p in record["attack"]["trajectory"]] == [0, 4, 8, 12]


def _run_args(*overrides: str) -> list[str]:
    return [*TORCHRUN, "run.py", *SUITE_WORLD, *TEST_OVERRIDES, *dist_worker.RUN, *overrides]  # as compose_cfg composes


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` among the children of `parent` (from its environment)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def test_a_killed_rank_leaves_no_record_and_the_run_resumes(launch, tmp_path):
    """torchrun run.py with Hydra's own run folder (`${now:...}`, which every rank must agree on); rank 1
    killed (SIGKILL) once the attack saved a sharded checkpoint; the same run folder relaunched (what a
    requeue does) resumes and ends with the uninterrupted run's record."""
    env = _env(tmp_path)
    proc = subprocess.Popen(_run_args(), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs, deadline = tmp_path / "outputs" / "runs", time.time() + 300
    while time.time() < deadline and not list(runs.glob("*/attack_checkpoint/*/meta.json")):
        time.sleep(0.1)  # kill once the attack has saved a sharded checkpoint, i.e. mid-attack
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # torchrun ends the other rank and fails
    folders = list(runs.iterdir())
    assert len(folders) == 1  # both ranks used rank 0's run folder
    run_dir = folders[0]
    assert list(run_dir.glob("attack_checkpoint/*/sharded/.metadata"))
    assert read_record(run_dir / "result.json") is None and not (tmp_path / "outputs" / "records").exists()
    done = subprocess.run(_run_args(f"hydra.run.dir={run_dir}"), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, uninterrupted = read_record(run_dir / "result.json"), launch["record"]
    assert resumed["attack"]["extra"]["resumed_from_step"] >= 4
    assert resumed["attack"]["trajectory"] == uninterrupted["attack"]["trajectory"]
    assert resumed["metrics"] == uninterrupted["metrics"]


def test_what_cannot_be_sharded_refuses_in_one_line():
    for overrides, words in [(("attack=sophia",), "double backward"), (("attack=adahessian",), "double backward"),
                             (("attack.sharpness_every=10",), "Hessian-vector products")]:
        with pytest.raises(ConfigError, match=words) as e:
            validate(compose_cfg("dist=fsdp", *overrides))
        assert "\n" not in str(e.value) and "allowed dist=none" in str(e.value)
    validate(compose_cfg("dist=fsdp", "attack=muon"))  # Muon runs sharded (DTensor gathers its matrices)


def test_several_processes_need_dist_fsdp(monkeypatch):
    from harness import distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="dist=none with 2 processes"):
        distributed.setup(compose_cfg())


def test_plan_refuses_paper_scale_adam_on_one_gpu_and_names_the_gpus():
    cfg = compose_cfg("scale=paper", "defense=specdef", "attack=adam", "dist=none", "dist.device_memory_gb=80")
    with pytest.raises(ConfigError, match=r"needs .* GiB per rank .* allowed dist=fsdp on >= \d+ devices") as e:
        memory_plan.check(cfg)
    assert "\n" not in str(e.value)


def test_paper_scale_asks_slurm_for_the_gpus_its_plan_needs():
    """scale=paper's GPUs per job are the plan's figure, not a guess: the fewest 80 GB GPUs on which every
    job of experiment=table1 fits (benchmarks/memory_plan.py prints the table), one task per GPU."""
    from benchmarks.memory_plan import sweep_gpus
    from experiments.common import compose_config
    cfg = compose_config(["scale=paper"], return_hydra_config=True)
    assert cfg.dist.name == "fsdp" and cfg.dist.activation_checkpointing
    assert compose_config(["scale=paper", "defense=specdef"]).defense.dtype == "float32"  # the plan counts it so
    launcher = cfg.hydra.launcher
    rows = sweep_gpus("scale=paper", attacks=["adam"])  # Adam keeps the most state of the first-order attacks
    assert launcher.gpus_per_node == launcher.tasks_per_node == max(r["min_gpus"] for r in rows)
    assert all(r["per_rank_gib"] <= 0.9 * 80 - 2 for r in rows)
    assert launcher.mem_gb >= launcher.tasks_per_node * max(r["host_gib"] for r in rows)


def test_plan_counts_specdef_on_conv1d_and_moe_experts():
    """SpecDef's compensation (out x out per defended layer) is in the plan whatever the layer's kind:
    GPT-2's Conv1D c_proj and Mixtral's fused experts, found by SpecDef's own default patterns."""
    from transformers import AutoConfig

    from specdef.defense import defended_widths
    defense = compose_cfg("defense=specdef", "defense.layers=null").defense  # each family's defaults
    for model_type, extra in dist_worker.FAMILIES.items():
        config = AutoConfig.for_model(model_type, **dist_worker.FAMILY_SHAPE, **extra)
        shape = memory_plan.shape_from_config(config, 4)
        assert defended_widths(shape, defense) == [config.hidden_size] * config.num_hidden_layers


def test_plan_true_prints_the_plan_and_loads_nothing(tmp_path):
    env = {**os.environ, "SPECDEF_OUTPUTS": str(tmp_path), "SPECDEF_CACHE": str(tmp_path / "empty_cache"),
           "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "run.py", "scale=paper", "defense=specdef_elm", "plan=true"], cwd=REPO,
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "memory plan: " in out.stdout and "attack: adam" in out.stdout and "fits from" in out.stdout
    assert not (tmp_path / "empty_cache").exists() and not list(tmp_path.rglob("result.json"))


def test_memory_plan_matches_measured_memory_of_the_tiny_model(tiny_path, base_cfg):
    """Growth of resident memory over two Adam steps of the tiny model against the plan's attack stage,
    at the measured batch shape (the plan's default is the longest batch data.max_length allows)."""
    rows, seq = 64, base_cfg.data.max_length
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory_probe", str(tiny_path), str(rows), str(seq)],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.splitlines()[-1])
    cfg = compose_cfg(f"attack.batch_size={rows}")
    planned = memory_plan.plan(cfg, seq=seq).stages[0]
    assert planned.name == "attack: adam"
    assert planned.total == pytest.approx(measured["grown"], rel=0.25)
