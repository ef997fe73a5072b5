"""sparseft.merge: methods against mergekit and float64 references, LiNeS, streaming atomic I/O, CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparseft import merge
from sparseft.merge import io as mio
from sparseft.merge.lines import LinesSchedule

transformers = pytest.importorskip("transformers")

LAYERS = 3


def _config(**extra):
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                    max_position_embeddings=64, tie_word_embeddings=True, **extra)


def _distinct_noise(t, generator, scale):
    """A perturbation whose |values| are all distinct (no ties at any TIES threshold)."""
    n = t.numel()
    magnitudes = (torch.randperm(n, generator=generator).double() + 1) / n
    signs = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    return (magnitudes * signs * scale).view(t.shape)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny float32 Llama base and three fine-tunes (distinct |τ|), saved as HF directories."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_config())
    base.save_pretrained(root / "base")
    generator = torch.Generator().manual_seed(1)
    fts = []
    base_sd = load_file(str(root / "base" / "model.safetensors"))
    for i in range(3):
        sd = {}
        for name, t in base_sd.items():
            sd[name] = (t.double() + _distinct_noise(t, generator, 0.02 * (1.0, 1.37, 1.91)[i])).float()
        path = root / f"ft{i}"
        path.mkdir()
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        for side in ("config.json", "generation_config.json"):
            (path / side).write_text((root / "base" / side).read_text())
        fts.append(str(path))
    return {"root": root, "base": str(root / "base"), "models": fts}


def _read_dir(path):
    path = str(path)
    index = os.path.join(path, mio.INDEX_NAME)
    if os.path.isfile(index):
        files = set(json.load(open(index))["weight_map"].values())
    else:
        files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


# ------------------------------------------------------------------------------------------------
# float64 references (independent of the op)


def _ref_merge(base, tuned, method, weights, density=None, scale=1.0, normalize=None, consensus=(0.4, 2)):
    b = base.double()
    taus = [(x.float() - base.float()).double() for x in tuned]  # τ_t in float32, as the contract says
    if method == "linear":
        num = sum(w * x.double() for w, x in zip(weights, tuned))
        return num / sum(weights)
    d = []
    for tau, w, rho in zip(taus, weights, density or [1.0] * len(taus)):
        if method == "ties" and rho < 1:
            k = max(1, int(rho * tau.numel()))
            keep = torch.zeros(tau.numel(), dtype=torch.bool)
            keep[torch.argsort(tau.abs().reshape(-1), descending=True)[:k]] = True
            tau = tau * keep.view(tau.shape)
        d.append(w * tau)
    if method == "ties":
        # the election compares a float32 sum with 0, as the op does (near-zero sums decide alike)
        sigma = torch.where(sum(x.float() for x in d) >= 0, 1.0, -1.0).double()
        masks = [(torch.sign(x) == sigma).double() for x in d]
        merged = sum(m * x for m, x in zip(masks, d))
        if normalize is None or normalize:
            div = sum(w * m for w, m in zip(weights, masks))
            merged = merged / torch.where(div == 0, torch.ones_like(div), div)
    else:
        merged = sum(d)
        if normalize:
            merged = merged / sum(weights)
    if method == "consensus":
        lam, k = consensus
        votes = sum((x.abs() >= lam * (merged - x).abs()).int() for x in d)
        merged = merged * (votes >= k)
    return b + scale * merged


def _inputs(checkpoints):
    base = _read_dir(checkpoints["base"])
    models = [_read_dir(m) for m in checkpoints["models"]]
    return base, models


@pytest.mark.parametrize("method,kwargs", [
    ("linear", dict(weights=[1.0, 2.0, 0.5])),
    ("task_arithmetic", dict(weights=[0.5, 0.3, 0.7], scale=0.9)),
    ("task_arithmetic", dict(weights=[0.5, 0.3, 0.7], normalize=True)),
    ("ties", dict(weights=[1.0, 0.8, 1.2], density=[0.3, 0.5, 0.2])),
    ("ties", dict(weights=[1.0, 1.0, 1.0], density=[1.0, 1.0, 1.0], normalize=False)),
    ("consensus", dict(weights=[0.6, 0.6, 0.6])),
])
def test_methods_against_float64(checkpoints, method, kwargs):
    base, models = _inputs(checkpoints)
    got = merge.merge(base, models, method, **kwargs)
    assert set(got) == set(base)
    ref_kwargs = dict(kwargs)
    ref_kwargs.setdefault("density", None)
    for name in base:
        ref = _ref_merge(base[name], [m[name] for m in models], method, **ref_kwargs)
        torch.testing.assert_close(got[name].double(), ref, atol=2e-6, rtol=1e-5, msg=f"{method} {name}")


def test_dare_statistics(checkpoints):
    base, models = _inputs(checkpoints)
    name = "model.layers.1.mlp.down_proj.weight"
    b, x = base[name], models[0][name]
    tau = x.double() - b.double()
    for rescale in (True, False):
        got = merge.merge({name: b}, [{name: x}], "dare_linear", density=0.3, rescale=rescale, seed=3)[name]
        delta = got.double() - b.double()
        kept = delta.abs() > 1e-7
        assert abs(kept.double().mean().item() - 0.3) < 0.03
        expected = tau / 0.3 if rescale else tau
        torch.testing.assert_close(delta[kept], expected[kept], atol=1e-6, rtol=1e-4)
    # deterministic per (seed, tensor name), independent of other tensors and their order
    a = merge.merge({name: b}, [{name: x}], "dare_ties", density=0.5, seed=7)[name]
    other = "model.layers.0.mlp.down_proj.weight"
    c = merge.merge({other: base[other], name: b}, [{other: models[0][other], name: x}], "dare_ties",
                    density=0.5, seed=7)[name]
    assert torch.equal(a, c)
    d = merge.merge({name: b}, [{name: x}], "dare_ties", density=0.5, seed=8)[name]
    assert not torch.equal(a, d)


def test_dare_ties_against_float64_given_masks(checkpoints):
    """dare_ties = TIES' sign election over the DARE-dropped, rescaled task vectors (masks read back)."""
    base, models = _inputs(checkpoints)
    name = "model.layers.2.self_attn.q_proj.weight"
    b, xs = base[name], [m[name] for m in models]
    singles = [merge.merge({name: b}, [{name: x}], "dare_linear", density=0.4, seed=5, weights=1.0)[name]
               for x in xs]
    # with one model the drop pattern of task 0 is seeded by (seed, name, 0); recover each task's mask
    # by merging that model alone at task position t
    keeps = []
    for t, x in enumerate(xs):
        models_t = [{name: b}] * t + [{name: x}]
        out = merge.merge({name: b}, models_t, "dare_linear", density=0.4, seed=5)[name]
        keeps.append((out.double() - b.double()).abs() > 1e-7)
    assert singles[0].shape == b.shape
    got = merge.merge({name: b}, [{name: x} for x in xs], "dare_ties", density=0.4, seed=5,
                      weights=[1.0, 0.5, 2.0])[name]
    d = [w * k.double() * (x.double() - b.double()) / 0.4 for w, k, x in zip([1.0, 0.5, 2.0], keeps, xs)]
    sigma = torch.where(sum(d) >= 0, 1.0, -1.0).double()
    ref = b.double() + sum((torch.sign(x) == sigma).double() * x for x in d)
    torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=1e-5)


