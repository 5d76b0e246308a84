"""Numerics pins (harness/numerics.py): the machine's choice, its override, and that the avx2 pin computes
an AVX2-only machine's bits on this one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import numerics
from harness.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_machine_pin_is_the_cheapest_that_holds(monkeypatch):
    monkeypatch.delenv(numerics.ENV_VAR, raising=False)
    expected = "avx2" if numerics.available("avx2") else "scalar" if numerics.available("scalar") else "native"
    assert numerics.machine_pin() == expected
    monkeypatch.setattr(numerics, "cpu_flags", lambda: frozenset({"sse2", "avx"}))  # a CPU without AVX2
    assert numerics.machine_pin() == ("scalar" if numerics.available("scalar") else "native")
    assert numerics.resolve("avx2") == "native"  # cannot hold: native, and the cache key says so


def test_override_is_validated_with_one_line(monkeypatch):
    monkeypatch.setenv(numerics.ENV_VAR, "scalar")
    assert numerics.machine_pin() == ("scalar" if numerics.available("scalar") else pytest.skip("no MKL"))
    monkeypatch.setenv(numerics.ENV_VAR, "fast")
    with pytest.raises(ConfigError) as err:
        numerics.machine_pin()
    assert str(err.value) == "SPECDEF_NUMERICS='fast': allowed avx2, scalar, native"
    with pytest.raises(ConfigError) as err:
        numerics.resolve("pinned", "model.spec.numerics")
    assert str(err.value) == "model.spec.numerics='pinned': allowed avx2, scalar, native, machine"


def test_child_env_replaces_variables_that_fight_the_pin():
    env = numerics.child_env("avx2", {"MKL_ENABLE_INSTRUCTIONS": "AVX512", "ATEN_CPU_CAPABILITY": "avx512",
                                      "PATH": "/bin"})
    assert env == {"PATH": "/bin", **numerics.PINS["avx2"]}
    native = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "PATH": "/bin"}
    assert numerics.child_env("native", native) == native
    assert "threads" not in numerics.numerics_id("scalar", 1) and numerics.numerics_id("scalar", 1) == \
        numerics.numerics_id("scalar", 2) != numerics.numerics_id("avx2", 1)
    assert json.dumps(numerics.describe())  # provenance is plain JSON


PROBE = """
import hashlib, json, torch
from transformers import LlamaConfig, LlamaForCausalLM
from harness import numerics
torch.manual_seed(0); torch.set_num_threads(1)
cfg = LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=32)
model = LlamaForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
ids = torch.randint(4, 400, (16, 32), generator=torch.Generator().manual_seed(1))
for _ in range(5):
    model(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16]
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "weights": digest}))
"""


def _probe(env: dict) -> dict:
    env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not numerics.available("avx2"), reason="the avx2 pin needs x86-64, MKL and an AVX2 CPU")
def test_avx2_pin_computes_what_an_avx2_machine_computes_natively():
    """An AVX2-only machine, emulated (the README's trained-behaviour check), and this one under the avx2
    pin: the same bits after 5 training steps of a small Llama (probe of ../shared/tools/numerics_probe.py;
    measured across real AVX2 and AVX-512 machines with 30 steps: 1d5635fc666060f4 on both)."""
    pinned = _probe(numerics.child_env("avx2"))
    emulated = _probe({**numerics.child_env("native"), "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"})
    assert pinned["capability"] == "AVX2"
    assert pinned["weights"] == emulated["weights"], (pinned, emulated)
