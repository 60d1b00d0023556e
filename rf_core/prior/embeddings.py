"""Textual-inversion embedding files and adding learned tokens to a tokenizer + text encoder.

File format is diffusers': a safetensors (or torch) file holding ``{token: tensor[D]}``, which
``StableDiffusionPipeline.load_textual_inversion`` accepts. The RealFusion authors'
``learned_embeds.bin`` files are this format pickled by torch; they are read with
``weights_only=True`` so a file can never run code. A1111's ``string_to_param`` layout is read too.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rf_core.errors import UserError
from rf_core.files.atomic import atomic_write
from rf_core.files.fault_points import fault_point


class EmbeddingError(UserError, ValueError):
    """An embedding file is missing, malformed, or does not fit the model."""


def save_embedding(path: str | os.PathLike, token: str, vector: torch.Tensor,
                   metadata: dict[str, str] | None = None) -> Path:
    """Write ``{token: vector [D]}`` as safetensors, atomically (temp file, then rename).

    ``metadata`` (e.g. the resolved config as YAML) is stored in the safetensors header, which
    loaders of the diffusers format ignore.
    """
    fault_point("embedding.before_save")
    path = Path(path)
    if vector.ndim != 1:
        raise EmbeddingError(f"embedding for {token!r} must be a vector [D], got "
                             f"{tuple(vector.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {token: vector.detach().float().cpu().contiguous()}
    written = atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    fault_point("embedding.saved")
    return written


def load_embedding(path: str | os.PathLike) -> tuple[str, torch.Tensor]:
    """Read one learned token: returns ``(token, vector [D] float32)``."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"embedding file {str(path)!r} not found; run `rf invert` to make "
                             "one or pass the path of an existing .safetensors/.bin")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # "pickle protocol 4 ...": noise either way
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any decode failure is the same problem to the user
        # torch's unpickling errors run to a page; their first sentence says enough.
        reason = " ".join(str(err).split()).split(". ")[0][:200] or type(err).__name__
        raise EmbeddingError(f"cannot read embedding file {str(path)!r} ({reason}); pass a "
                             ".safetensors file from `rf invert` or a learned_embeds.bin of "
                             "tensors only") from None
    if isinstance(state, dict) and "string_to_param" in state:  # A1111 layout
        params = state["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError(f"embedding file {str(path)!r} has an A1111 layout whose "
                                 "string_to_param does not hold exactly one tensor")
        state = {str(state.get("name", path.stem)): next(iter(params.values()))}
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} \
        if isinstance(state, dict) else {}
    if len(tensors) != 1:
        keys = sorted(map(str, state))[:5] if isinstance(state, dict) else []
        raise EmbeddingError(f"embedding file {str(path)!r} must hold exactly one token tensor, "
                             f"found keys {keys}")
    token, vector = next(iter(tensors.items()))
    if not isinstance(token, str) or not token or any(c.isspace() for c in token):
        raise EmbeddingError(f"embedding file {str(path)!r} names its token {token!r}; a token "
                             "must be one non-empty word without spaces, e.g. <e>")
    if not vector.is_floating_point():
        raise EmbeddingError(f"embedding {token!r} in {str(path)!r} is a {vector.dtype} tensor; "
                             "an embedding holds floating-point values")
    vector = vector.float()
    if vector.ndim == 2 and vector.shape[0] == 1:  # A1111 stores [n_vectors, D]
        vector = vector[0]
    if vector.ndim != 1:
        raise EmbeddingError(f"embedding {token!r} in {str(path)!r} has shape "
                             f"{tuple(vector.shape)}; only single-vector tokens are supported")
    if not torch.isfinite(vector).all():
        raise EmbeddingError(f"embedding {token!r} in {str(path)!r} holds NaN or infinite "
                             "values; learn it again with `rf invert`")
    return token, vector


def add_token(tokenizer, text_encoder, token: str, vector: torch.Tensor | None = None,
              initializer: str | None = None) -> int:
    """Make ``token`` one token of ``tokenizer`` with an input-embedding row in ``text_encoder``.

    The row is ``vector`` if given, else a copy of the ``initializer`` word's row. Returns its id.
    Re-adding an existing token overwrites its row.
    """
    rows = text_encoder.get_input_embeddings().weight
    if vector is not None and vector.shape != rows.shape[1:]:
        raise EmbeddingError(f"embedding for {token!r} has size {vector.shape[-1]} but this "
                             f"model's text encoder expects {rows.shape[1]}; it was learned for "
                             "another model family (e.g. SD 1.x is 768, SD 2.x is 1024)")
    if len(tokenizer.tokenize(token)) != 1 or token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id >= rows.shape[0]:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        rows = text_encoder.get_input_embeddings().weight
    if vector is None:
        if initializer is None:
            raise EmbeddingError("add_token needs a vector or an initializer word")
        init_ids = tokenizer.encode(initializer, add_special_tokens=False)
        if len(init_ids) != 1:
            raise EmbeddingError(f"initializer {initializer!r} is {len(init_ids)} tokens for "
                                 "this tokenizer; pick a single-token word (e.g. 'object')")
        vector = rows[init_ids[0]]
    with torch.no_grad():
        rows[token_id] = vector.to(rows)
    return token_id
