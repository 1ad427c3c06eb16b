import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: hub lookups must fail fast, not hang

# The SD-1.x topology, scaled down (the diffusers test-suite habit): 4 stages, 2 layers per down
# block, 3 per up block, cross-attention in the first three stages and the mid block.
TINY_SD1 = {
    "block_out_channels": [32, 64, 64, 64],
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "layers_per_block": 2,
    "sample_size": 16,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# SDXL-style: 3 stages, no attention in stage 0, per-block transformer depth, linear projections,
# per-block head counts, text_time added conditions.
TINY_SDXL = {
    "block_out_channels": [32, 64, 64],
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": [2, 4, 4],
    "layers_per_block": 2,
    "sample_size": 16,
    "transformer_layers_per_block": [1, 2, 3],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
}


@pytest.fixture(scope="session")
def tiny_sd1_teacher():
    from hybridsd_nas.arch import instantiate

    torch.manual_seed(0)
    return instantiate(TINY_SD1, device="cpu")


@pytest.fixture(scope="session")
def tiny_sd1_dirs(tmp_path_factory, tiny_sd1_teacher):
    """The tiny teacher saved as a U-Net directory (``unet_only``) and a pipeline layout (``pipe``)."""
    root = tmp_path_factory.mktemp("unets")
    tiny_sd1_teacher.save_pretrained(root / "unet_only")
    tiny_sd1_teacher.save_pretrained(root / "pipe" / "unet")
    (root / "pipe" / "model_index.json").write_text("{}")
    return root


@pytest.fixture(scope="session")
def tiny_sdxl_teacher():
    from hybridsd_nas.arch import instantiate

    torch.manual_seed(1)
    return instantiate(TINY_SDXL, device="cpu")


def real_inputs(config, batch=2, seed=0):
    from hybridsd_nas.cost import unet_inputs

    torch.manual_seed(seed)
    return unet_inputs(config, resolution=config["sample_size"] * 8, batch=batch, text_len=7, device="cpu")
