"""SpecDef with the default layers on a tiny random model of each common decoder family: dense MLPs
(Linear), GPT-2's Conv1D, and mixture-of-experts blocks (fused 3-D experts, one shared compensation).

Random init is enough here: only function preservation, the σ₁ amplification, the release format and
the undo attacks are checked, all of which are algebra (tests of what SpecDef does to fine-tuning start
from the pretrained tiny model). Each model goes through `from_pretrained`, as a researcher's would.
"""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.moe import use_experts_implementation

from attacks.undo import collapse, spectral_inverse
from harness.errors import ConfigError
from specdef import SpecDefExperts, SpecDefLinear, transform
from specdef.core import match_layers, plan_layers, specdef_modules
from specdef.modules import output_weights
from specdef.release import load_defended, save_defended

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
# model_type -> (config overrides, the defended layer's last name, its kind)
FAMILIES = {
    "llama": ({}, "down_proj", SpecDefLinear),
    "qwen2": ({}, "down_proj", SpecDefLinear),
    "gemma2": ({"head_dim": 16}, "down_proj", SpecDefLinear),
    "phi3": ({}, "down_proj", SpecDefLinear),
    "gpt_neox": ({}, "dense_4h_to_h", SpecDefLinear),
    "opt": ({"ffn_dim": 96, "word_embed_proj_dim": 64}, "fc2", SpecDefLinear),
    "gptj": ({"rotary_dim": 8, "n_positions": 64}, "fc_out", SpecDefLinear),
    "gpt2": ({"n_positions": 64}, "c_proj", SpecDefLinear),  # a transformers Conv1D
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, "experts", SpecDefExperts),
    "qwen3_moe": ({"num_experts": 4, "head_dim": 16, **MOE}, "experts", SpecDefExperts),
    "gpt_oss": ({"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,  # transposed, with biases
                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
                "experts", SpecDefExperts),
}
# more families whose defaults docs/models.md lists
MORE = {
    "mistral": ({}, "down_proj", SpecDefLinear),
    "gemma": ({"head_dim": 16}, "down_proj", SpecDefLinear),
    "gemma3_text": ({"head_dim": 16}, "down_proj", SpecDefLinear),
    "qwen3": ({"head_dim": 16}, "down_proj", SpecDefLinear),
    "granite": ({}, "down_proj", SpecDefLinear),
    "smollm3": ({}, "down_proj", SpecDefLinear),
    "olmo2": ({}, "down_proj", SpecDefLinear),
    "stablelm": ({}, "down_proj", SpecDefLinear),
    "mpt": ({"d_model": 64, "n_heads": 4, "n_layers": 3}, "down_proj", SpecDefLinear),
    "falcon": ({}, "dense_4h_to_h", SpecDefLinear),
    "bloom": ({"n_head": 4}, "dense_4h_to_h", SpecDefLinear),
    "phi": ({}, "fc2", SpecDefLinear),
    "codegen": ({"rotary_dim": 8}, "fc_out", SpecDefLinear),
    "gpt_neo": ({"attention_types": [[["global", "local"], 1], [["global"], 1]], "num_layers": 3}, "c_proj",
                SpecDefLinear),
    "gpt_bigcode": ({}, "c_proj", SpecDefLinear),
    "olmoe": ({"num_experts": 4, "num_experts_per_tok": 2}, "experts", SpecDefExperts),
    "granitemoe": ({"num_local_experts": 4, "num_experts_per_tok": 2}, "experts", SpecDefExperts),
    "phimoe": ({"num_local_experts": 4, "num_experts_per_tok": 2}, "experts", SpecDefExperts),
}
# MoE families whose blocks also hold dense layers the defaults must find
MIXED = {
    "qwen2_moe": {"num_experts": 4, "shared_expert_intermediate_size": 48, **MOE},  # + shared_expert.down_proj
    "deepseek_v3": {"n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16,
                    "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 1,
                    "topk_group": 1, **MOE},  # dense layer 0, then experts + shared_experts.down_proj
}
ALPHA, K = 1e3, 4


def pretrained(model_type: str, overrides: dict, dtype: torch.dtype, tmp_path):
    """A tiny random model of the family, saved and loaded back with `from_pretrained` in `dtype`."""
    torch.manual_seed(0)
    folder = tmp_path / f"{model_type}-base"
    if not folder.exists():
        config = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if dtype == torch.float64 and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # torch's grouped_mm has no float64 kernel
    return model.eval()


def ids():
    return torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model):
    return model(ids()).logits


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def layer_io(model, names):
    """name -> (args, kwargs, output) of each layer in one forward pass (real activations and routing),
    copied: some blocks add into a layer's output in place (Falcon's parallel attention)."""
    seen, hooks = {}, []

    def keep(name):
        return lambda module, args, kwargs, out: seen.__setitem__(name, _copy((args, kwargs, out)))

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(keep(name), with_kwargs=True))
    logits(model)
    for h in hooks:
        h.remove()
    return seen