def test_global_trim(checkpoints):
    base, models = _inputs(checkpoints)
    got = merge.merge(base, models[:2], "ties", density=0.25, trim="global")
    names = list(base)
    for t, m in enumerate(models[:2]):
        taus = torch.cat([(m[n].float() - base[n].float()).abs().reshape(-1) for n in names])
        theta = torch.sort(taus, descending=True).values[int(0.25 * taus.numel()) - 1]
        # per-tensor reference with the global threshold
        for n in names[:4]:
            tau = (m[n].double() - base[n].double())
            assert ((tau.abs() >= theta.double()).sum() >= 0)
    # the merged result equals the float64 TIES with the global thresholds
    thetas = []
    for m in models[:2]:
        taus = torch.cat([(m[n].float() - base[n].float()).abs().reshape(-1) for n in names])
        thetas.append(torch.sort(taus, descending=True).values[int(0.25 * taus.numel()) - 1].double())
    for n in names:
        b = base[n].double()
        d = [(m[n].float() - base[n].float()).double() for m in models[:2]]
        d = [x * (x.abs() >= th) for x, th in zip(d, thetas)]
        sigma = torch.where(sum(d) >= 0, 1.0, -1.0).double()
        masks = [(torch.sign(x) == sigma).double() for x in d]
        div = sum(masks)
        ref = b + sum(mk * x for mk, x in zip(masks, d)) / torch.where(div == 0, torch.ones_like(div), div)
        torch.testing.assert_close(got[n].double(), ref, atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# against mergekit


def _run_mergekit(config_yaml, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    import yaml
    cfg = MergeConfiguration.model_validate(yaml.safe_load(config_yaml))
    run_merge(cfg, str(out), options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                                  lazy_unpickle=False, device="cpu"))
    return _read_dir(out)


def _yaml(method, checkpoints, model_params, shared=None, include_base=False):
    lines = [f"merge_method: {method}"]
    if method != "linear":
        lines.append(f"base_model: {checkpoints['base']}")
    lines.append("models:")
    for path, params in zip(checkpoints["models"], model_params):
        lines.append(f"  - model: {path}")
        lines.append(f"    parameters: {json.dumps(params)}")
    if shared:
        lines.append(f"parameters: {json.dumps(shared)}")
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


MERGEKIT_CASES = [
    ("linear", [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}], None),
    ("task_arithmetic", [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.7}], {"lambda": 0.9}),
    ("ties", [{"weight": 1.0, "density": 0.3}, {"weight": 0.8, "density": 0.5}, {"weight": 1.2, "density": 0.2}],
     None),
    ("task_arithmetic", [{"weight": [0.2, 1.0]}, {"weight": [1.0, 0.5, 0.1]}, {"weight": 0.4}], None),
    ("ties", [{"weight": 1.0, "density": [0.2, 0.6]}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.3}],
     {"lambda": [0.5, 1.0]}),
    ("dare_linear", [{"weight": 1.0, "density": 1.0}, {"weight": 0.5, "density": 1.0}, {"weight": 0.2}], None),
    ("task_arithmetic", [{"weight": [{"filter": "self_attn", "value": 0.3}, {"value": [0.8, 0.1]}]},
                         {"weight": 0.5}, {"weight": 0.6}], {"normalize": True}),
]


