"""Every ```python block of README.md runs as written, against the real package.

Each block runs on its own in a fresh namespace holding small stand-ins for the objects a
reader brings (a model, hidden states, labels, a dataset, TrainingArguments); the checks
below then test what the surrounding text promises about a block's result.
"""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"
VOCAB = 128


def python_blocks():
    """(heading of the enclosing section, first line number, code) per ```python block."""
    blocks, heading, fence = [], None, None
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if fence is None and line.startswith("```"):
            fence, start, code = line[3:].strip(), number + 1, []
        elif fence is not None and line.startswith("```"):
            if fence == "python":
                blocks.append((heading, start, "\n".join(code)))
            fence = None
        elif fence is not None:
            code.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


def llama(seed=0):
    # Wide enough that masks.lift(rank=128, budget="lora") selects a proper subset of each weight.
    torch.manual_seed(seed)
    # Three blocks, so OwLore's sampler has blocks to leave frozen.
    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # outlier input features, as pretrained LLMs have (OwLore's ratios count them)
        for block, layer in enumerate(model.model.layers):
            layer.self_attn.q_proj.weight[:, : block + 1] *= 40
    return model


def stand_ins(tmp_path):
    """The objects the blocks expect from the reader, small."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, VOCAB, (2, 12), generator=gen)
    labels[0, :4] = -100
    weights = torch.rand(2, 12, generator=gen)
    sequences = torch.randint(0, VOCAB, (8, 16), generator=gen)
    return dict(
        hidden=torch.randn(2, 12, 32, generator=gen, requires_grad=True),
        lm_head=torch.nn.Linear(32, VOCAB, bias=False),
        labels=labels, weights=weights, n=int((labels[:, 1:] != -100).sum()),
        logits=torch.randn(2, 12, VOCAB, generator=gen, requires_grad=True),
        same_keywords=dict(loss_weights=weights, z_loss=1e-4, shift=True),
        ids_p=[5, 6, 7], ids_t=[8, 9], ids_a=[10, 11, 12],
        model=llama(), other_model=llama(),
        data=[{"input_ids": s, "labels": s} for s in sequences],
        calibration=[sequences[:4], sequences[4:]],
        collate=transformers.default_data_collator,
        args=transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=2,
                                            per_device_train_batch_size=4, save_strategy="no", report_to=[],
                                            use_cpu=True, disable_tqdm=True),
    )


def check_loss(ns, before):
    assert ns["loss"].dim() == 0 and torch.isfinite(ns["loss"])


def check_trainer(ns, before):
    ns["trainer"].train()
    assert ns["trainer"].state.global_step == 2


def check_collated(ns, before):
    batch = ns["batch"]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "loss_weights"}
    assert batch["loss_weights"][batch["labels"] == -100].eq(0).all()


def check_sparse_training(ns, before):
    """Only the selected entries trained, and the saved delta carries them to another model."""
    model, selected = ns["model"], ns["selected"]
    assert ns["trainer"].state.global_step == 2
    after = model.state_dict()
    for name, old in before.items():
        new = after[name].view(-1)
        if name not in selected:
            assert torch.equal(old, after[name]), f"{name} is not selected but changed"
            continue
        moved = torch.zeros(old.numel(), dtype=torch.bool)
        moved[selected[name].long()] = True
        assert torch.equal(old.view(-1)[~moved], new[~moved]), f"{name}: an unselected entry changed"
        assert (old.view(-1)[moved] != new[moved]).any(), f"{name}: no selected entry moved"
    other = ns["other_model"].state_dict()
    for name in before:
        torch.testing.assert_close(other[name], after[name], rtol=0, atol=1e-6)


def check_lowrank_training(ns, before):
    """The projected weights and the plain ones both trained."""
    assert ns["trainer"].state.global_step == 2
    after = ns["model"].state_dict()
    for name in ("model.layers.0.mlp.up_proj.weight", "model.norm.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not train"


def check_recipe_training(ns, before):
    """Two LIFT steps through the fused loss: masked entries of a linear moved, its others did not."""
    assert ns["trainer"].state.global_step == 2
    name = "model.layers.0.mlp.up_proj.weight"
    moved = before[name] != ns["model"].state_dict()[name]
    assert moved.any() and moved.float().mean() <= 0.05 + 1e-6


def check_layerwise_owlore(ns, before):
    """Layerwise steps through the Trainer; only the sampled blocks (and the non-block params) moved."""
    assert ns["trainer"].state.global_step == 2 and ns["optimizer"].last_grad_norm is not None
    after, active = ns["model"].state_dict(), ns["sampler"].active_blocks
    assert len(active) == 2
    for block in range(3):
        name = f"model.layers.{block}.mlp.up_proj.weight"
        assert torch.equal(before[name], after[name]) == (block not in active), name
    assert not torch.equal(before["model.norm.weight"], after["model.norm.weight"])


def check_sara(ns, before):
    """The penalty's subgradient reached the trainable values; only small entries moved."""
    assert ns["penalty"].calls == 2
    after = ns["model"].state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    moved = before[name] != after[name]
    assert moved.any() and (before[name][moved].abs() < 2e-3).all()


