"""Textual-inversion embedding files: our format, the authors' files, diffusers' loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rf_core.prior import EmbeddingError, load_embedding, save_embedding
from rf_core.prior.embeddings import add_token
from rf_core.prior.tiny import build_tiny_pipeline

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "realfusion-examples"
AUTHOR_FILES = sorted(EXAMPLES.glob("*/learned_embeds.bin")) if EXAMPLES.exists() else []


def test_save_load_round_trip_with_metadata(tmp_path):
    vec = torch.randn(32)
    path = save_embedding(tmp_path / "e.safetensors", "<e>", vec, metadata={"model": "tiny"})
    token, loaded = load_embedding(path)
    assert token == "<e>" and torch.equal(loaded, vec)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["model"] == "tiny"
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]  # no temp file left


@pytest.mark.skipif(not AUTHOR_FILES, reason="../shared/data/realfusion-examples not present")
@pytest.mark.parametrize("path", AUTHOR_FILES, ids=lambda p: p.parent.name)
def test_authors_embedding_files_load(path):
    token, vec = load_embedding(path)
    assert token.startswith("_") and vec.shape == (768,) and vec.dtype == torch.float32
    assert torch.isfinite(vec).all() and vec.norm() > 0


def test_a1111_layout_loads(tmp_path):
    vec = torch.randn(1, 32)
    torch.save({"string_to_param": {"*": vec}, "name": "mytok"}, tmp_path / "a.pt")
    token, loaded = load_embedding(tmp_path / "a.pt")
    assert token == "mytok" and torch.equal(loaded, vec[0])


@pytest.mark.parametrize("content, match", [
    ({"a": torch.zeros(4), "b": torch.zeros(4)}, "exactly one token"),
    ({"a": torch.zeros(3, 4)}, "single-vector"),
])
def test_malformed_files_are_reported(tmp_path, content, match):
    torch.save(content, tmp_path / "bad.bin")
    with pytest.raises(EmbeddingError, match=match):
        load_embedding(tmp_path / "bad.bin")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(EmbeddingError, match="not found.*rf invert"):
        load_embedding(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EmbeddingError, match="cannot read"):
        load_embedding(tmp_path / "junk.safetensors")


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a .bin that would run code on load is an error, not an execution."""
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"<e>": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(EmbeddingError, match="cannot read"):
        load_embedding(tmp_path / "evil.bin")


def test_add_token_only_adds_one_row():
    pipe = build_tiny_pipeline()
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    vec = torch.randn(32)
    token_id = add_token(pipe.tokenizer, pipe.text_encoder, "<new>", vec)
    after = pipe.text_encoder.get_input_embeddings().weight
    assert token_id == before.shape[0] and after.shape[0] == before.shape[0] + 1
    assert torch.equal(after[:-1], before) and torch.equal(after[-1], vec)
    assert pipe.tokenizer.tokenize("a <new> cat") == ["a</w>", "<new>", "cat</w>"]
    with pytest.raises(EmbeddingError, match="expects 32"):
        add_token(pipe.tokenizer, pipe.text_encoder, "<big>", torch.randn(768))
    with pytest.raises(EmbeddingError, match="single-token word"):
        add_token(pipe.tokenizer, pipe.text_encoder, "<x>", initializer="zzqqxx")


def test_diffusers_load_textual_inversion_accepts_our_file(tmp_path):
    pipe = build_tiny_pipeline()
    vec = torch.randn(32)
    path = save_embedding(tmp_path / "e.safetensors", "<e>", vec)
    pipe.load_textual_inversion(str(path))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<e>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], vec)


@pytest.mark.skipif(not AUTHOR_FILES, reason="../shared/data/realfusion-examples not present")
def test_authors_embedding_registers_on_a_768_wide_text_encoder():
    """The authors' vectors fit an SD-1.x-width (768) text encoder; ours registers them."""
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = build_tiny_pipeline()
    vocab = pipe.tokenizer.get_vocab()
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=768, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=12, max_position_embeddings=77,
        eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"]))
    token, vec = load_embedding(AUTHOR_FILES[0])
    token_id = add_token(pipe.tokenizer, encoder, token, vec)
    assert torch.equal(encoder.get_input_embeddings().weight[token_id], vec)
    ids = pipe.tokenizer(f"an image of a {token}", return_tensors="pt").input_ids
    assert token_id in ids[0].tolist()
