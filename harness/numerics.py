"""CPU numerics pins: which kernels MKL and ATen may use, so that a computation gives the same bits on
every x86-64 machine.

MKL and ATen choose their kernels by the CPU's instruction set when they initialise, and AVX2 and
AVX-512 kernels round differently: 2,000 steps of training turn that into a different model. A pin is a
set of environment variables that fixes the kernels. They are read when torch loads, so a pin applies
to a fresh subprocess (`child_env`), never to the running interpreter.

- `avx2`: ATen's AVX2 kernels and MKL's AVX2 branch. Every x86-64 CPU of the last decade runs them.
  Measured with `../shared/tools/numerics_probe.py` (tiny Llama, 1 thread): on an AVX-512 machine this
  pin gives the weights hash of an AVX2-only machine's native run (1d5635fc666060f4), at 1 and 2
  threads, at 180 ms/step against 163 native; on the AVX2 machine it costs nothing (477 vs 481 ms).
  `benchmarks/numerics.py` re-measures it.
- `scalar`: ATen's unvectorised kernels and MKL's COMPATIBLE branch, the one MKL branch documented to
  give the same results on Intel and non-Intel x86-64 CPUs. Needs no AVX2, costs ~2x native per step.
  The default tiny model was pretrained under it (every committed result was produced from those bits).
- `native`: nothing pinned; the bits depend on the CPU (and the thread count).

MKL_DYNAMIC=FALSE: MKL's run-to-run reproducibility is conditional on a fixed thread count, which the
caller sets (OMP_NUM_THREADS, MKL_NUM_THREADS).

`machine_pin()` is the cheapest pin that reproduces everywhere this machine's bits could be compared:
`avx2` where the CPU has AVX2 and FMA and torch has MKL on x86-64, else `scalar` where torch has MKL on
x86-64, else `native`. `SPECDEF_NUMERICS=avx2|scalar|native` overrides it.
"""
from __future__ import annotations

import json
import os
import platform
from functools import lru_cache

from harness.errors import ConfigError

PINS: dict[str, dict[str, str]] = {
    "avx2": {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_DYNAMIC": "FALSE"},
    "scalar": {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "MKL_DYNAMIC": "FALSE"},
    "native": {},
}
# What ATen reports (torch.backends.cpu.get_cpu_capability()) once a pin is in effect.
CAPABILITY = {"avx2": "AVX2", "scalar": "DEFAULT"}
# Variables that would override or fight a pin's in a child process: removed there under any pin.
OVERRIDING_VARS = ("MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "MKL_CBWR", "ATEN_CPU_CAPABILITY", "MKL_DYNAMIC")
ENV_VAR = "SPECDEF_NUMERICS"
MACHINE = "machine"  # a spec's way of saying "whatever machine_pin() picks here"


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@lru_cache(maxsize=None)
def _mkl() -> bool:
    import torch
    return bool(torch.backends.mkl.is_available())


def available(pin: str) -> bool:
    """Whether `pin` can take effect here: MKL's branches exist only where torch uses MKL, on x86-64."""
    if pin == "native":
        return True
    if not (_x86_64() and _mkl()):
        return False
    return pin == "scalar" or {"avx2", "fma"} <= cpu_flags()


def check(value: str, key: str, allowed=tuple(PINS)) -> str:
    """`value` if it names a pin, else a one-line ConfigError naming the key, the value and what is allowed."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: allowed {', '.join(allowed)}")
    return value


def machine_pin() -> str:
    """The pin this machine uses when a spec says `machine` (see the module docstring)."""
    override = os.environ.get(ENV_VAR)
    if override:
        pin = check(override, ENV_VAR)
        if not available(pin):
            raise ConfigError(f"{ENV_VAR}={override!r}: not available here ({_why_not(pin)}); allowed "
                              f"{', '.join(p for p in PINS if available(p))}")
        return pin
    return next(p for p in ("avx2", "scalar", "native") if available(p))


def resolve(name: str, key: str = "numerics") -> str:
    """The pin `name` (a pin or `machine`) stands for here; an unavailable pin resolves to `native`
    (the caller says so: the bits then depend on this machine)."""
    check(name, key, (*PINS, MACHINE))
    pin = machine_pin() if name == MACHINE else name
    return pin if available(pin) else "native"


def _why_not(pin: str) -> str:
    if not _x86_64():
        return f"not x86-64 but {platform.machine()}"
    if not _mkl():
        return "torch without MKL"
    return "the CPU lacks AVX2 or FMA"


def why_unavailable(pin: str) -> str:
    return "" if available(pin) else _why_not(pin)


def child_env(pin: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for a subprocess that must compute under `pin`."""
    env = dict(os.environ if env is None else env)
    if pin != "native":
        for k in OVERRIDING_VARS:
            env.pop(k, None)
    env.update(PINS[check(pin, "pin")])
    return env


def numerics_id(pin: str, threads: int) -> str:
    """What, besides the inputs, decides the bits of a computation under `pin`: the pin's variables (a
    pinned run's bits do not depend on the thread count: 1 and 2 threads measured the same) or, natively,
    this CPU, its MKL variables and the thread count; and the torch and transformers versions."""
    import torch
    from importlib import metadata
    versions = f"torch={torch.__version__} transformers={metadata.version('transformers')}"
    if pin != "native":
        return f"{pin} {json.dumps(PINS[pin], sort_keys=True)} {versions}"
    mkl = {k: os.environ[k] for k in OVERRIDING_VARS if k in os.environ}
    return (f"native {platform.machine()} {torch.backends.cpu.get_cpu_capability()} {json.dumps(mkl, sort_keys=True)} "
            f"threads={threads} {versions}")


def in_effect(pin: str) -> str | None:
    """None if this process computes under `pin`, else what is wrong (for a pinned child to check itself)."""
    import torch
    expected = CAPABILITY.get(pin)
    got = torch.backends.cpu.get_cpu_capability()
    if expected is not None and got != expected:
        return f"numerics pin {pin!r} did not take effect: ATen runs {got} kernels, expected {expected}"
    return None


def describe() -> dict:
    """Provenance: this machine's pin and what this process computes with."""
    import torch
    try:
        pin = machine_pin()
    except ConfigError as e:
        pin = f"invalid ({e})"
    return {"machine_pin": pin, "override": os.environ.get(ENV_VAR),
            "available": [p for p in PINS if available(p)], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "mkl": _mkl(),
            "env": {k: os.environ[k] for k in OVERRIDING_VARS if k in os.environ},
            "avx2_fma": {"avx2", "fma"} <= cpu_flags(), "avx512f": "avx512f" in cpu_flags()}