def _copy(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_copy(v) for v in x)
    return {k: _copy(v) for k, v in x.items()} if isinstance(x, dict) else x


def sigma1(module) -> float:
    w, _ = output_weights(module)
    return float(torch.linalg.matrix_norm(torch.cat(list(w.double()), dim=1), ord=2))


def check_family(model_type, overrides, tmp_path):
    model = pretrained(model_type, overrides, torch.float64, tmp_path)
    names = match_layers(model, None)
    io = layer_io(model, names)
    before = {n: sigma1(model.get_submodule(n)) for n in names}
    state = copy.deepcopy(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    ref = logits(model)

    reports = transform(model, alpha=ALPHA, k=K)
    assert [r.name for r in reports] == names
    classes = {type(m) for _, m in specdef_modules(model)}
    for name, (args, kwargs, out) in io.items():
        defended = model.get_submodule(name)
        with torch.no_grad():
            assert rel(defended(*args, **kwargs), out) <= 1e-10, name
        assert sigma1(defended.inner) / before[name] == pytest.approx(ALPHA, rel=0.02), name
    assert rel(logits(model), ref) <= 1e-10
    assert sum(p.numel() for p in model.parameters()) == n_params + sum(r.shape[0] ** 2 for r in reports)

    folder = save_defended(model, None, tmp_path / f"{model_type}-release")
    loaded, _ = load_defended(folder, **({"experts_implementation": "eager"} if "experts" in str(names) else {}))
    assert torch.equal(logits(loaded), logits(model))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert list(loaded.state_dict()) == list(model.state_dict())
    buffers = dict(model.named_buffers())
    assert all(torch.equal(b, buffers[n]) for n, b in loaded.named_buffers())  # non-persistent ones too

    collapse(loaded)
    assert not specdef_modules(loaded) and sum(p.numel() for p in loaded.parameters()) == n_params
    restored = loaded.state_dict()
    assert list(restored) == list(state)
    for key, value in state.items():
        assert float((restored[key] - value).abs().max()) <= 1e-10 * max(float(value.abs().max()), 1.0), key
    spectral_inverse(model)
    assert rel(torch.cat([p.flatten() for p in model.state_dict().values()]),
               torch.cat([p.flatten() for p in state.values()])) <= 1e-10
    return reports, classes


@pytest.mark.parametrize("model_type", [*FAMILIES, *MORE])
def test_default_layers_defend_each_family_exactly(model_type, tmp_path):
    overrides, last_name, cls = {**FAMILIES, **MORE}[model_type]
    reports, classes = check_family(model_type, overrides, tmp_path)
    assert len(reports) == 3 and all(r.name.endswith(f".{last_name}") for r in reports)
    assert classes == {cls}
    assert {r.kind for r in reports} == {"experts" if cls is SpecDefExperts else "conv1d" if model_type == "gpt2"
                                         else "linear"}


@pytest.mark.parametrize("model_type", list(MIXED))
def test_moe_families_with_dense_and_shared_experts(model_type, tmp_path):
    reports, classes = check_family(model_type, MIXED[model_type], tmp_path)
    assert classes == {SpecDefExperts, SpecDefLinear}
    kinds = {r.name.split(".mlp.")[1]: r.kind for r in reports}
    shared = "shared_expert.down_proj" if model_type == "qwen2_moe" else "shared_experts.down_proj"
    assert kinds["experts"] == "experts" and kinds[shared] == "linear"
    blocks = {r.name.split(".mlp.")[0] for r in reports}
    assert len(blocks) == 3  # DeepSeek-V3: the dense block 0 and both MoE blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_experts_keep_their_grouped_mm_kernel(model_type, dtype, tmp_path, monkeypatch):
    """In float32 and bfloat16 the defended experts run transformers' grouped_mm, and the logits stay
    within the dtype's floor: the undefended model's own distance from float64, plus eps·α from
    rounding W' (results/precision_frontier.md)."""
    import transformers.integrations.moe as moe
    overrides = FAMILIES[model_type][0]
    exact = logits(pretrained(model_type, overrides, torch.float64, tmp_path))
    model = pretrained(model_type, overrides, dtype, tmp_path)
    assert model.config._experts_implementation == "grouped_mm"
    floor = rel(logits(model), exact)
    alpha = 10.0
    transform(model, alpha=alpha, k=K)
    calls = []
    grouped = moe._grouped_mm
    monkeypatch.setattr(moe, "_grouped_mm", lambda *a, **kw: calls.append(1) or grouped(*a, **kw))
    out = logits(model)
    assert len(calls) == 2 * 3  # gate_up and down of 3 blocks
    assert rel(out, exact) <= floor + 4 * torch.finfo(dtype).eps * alpha


def test_experts_are_found_by_their_parameter_name_too(tmp_path):
    model = pretrained("mixtral", FAMILIES["mixtral"][0], torch.float32, tmp_path)
    assert match_layers(model, ["*.experts.down_proj"]) == [f"model.layers.{i}.mlp.experts" for i in range(3)]


@use_experts_implementation(has_post_expert_norm=True)
class NormedExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.down_proj = nn.Parameter(torch.zeros(2, 8, 4))


def test_experts_with_a_norm_after_each_expert_are_refused():
    model = nn.Module()
    model.experts = NormedExperts(AutoConfig.for_model("mixtral"))
    with pytest.raises(ConfigError, match=r"defense.layers='experts': experts cannot be defended: it normalises "
                                          r"each expert's output"):
        transform(model, alpha=10.0, k=2, layers=["experts"])


def test_k_above_a_layers_rank_errors_clips_or_skips(tmp_path, caplog):
    """Qwen2-MoE, every layer: shared_expert_gate is 1 x 64, so k = 4 exceeds its rank."""
    overrides = MIXED["qwen2_moe"]
    model = pretrained("qwen2_moe", overrides, torch.float32, tmp_path)
    with pytest.raises(ConfigError, match=r"defense.k=4: allowed an integer in 1..1 \(the rank bound of "
                                          r"model.layers.0.mlp.shared_expert_gate, shape \(1, 64\)\); or "
                                          r"defense.k_policy=clip\|skip"):
        transform(model, alpha=10.0, k=K, layers=["*"])
    with pytest.raises(ConfigError, match="defense.k_policy='drop': allowed error, clip, skip"):
        transform(model, alpha=10.0, k=K, layers=["*"], k_policy="drop")
    assert not specdef_modules(model)

    gates = [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(3)]
    plan = plan_layers(model, ["*"], K, "skip")
    assert [s["name"] for s in plan.skipped] == gates and not set(gates) & set(plan.k)
    with caplog.at_level(logging.WARNING, logger="specdef.core"):
        reports = transform(model, alpha=10.0, k=K, layers=["*"], k_policy="clip")
    assert sum("clipped to their rank (defense.k_policy=clip)" in r.message for r in caplog.records) == 1
    assert {r.name: r.k for r in reports if r.name in gates} == dict.fromkeys(gates, 1)
    assert all(r.k == K for r in reports if r.name not in gates)
    manifest = json.loads((save_defended(model, None, tmp_path / "release", record={"k": K, "k_policy": "clip"})
                           / "manifest.json").read_text())
    assert manifest["k_policy"] == "clip"
    assert {e["name"]: e["k"] for e in manifest["layers"] if e["name"] in gates} == dict.fromkeys(gates, 1)


def test_defaults_that_miss_a_block_say_so(tmp_path, caplog):
    model = pretrained("llama", {}, torch.float32, tmp_path)
    model.model.layers[1].mlp = nn.Identity()  # a block whose MLP the defaults do not know
    with caplog.at_level(logging.WARNING, logger="specdef.core"):
        reports = transform(model, alpha=10.0, k=K)
    assert [r.name for r in reports] == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    lines = [r.message for r in caplog.records if "decoder blocks" in r.message]
    assert lines == ["specdef: the default layers cover 2 of 3 decoder blocks; no defended layer in "
                     "['model.layers.1'] (name them in defense.layers)"]


def test_run_record_and_manifest_say_what_the_defaults_and_k_policy_left_out(tiny_model, data, tmp_path):
    """The pretrained tiny Llama with block 3's MLP swapped for one the defaults do not know, and k above
    the rank (128) of every down projection under k_policy=clip."""
    from specdef.defense import SpecDef
    model, tokenizer = tiny_model
    model.model.layers[3].mlp = nn.Identity()
    defense = SpecDef(alpha=10.0, k=129, layers=None, k_policy="clip", drift_samples=8, save_dir=str(tmp_path / "rel"))
    defense(model, tokenizer, data)
    info = defense.info
    defended = [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    assert info["layers_matched"] == defended and info["k_policy"] == "clip"
    assert info["layers_clipped"] == [{"name": n, "rank": 128} for n in defended] and info["layers_skipped"] == []
    assert info["blocks_without_defended_layer"] == ["model.layers.3"]
    assert [r["k"] for r in info["layer_reports"]] == [128] * 3
    assert info["drift"]["rel_logit_error"] < 1e-5
    manifest = json.loads((tmp_path / "rel" / "manifest.json").read_text())
    assert {key: manifest[key] for key in ("k", "k_policy", "layers_clipped", "blocks_without_defended_layer")} == {
        "k": 129, "k_policy": "clip", "layers_clipped": info["layers_clipped"],
        "blocks_without_defended_layer": ["model.layers.3"]}
