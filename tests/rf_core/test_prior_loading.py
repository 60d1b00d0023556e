"""Model loading: the tiny pipeline, checkpoint formats, the missing-model error, attention."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rf_core.prior import ModelConfig, ModelNotFoundError, describe, load_components
from rf_core.prior.attention import resolve_attention, xformers_usable
from rf_core.prior.tiny import build_tiny_pipeline, tiny_model_path, tiny_vocab


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_tiny_build_is_deterministic_and_does_not_touch_global_rng():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_pipeline()
    after = torch.rand(3)
    b = build_tiny_pipeline()
    assert torch.equal(before, after)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = _state(getattr(a, name)), _state(getattr(b, name))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_tokenizer_keeps_words_and_learned_token_whole():
    vocab, merges = tiny_vocab()
    assert len(vocab) == len(set(vocab.values()))
    assert all(a + b in vocab for a, b in merges)
    tok = build_tiny_pipeline().tokenizer
    assert tok.tokenize("a photo of a cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    ids = tok("xyzzy", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == vocab["<|startoftext|>"]


def test_tiny_model_loads_like_a_real_checkpoint():
    path = tiny_model_path("tiny")
    index = json.loads((path / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    sd = load_components(ModelConfig(name="tiny", device="cpu"))
    fresh = build_tiny_pipeline()
    saved, built = _state(sd.unet), _state(fresh.unet)
    assert all(torch.equal(saved[k], built[k]) for k in built)
    # Loading the same folder by path goes through the generic local-folder branch.
    by_path = load_components(ModelConfig(name=str(path), device="cpu"))
    assert by_path.prediction_type == "epsilon" and by_path.resolution == 64
    info = describe(sd)
    assert info["attention"] == "sdpa" and info["dtype"] == "float32"
    assert not any(p.requires_grad for p in sd.unet.parameters())


def test_tiny_v_is_v_prediction():
    sd = load_components(ModelConfig(name="tiny-v", device="cpu"))
    assert sd.prediction_type == "v_prediction"


def test_dtype_option_casts_weights():
    sd = load_components(ModelConfig(name="tiny", device="cpu", dtype="bf16"))
    assert sd.dtype == torch.bfloat16
    assert next(sd.unet.parameters()).dtype == torch.bfloat16


def test_hub_id_loads_from_the_local_cache_only(tmp_path, monkeypatch):
    """A hub id resolves through the standard HF cache layout without any network access."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-sd" / "snapshots" / "0123abcd"
    snapshot.parent.mkdir(parents=True)
    build_tiny_pipeline().save_pretrained(snapshot)
    (cache / "models--someone--tiny-sd" / "refs").mkdir()
    (cache / "models--someone--tiny-sd" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    sd = load_components(ModelConfig(name="someone/tiny-sd", device="cpu"))
    assert sd.resolution == 64


@pytest.mark.parametrize("name, detail", [
    ("nobody/not-a-model", "not in the local Hugging Face cache"),
    ("/definitely/not/here", "no such file or folder"),
])
def test_missing_model_is_one_clear_error(name, detail, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as err:
        load_components(ModelConfig(name=name, device="cpu"))
    msg = str(err.value)
    assert "\n" not in msg and detail in msg and "--model tiny" in msg and name in msg
    assert "random-weight models: tiny, tiny-v, sd15-random, sd21v-random" in msg


def test_folder_without_model_index_is_reported(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        load_components(ModelConfig(name=str(tmp_path), device="cpu"))


def test_wrong_file_type_is_reported(tmp_path):
    bad = tmp_path / "weights.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"\.safetensors or \.ckpt"):
        load_components(ModelConfig(name=str(bad), device="cpu"))


def test_config_validation():
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(dtype="fp8")
    with pytest.raises(ValueError, match="attention"):
        ModelConfig(attention="flash3")


def test_attention_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert not xformers_usable("cpu")
    assert resolve_attention("auto", cpu) == "sdpa"
    assert resolve_attention("sdpa", cpu) == "sdpa"
    with pytest.raises(ValueError, match="xformers"):
        resolve_attention("xformers", cpu)


def test_memory_options_keep_outputs():
    """Attention slicing and VAE slicing change memory, not results."""
    from rf_core.prior.attention import configure_models

    sd = load_components(ModelConfig(name="tiny", device="cpu"))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    text = torch.randn(2, 77, 32)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        z0 = sd.vae.encode(x).latent_dist.mean
        e0 = sd.unet(z0, t, encoder_hidden_states=text).sample
        configure_models(sd.unet, sd.vae, backend="sdpa", attention_slicing=True,
                         vae_slicing=True, channels_last=True)
        z1 = sd.vae.encode(x).latent_dist.mean
        e1 = sd.unet(z1, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(z1, z0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e1, e0, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_loads_and_reports_backend():
    sd = load_components(ModelConfig(name="tiny", device="cuda"))
    assert sd.dtype == torch.float16 and sd.attention in ("sdpa", "xformers")
    assert next(sd.unet.parameters()).is_cuda


def test_cache_location_honours_rf_cache():
    assert Path(os.environ["RF_CACHE"]) in tiny_model_path("tiny").parents