@pytest.mark.parametrize("method,params,shared", MERGEKIT_CASES)
def test_against_mergekit_and_cli(checkpoints, tmp_path, method, params, shared):
    pytest.importorskip("mergekit")
    config = _yaml(method, checkpoints, params, shared)
    expected = _run_mergekit(config, tmp_path / "mk")
    (tmp_path / "c.yaml").write_text(config)
    from sparseft.cli import main
    assert main(["merge", str(tmp_path / "c.yaml"), str(tmp_path / "ours"), "--quiet", "--max-shard-size", "40KB"]) == 0
    assert os.path.isfile(tmp_path / "ours" / mio.INDEX_NAME)
    ours = _read_dir(tmp_path / "ours")
    assert set(ours) == set(expected)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], atol=1e-6, rtol=0, msg=name)
    # the API gives the same bits as the CLI
    api = merge.merge_from_config(str(tmp_path / "c.yaml"), None)
    for name in ours:
        assert torch.equal(api[name], ours[name])


# ------------------------------------------------------------------------------------------------
# LiNeS


@pytest.mark.parametrize("naming,layers", [("model.layers.{}.mlp.up_proj.weight", 4),
                                           ("transformer.h.{}.attn.c_attn.weight", 5)])
def test_lines_schedule(naming, layers):
    alpha, beta = 0.3, 0.6
    s = LinesSchedule(alpha, beta, layers, overrides={"special": 0.9})
    for n in range(layers):
        assert s(naming.format(n)) == pytest.approx(alpha + beta * n / (layers - 1))
    for outside in ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight", "transformer.ln_f.bias"):
        assert s(outside) == alpha
    assert s("model.layers.0.special.weight") == 0.9
    from sparseft.merge.lines import num_layers
    names = [naming.format(n) for n in range(layers)]
    assert num_layers({}, names) == layers
    assert num_layers({"num_hidden_layers": 7}, names) == 7
    assert num_layers({"n_layer": 6}, names) == 6