def merge_inputs(tmp_path):
    """base_dir and three fine-tunes of a small Llama, saved as Hugging Face directories."""
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base_dir")
    for seed, name in enumerate(("ft_a", "ft_b", "ft_c"), 1):
        tuned = transformers.LlamaForCausalLM(config)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            for p in tuned.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 1e-2)
        tuned.save_pretrained(tmp_path / name)


def check_merged(ns, before):
    """Both outputs load in transformers and generate; the merge is bf16 and differs from the base."""
    for out, dtype in (("merged_dir", torch.bfloat16), ("scaled_dir", torch.float32)):
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert model.dtype == dtype
        assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    base = transformers.AutoModelForCausalLM.from_pretrained("base_dir").state_dict()
    merged = transformers.AutoModelForCausalLM.from_pretrained("merged_dir").state_dict()
    name = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(base[name].bfloat16(), merged[name])


def one_rank_process_group(tmp_path):
    """A gloo process group of one, which fully_shard needs; returns its teardown."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    return dist.destroy_process_group


def check_sharded(ns, before):
    """The sharded sparsified model takes a step; only selected entries of q_proj move."""
    from sparseft.distributed import DTensor
    model, optimizer = ns["model"], ns["optimizer"]
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.weight_values, DTensor) and layer.values_in_forward
    values = layer.weight_values.full_tensor().clone()
    model(input_ids=torch.arange(16).view(2, 8), labels=torch.arange(16).view(2, 8)).loss.backward()
    optimizer.step()
    assert not torch.equal(values, layer.weight_values.full_tensor())


SETUPS = {"Layerwise scaled merges (LiNeS, TIES, DARE, consensus)": merge_inputs,
          "Past one machine: DDP and FSDP2": one_rank_process_group}
CHECKS = {
    "Fused masked-loss cross-entropy": check_loss,
    "With a Hugging Face Trainer": check_trainer,
    "Loss-weight collators": check_collated,
    "Sparse-mask gradient updates": check_sparse_training,
    "Low-rank gradient projection (GaLore-style)": check_lowrank_training,
    "Layerwise steps with gradient accumulation, and OwLore layer sampling": check_layerwise_owlore,
    "SaRA: small weights, a nuclear-norm term, progressive re-selection": check_sara,
    "Layerwise scaled merges (LiNeS, TIES, DARE, consensus)": check_merged,
    "Past one machine: DDP and FSDP2": check_sharded,
    "One-line Trainer setup, and R-AMT": check_recipe_training,
}
BLOCKS = python_blocks()


def test_readme_has_the_checked_python_blocks():
    assert set(CHECKS) <= {heading for heading, _, _ in BLOCKS}


@pytest.mark.parametrize("heading, line, code", BLOCKS, ids=[heading for heading, _, _ in BLOCKS])
def test_readme_block_runs(heading, line, code, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # blocks save files under relative names
    ns = stand_ins(tmp_path)
    if heading in SETUPS:
        teardown = SETUPS[heading](tmp_path)
        if teardown is not None:
            request.addfinalizer(teardown)
    before = {name: t.clone() for name, t in ns["model"].state_dict().items()}
    # Blank lines in front keep README line numbers in tracebacks.
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), ns)
    if heading in CHECKS:
        CHECKS[heading](ns, before)
