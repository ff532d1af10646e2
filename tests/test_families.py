"""Model-family adapters and the model fingerprint, on tiny random models of every supported family."""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from fededit_core.model.families import FAMILIES as ADAPTERS
from fededit_core.model.families import UnsupportedModelError, family_for, model_dims, supported_model_types
from fededit_core.model.fingerprint import model_fingerprint
from tests.tiny import FAMILIES, tiny_model_and_tokenizer


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDEDIT_CACHE", str(tmp_path / "cache"))


# which adapter each tiny family must get, and the config fields holding its sizes
EXPECTED_ADAPTER = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
    "gptj": "gptj",
    "gpt_neox": "gpt_neox",
}
FF_FIELD = {
    "llama": "intermediate_size",
    "mistral": "intermediate_size",
    "qwen2": "intermediate_size",
    "gpt_neox": "intermediate_size",
    "gpt2": "n_inner",
    "gptj": "n_inner",
}
_models: dict = {}


def tiny(family):
    """One shared tiny model per family (tests that modify it work on a deepcopy)."""
    if family not in _models:
        _models[family] = tiny_model_and_tokenizer(family)
    return _models[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_for_and_dims(family):
    model, _ = tiny(family)
    adapter = family_for(model)
    assert adapter.name == EXPECTED_ADAPTER[family]
    assert family_for(model.config.model_type) is adapter
    cfg = model.config
    assert model_dims(model) == (cfg.num_hidden_layers, cfg.hidden_size, getattr(cfg, FF_FIELD[family]))
    assert model_dims(model) == (4, 64, 128)
    assert len(adapter.layers(model)) == cfg.num_hidden_layers
    # the other paths of the adapter name real modules
    assert adapter.base_model(model) is model.base_model
    seen = {}
    handle = model.get_submodule(adapter.attn_out_module_name(1)).register_forward_hook(
        lambda module, args, out: seen.setdefault("attn", out)
    )
    try:
        model(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        handle.remove()
    assert seen["attn"].shape == (1, 3, 64)  # PMET adds its attention delta to this output


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_model_dims_follow_the_config(family):
    """Not just the tiny defaults: other layer counts and widths are read off the model."""
    model, _ = tiny_model_and_tokenizer(family, **{"num_hidden_layers": 3, FF_FIELD[family]: 96})
    assert model_dims(model) == (3, 64, 96)


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_and_base_model_give_the_logits(family):
    """lm_head(base_model(x)) is the model's own output: what the z optimisation relies on."""
    model, tok = tiny(family)
    adapter = family_for(model)
    ids = torch.tensor([tok("Paris is the capital of")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = adapter.base_model(model)(input_ids=ids).last_hidden_state
        rebuilt = adapter.lm_head(model)(hidden)
    torch.testing.assert_close(rebuilt, logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_matrix_orientation(family):
    model, _ = tiny(family)
    adapter = family_for(model)
    for layer in range(4):
        stored = adapter.edit_weight(model, layer)
        view = adapter.weight_matrix(model, layer)
        assert tuple(view.shape) == (64, 128)  # (d_model, d_ff) whatever the storage
        assert view.data_ptr() == stored.data_ptr()  # a view, not a copy
        if family == "gpt2":
            assert adapter.transposed
            assert tuple(stored.shape) == (128, 64)  # Conv1D stores (d_ff, d_model)
            assert torch.equal(view, stored.T)
        else:
            assert not adapter.transposed
            assert torch.equal(view, stored)


@pytest.mark.parametrize("family", FAMILIES)
def test_add_update_changes_the_output_by_delta_times_key(family):
    model, _ = tiny(family)
    model = copy.deepcopy(model)
    adapter = family_for(model)
    layer = 2
    module = model.get_submodule(adapter.edit_module_name(layer))
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(5, 128, generator=gen)
    delta = torch.randn(64, 128, generator=gen) * 0.1
    with torch.no_grad():
        before = module(keys)
        assert tuple(before.shape) == (5, 64)
        adapter.add_update(model, layer, delta)
        after = module(keys)
    torch.testing.assert_close(after - before, keys @ delta.T, rtol=1e-4, atol=1e-4)
    # nothing else moved: the other layers' projections are as in the shared base model
    base, _ = tiny(family)
    for other in (0, 1, 3):
        assert torch.equal(adapter.weight_matrix(model, other), adapter.weight_matrix(base, other))
    # a (d_ff, d_model) delta is refused rather than silently reshaped
    with pytest.raises(RuntimeError):
        adapter.add_update(model, layer, delta.T.contiguous())


def test_every_adapter_is_reachable_by_its_model_types():
    listed = supported_model_types()
    for adapter in ADAPTERS:
        for model_type in adapter.model_types:
            assert model_type in listed
            assert family_for(model_type) is adapter


@pytest.mark.parametrize(
    "make",
    [
        lambda: "bert",
        lambda: SimpleNamespace(config=SimpleNamespace(model_type="bert")),
        lambda: BertForMaskedLM(
            BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
        ),
    ],
)
def test_unknown_architecture_is_refused_clearly(make):
    thing = make()
    with pytest.raises(UnsupportedModelError) as info:
        family_for(thing)
    message = str(info.value)
    assert "'bert'" in message
    for model_type in ("llama", "gpt2", "gptj", "gpt_neox", "mistral", "qwen2"):
        assert model_type in message
    assert isinstance(info.value, ValueError)
    if not isinstance(thing, str):
        with pytest.raises(UnsupportedModelError):
            model_dims(thing)
        with pytest.raises(UnsupportedModelError):
            model_fingerprint(thing)


def test_load_model_refuses_an_unsupported_saved_model(tmp_path):
    from fededit_core.model.loading import load_model

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, is_decoder=True
    )
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError, match="bert"):
        load_model(str(tmp_path / "bert"))


# --- fingerprint ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fingerprint(family):
    model, _ = tiny(family)
    adapter = family_for(model)
    fp = model_fingerprint(model)
    assert isinstance(fp, str) and len(fp) == 32
    assert model_fingerprint(model) == fp
    same, _ = tiny_model_and_tokenizer(family, seed=0)  # built again, same weights
    assert model_fingerprint(same) == fp

    half = copy.deepcopy(model).to(torch.bfloat16)
    assert adapter.weight_matrix(half, 0).dtype == torch.bfloat16
    assert model_fingerprint(half) == fp

    changed = copy.deepcopy(model)
    with torch.no_grad():
        adapter.weight_matrix(changed, 3)[5, 7] += 0.5
    assert model_fingerprint(changed) != fp

    other_seed, _ = tiny_model_and_tokenizer(family, seed=1)
    assert model_fingerprint(other_seed) != fp


def test_fingerprint_depends_on_the_config():
    model, _ = tiny("llama")
    other_eps, _ = tiny_model_and_tokenizer("llama", rms_norm_eps=1e-3)
    adapter = family_for(model)
    for layer in range(4):  # same weights: only the config tells the two apart
        assert torch.equal(adapter.weight_matrix(other_eps, layer), adapter.weight_matrix(model, layer))
    assert model_fingerprint(other_eps) != model_fingerprint(model)