def test_lines_merge_and_single_task(checkpoints, tmp_path):
    base, models = _inputs(checkpoints)
    got = merge.merge(base, models, "task_arithmetic", weights=[1.0, 1.0, 1.0], lines=(0.2, 0.5), num_layers=LAYERS)
    sched = LinesSchedule(0.2, 0.5, LAYERS)
    for name in base:
        ref = _ref_merge(base[name], [m[name] for m in models], "task_arithmetic", [1.0] * 3, scale=sched(name))
        torch.testing.assert_close(got[name].double(), ref, atol=2e-6, rtol=1e-5)
    # auto: α = (1/T)·‖Σ τ‖₁/‖τ_merged‖₁ = 1/T for task arithmetic; β = 1 − α
    auto = merge.merge(base, models, "task_arithmetic", lines="auto", num_layers=LAYERS)
    sched = LinesSchedule(1 / 3, 2 / 3, LAYERS)
    for name in base:
        ref = _ref_merge(base[name], [m[name] for m in models], "task_arithmetic", [1.0] * 3, scale=sched(name))
        torch.testing.assert_close(auto[name].double(), ref, atol=2e-6, rtol=1e-5)
    # single task, from HF directories to an HF directory
    out = merge.lines(checkpoints["base"], checkpoints["models"][0], alpha=0.5, out=tmp_path / "scaled")
    scaled = _read_dir(out)
    sched = LinesSchedule(0.5, 0.5, LAYERS)
    for name in base:
        ref = base[name].double() + sched(name) * (models[0][name].double() - base[name].double())
        torch.testing.assert_close(scaled[name].double(), ref, atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# I/O: formats, tied embeddings, sharding, dtype, loading in transformers


def test_output_dir_loads_and_generates(checkpoints, tmp_path):
    out = merge.merge(checkpoints["base"], checkpoints["models"], "ties", density=0.3, out=tmp_path / "m",
                      dtype="bfloat16", max_shard_size="20KB")
    files = sorted(os.listdir(out))
    assert "config.json" in files and "generation_config.json" in files and mio.INDEX_NAME in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    assert not any(f.startswith(".") for f in os.listdir(tmp_path))
    sd = _read_dir(out)
    assert "lm_head.weight" not in sd  # tied: absent in the base's files, absent here
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    generated = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
    ref = merge.merge(checkpoints["base"], checkpoints["models"], "ties", density=0.3, dtype=torch.bfloat16)
    for name in sd:
        assert torch.equal(sd[name], ref[name])


def test_input_kinds_agree(checkpoints, tmp_path):
    torch.manual_seed(0)
    base_module = transformers.LlamaForCausalLM.from_pretrained(checkpoints["base"])
    base_file = os.path.join(checkpoints["base"], "model.safetensors")
    models = [os.path.join(m, "model.safetensors") for m in checkpoints["models"]]
    from_dirs = merge.merge(checkpoints["base"], checkpoints["models"], "task_arithmetic", weights=0.3)
    from_files = merge.merge(base_file, models, "task_arithmetic", weights=0.3)
    from_module = merge.merge(base_module, checkpoints["models"], "task_arithmetic", weights=0.3)
    # a tied model's state dict holds lm_head.weight as the embedding's storage: kept once
    from_state_dict = merge.merge(base_module.state_dict(), checkpoints["models"], "task_arithmetic", weights=0.3)
    assert set(from_state_dict) == set(from_dirs)
    for name in from_dirs:
        assert torch.equal(from_dirs[name], from_files[name])
        assert torch.equal(from_dirs[name], from_module[name])
        assert torch.equal(from_dirs[name], from_state_dict[name])
    # a sharded input directory reads the same
    sharded = tmp_path / "sharded"
    merge.merge(checkpoints["models"][0], [checkpoints["models"][0]], "task_arithmetic", weights=0.0,
                out=sharded, max_shard_size="30KB")
    assert os.path.isfile(sharded / mio.INDEX_NAME)
    again = merge.merge(checkpoints["base"], [str(sharded), *checkpoints["models"][1:]], "task_arithmetic",
                        weights=0.3)
    for name in from_dirs:
        assert torch.equal(from_dirs[name], again[name])


def test_mixed_dtypes_rule(checkpoints):
    base, models = _inputs(checkpoints)
    half = {n: t.to(torch.bfloat16) for n, t in models[0].items()}
    got = merge.merge(base, [half, models[1]], "task_arithmetic")
    assert all(t.dtype == torch.float32 for t in got.values())  # the base's dtype
    got16 = merge.merge(base, [half, models[1]], "task_arithmetic", dtype="float16")
    assert all(t.dtype == torch.float16 for t in got16.values())
    name = "model.norm.weight"
    b = base[name].double()
    ref = b + (half[name].double() - b) + (models[1][name].double() - b)
    torch.testing.assert_close(got[name].double(), ref, atol=2e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# atomic output and bad input: nothing written, the error names the cause


def _assert_clean(parent, out_name):
    assert not os.path.exists(os.path.join(parent, out_name))
    assert not [e for e in os.listdir(parent) if "sparseft-tmp" in e]


def test_failing_writer_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = mio.ShardWriter.write

    def write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return original(self, name, tensor)

    monkeypatch.setattr(mio.ShardWriter, "write", write)
    with pytest.raises(OSError, match="No space left"):
        merge.merge(checkpoints["base"], checkpoints["models"], "ties", density=0.5, out=tmp_path / "out",
                    max_shard_size="20KB")
    _assert_clean(tmp_path, "out")


def test_existing_output_refused_then_forced(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge.merge(checkpoints["base"], checkpoints["models"], "task_arithmetic", out=out)
    assert (out / "keep.txt").exists()
    merge.merge(checkpoints["base"], checkpoints["models"], "task_arithmetic", out=out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not [e for e in os.listdir(tmp_path) if e != "out"]


def _bad(tmp_path, checkpoints, **kwargs):
    args = dict(base=checkpoints["base"], models=checkpoints["models"], method="ties", out=tmp_path / "out")
    args.update(kwargs)
    return args


@pytest.mark.parametrize("change,match", [
    (dict(density=1.5), r"density\[0\].*\(0, 1\]"),
    (dict(density=0.0), r"density"),
    (dict(weights=[1.0, 2.0]), r"weights: 2 values for 3 models"),
    (dict(lines=(-0.1, 0.5)), r"lines: alpha"),
    (dict(lines=(0.5, float("nan"))), r"lines: beta"),
    (dict(method="slerp"), r"unknown merge method 'slerp'"),
    (dict(dtype="int8"), r"dtype"),
])
def test_bad_arguments(checkpoints, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        merge.merge(**_bad(tmp_path, checkpoints, **change))
    _assert_clean(tmp_path, "out")


def test_bad_inputs(checkpoints, tmp_path):
    base, models = _inputs(checkpoints)
    # different names / shapes: the first offending tensor is named
    missing = dict(models[1])
    missing.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"models\[1\].*model.layers.1.mlp.up_proj.weight"):
        merge.merge(checkpoints["base"], [models[0], missing], out=tmp_path / "out")
    reshaped = dict(models[0])
    reshaped["model.norm.weight"] = torch.ones(31)
    with pytest.raises(ValueError, match=r"model.norm.weight.*shape"):
        merge.merge(checkpoints["base"], [reshaped], out=tmp_path / "out")
    # NaN in an input tensor: named; nothing written even though earlier tensors were merged
    nan = dict(models[0])
    name = list(base)[-1]
    nan[name] = nan[name].clone()
    nan[name].view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=rf"models\[0\].*{name}.*NaN"):
        merge.merge(checkpoints["base"], [nan], out=tmp_path / "out")
    _assert_clean(tmp_path, "out")
    # missing and truncated safetensors files
    with pytest.raises(ValueError, match="does not exist"):
        merge.merge("no/such/dir", checkpoints["models"], out=tmp_path / "out")
    truncated = tmp_path / "trunc"
    truncated.mkdir()
    data = open(os.path.join(checkpoints["models"][0], "model.safetensors"), "rb").read()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        merge.merge(checkpoints["base"], [str(truncated)], out=tmp_path / "out")
    # output inside an input directory
    with pytest.raises(ValueError, match="inside"):
        merge.merge(checkpoints["base"], checkpoints["models"], out=os.path.join(checkpoints["models"][0], "merged"))
    assert not os.path.exists(os.path.join(checkpoints["models"][0], "merged"))
    _assert_clean(tmp_path, "out")


def test_yaml_errors_name_key_and_line(checkpoints, tmp_path):
    from sparseft.merge.config import ConfigError, load_config
    good = _yaml("ties", checkpoints, [{"weight": 1.0, "density": 0.5}] * 3)
    assert load_config(good)["method"] == "ties"
    with_base = good.replace("models:\n", f"models:\n  - model: {checkpoints['base']}\n", 1)
    assert load_config(with_base)["models"] == checkpoints["models"]  # the base among the models is no task
    bad_density = good.replace('"density": 0.5}', '"density": 1.5}', 1)
    with pytest.raises(ConfigError, match=r"line 5: key 'density'"):
        load_config(bad_density)
    bad_second = good.replace('"density": 0.5}', '"density": 2}', 2).replace('"density": 2}', '"density": 0.5}', 1)
    with pytest.raises(ConfigError, match=r"line 7: key 'density'.*density\[1\]"):
        load_config(bad_second)
    with pytest.raises(ConfigError, match=r"line 1: key 'merge_method'.*unknown merge method"):
        load_config(good.replace("ties", "slerp", 1))
    with pytest.raises(ConfigError, match=r"line \d+: key 'lines'"):
        load_config(good + "lines: {alpha: -1, beta: 0.5}\n")
    with pytest.raises(ConfigError, match=r"line \d+: key 'frobnicate'"):
        load_config(good + "frobnicate: 3\n")
    with pytest.raises(ConfigError, match=r"line 3: not valid YAML"):
        load_config("merge_method: ties\nmodels: [\n")
    path = tmp_path / "bad.yaml"
    path.write_text(good.replace("ties", "slerp", 1))
    result = subprocess.run([sys.executable, "-m", "sparseft.cli", "merge", str(path), str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "line 1" in result.stderr and "merge_method" in result.stderr
    _assert_clean(tmp_path, "o")


# ------------------------------------------------------------------------------------------------
# SparseDelta merges on the compact form


def _random_delta(base, density, seed):
    from sparseft import SparseDelta
    g = torch.Generator().manual_seed(seed)
    indices, values, shapes = {}, {}, {}
    for name, t in base.items():
        if t.dim() != 2:
            continue
        k = max(1, int(density * t.numel()))
        idx = torch.randperm(t.numel(), generator=g)[:k].sort().values
        indices[name] = idx.to(torch.int32)
        values[name] = _distinct_noise(torch.empty(k), g, 0.03).float()
        shapes[name] = tuple(t.shape)
    return SparseDelta(indices, values, shapes)


@pytest.mark.parametrize("method,kwargs", [("task_arithmetic", dict(weights=[0.7, 0.4])),
                                           ("ties", dict(density=[0.05, 0.08])),
                                           ("consensus", dict(consensus_k=1))])
def test_sparse_delta_merge_equals_dense(checkpoints, tmp_path, method, kwargs):
    base, _ = _inputs(checkpoints)
    deltas = [_random_delta(base, 0.1, 1), _random_delta(base, 0.1, 2)]
    deltas[1].save(tmp_path / "d1.safetensors")
    merged = merge.merge_deltas([deltas[0], str(tmp_path / "d1.safetensors")], method, lines=(0.5, 0.5),
                                num_layers=LAYERS, **kwargs)
    assert merged.nnz <= deltas[0].nnz + deltas[1].nnz
    # the same merge, dense: base + delta_t as full models (SparseDelta inputs of merge.merge)
    dense = merge.merge(base, [deltas[0], str(tmp_path / "d1.safetensors")], method, lines=(0.5, 0.5),
                        num_layers=LAYERS, **kwargs)
    applied = {n: t.clone() for n, t in base.items()}
    merged.apply(applied)
    for name in base:
        torch.testing.assert_close(applied[name], dense[name], atol=2e-6, rtol=1e-5, msg=name)
    merged.save(tmp_path / "m.safetensors")
    assert type(merged).load(tmp_path / "m.safetensors").nnz == merged.nnz


def test_sparse_delta_scaled(checkpoints):
    base, _ = _inputs(checkpoints)
    delta = _random_delta(base, 0.1, 3)
    scaled = delta.scaled(lines=(0.2, 0.8), num_layers=LAYERS)
    sched = LinesSchedule(0.2, 0.8, LAYERS)
    for name in delta.shapes:
        assert torch.equal(scaled.indices[name], delta.indices[name])
        torch.testing.assert_close(scaled.values[name], delta.values[name] * sched(name))
    assert scaled.nnz == delta.nnz


# ------------------------------------------------------------------------------------------------
# streaming, offline, interrupts


def test_streams_one_tensor_at_a_time(checkpoints, tmp_path, monkeypatch):
    """Each tensor is written before the next tensor's inputs are read (memory: a few tensors)."""
    events = []
    original_get, original_write = mio._SafetensorsFiles.get, mio.ShardWriter.write

    def get(self, name):
        events.append(("read", name))
        return original_get(self, name)

    def write(self, name, tensor):
        events.append(("write", name))
        return original_write(self, name, tensor)

    monkeypatch.setattr(mio._SafetensorsFiles, "get", get)
    monkeypatch.setattr(mio.ShardWriter, "write", write)
    merge.merge(checkpoints["base"], checkpoints["models"], "ties", density=0.5, out=tmp_path / "o",
                max_shard_size="20KB")
    pending = set()
    for kind, name in events:
        if kind == "read":
            pending.add(name)
            assert len(pending) == 1, "inputs of two tensors were held at once"
        else:
            pending.discard(name)
    assert sum(k == "write" for k, _ in events) == len(_read_dir(checkpoints["base"]))


def test_relative_paths_offline(checkpoints, tmp_path, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("merge touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.chdir(checkpoints["root"])
    (tmp_path / "c.yaml").write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                                     "  - model: ft0\n    parameters: {weight: 0.5}\n"
                                     "  - model: ./ft1\n    parameters: {weight: 0.5}\n")
    from sparseft.cli import main
    assert main(["merge", str(tmp_path / "c.yaml"), str(tmp_path / "rel"), "--quiet"]) == 0
    absolute = merge.merge(checkpoints["base"], checkpoints["models"][:2], weights=0.5)
    got = _read_dir(tmp_path / "rel")
    for name in absolute:
        assert torch.equal(got[name], absolute[name])


def test_interrupt_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    original = mio.ShardWriter.write
    state = {"n": 0}

    def write(self, name, tensor):
        state["n"] += 1
        if state["n"] == 3:
            raise KeyboardInterrupt
        return original(self, name, tensor)

    monkeypatch.setattr(mio.ShardWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        merge.merge(checkpoints["base"], checkpoints["models"], out=tmp_path / "o")
    _assert_clean(tmp_path, "o")


def test_backends_agree_through_the_api(checkpoints):
    """Every merge-op backend available here gives the API the same merge (cpu: bit for bit)."""
    ops = pytest.importorskip("sparseft.ops.merge")
    from sparseft import _backends
    base, models = _inputs(checkpoints)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    base = {n: base[n] for n in names}
    models = [{n: m[n] for n in names} for m in models]
    results = {}
    for backend in _backends.BACKENDS:
        if backend not in getattr(ops, "IMPLEMENTED", ()) or not _backends.availability(backend, "cpu")[0]:
            continue
        try:
            results[backend] = merge.merge(base, models, "dare_ties", density=0.4, seed=2, backend=backend)
        except (RuntimeError, NotImplementedError) as exc:  # a backend without this op here
            pytest.skip(f"{backend}: {exc}")
    assert "torch" in results
    for backend, got in results.items():
        for n in names:
            torch.testing.assert_close(got[n], results["torch"][n], atol=1e-6, rtol=0, msg=f"{backend} {n}")


def test_chunked_merge_equals_one_call(checkpoints, monkeypatch):
    from sparseft.merge import api
    base, models = _inputs(checkpoints)
    whole = merge.merge(base, models, "dare_ties", density=0.5, seed=1)
    monkeypatch.setattr(api, "CHUNK", 1000)
    chunked = merge.merge(base, models, "dare_ties", density=0.5, seed=1)
    for name in whole:
        assert torch.equal(whole[name], chunked[name])


def test_output_beside_a_file_input_is_fine_but_not_over_an_input(checkpoints, tmp_path):
    base, models = _inputs(checkpoints)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(models[0], str(tmp_path / "ft.safetensors"))
    out = merge.merge(str(tmp_path / "base.safetensors"), [str(tmp_path / "ft.safetensors")], out=tmp_path / "m")
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    with pytest.raises(ValueError, match=r"\(or holds\) the input"):
        merge.merge(str(tmp_path / "base.safetensors"), [str(tmp_path / "ft.safetensors")], out=tmp_path,
                    overwrite=True)
    assert os.path.isfile(tmp_path / "base.safetensors")


@pytest.mark.slow
def test_merged_smollm2_loads_and_generates(tmp_path):
    """SmolLM2-135M (offline GGUF) as the base, two fine-tunes made here (small random deltas, bf16),
    TIES + LiNeS through the API into a bf16 HF directory that transformers loads and runs."""
    from sparseft.bench.sparse import load_model
    try:
        model = load_model("cpu", torch.float32)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    model = model.to(torch.bfloat16)
    # a GGUF-loaded model refuses save_pretrained: write its HF directory by hand
    (tmp_path / "base").mkdir()
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
              str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path / "base")
    generator = torch.Generator().manual_seed(0)
    tunes = []
    for _ in range(2):  # named_parameters: tied lm_head/embedding once, as save_pretrained writes them
        tunes.append({n: (p.detach().float() + 1e-3 * torch.randn(p.shape, generator=generator)).to(torch.bfloat16)
                      for n, p in model.named_parameters()})
    del model
    out = merge.merge(str(tmp_path / "base"), tunes, "ties", density=0.2, lines=(0.5, 0.5), out=tmp_path / "merged",
                      dtype="bfloat16")
    del tunes
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    ids = merged.generate(torch.tensor([[1, 504, 3458, 314]]), max_new_tokens=5, do_sample=False)
    assert ids.shape == (1, 9)
    with torch.no_grad():
        assert torch.isfinite(merged(ids).logits.float()).all()
