"""A tiny random-weight CLIP built in code, standing in for real CLIP weights in tests."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["make_tiny_clip"]


def make_tiny_clip(folder: Path) -> Path:
    """Save a tiny ``transformers.CLIPModel`` (seeded, so always the same weights) to
    ``folder`` with ``save_pretrained`` and return ``folder``. Nothing is downloaded.

    Vision tower: 32x32 images in 8x8 patches, width 32, 2 layers; text tower as small;
    embeddings of 16 dimensions.
    """
    import transformers.utils.logging as hf_logging
    from transformers import CLIPConfig, CLIPModel

    hf_logging.disable_progress_bar()  # a bar for writing one tiny shard is noise

    layer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2}
    cfg = CLIPConfig(text_config={**layer, "vocab_size": 100, "max_position_embeddings": 16,
                                  "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
                     vision_config={**layer, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(0)
        model = CLIPModel(cfg)
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder
