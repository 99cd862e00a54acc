"""Small real models with random weights, built from configs (nothing is downloaded).

Each builder returns ``(model, args, kwargs, layers)``: the model in train mode with
dropout on, one example call, and the number of transformer layers its config declares
(what a full conversion must find).
"""

from __future__ import annotations

import torch

BATCH, TOKENS, WIDTH = 2, 12, 32


def _images(size=32):
    return torch.randn(BATCH, 3, size, size)


def reference_vit(depth=4):
    from revcompile.reference import example_inputs, reference_vit

    model = reference_vit(depth=depth, dim=WIDTH, heads=2)
    return model, example_inputs(model, BATCH), {}, depth


def timm_vit(depth=3):
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth, embed_dim=WIDTH,
        num_heads=2, num_classes=5, drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1,
    )
    return model, (_images(),), {}, depth


def timm_deit3(depth=3):
    import timm

    model = timm.create_model(
        "deit3_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth, embed_dim=WIDTH,
        num_heads=2, num_classes=5, proj_drop_rate=0.1, drop_path_rate=0.1,
    )
    return model, (_images(),), {}, depth


def torchvision_vit(depth=3):
    from torchvision.models import VisionTransformer

    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=depth, num_heads=2, hidden_dim=WIDTH, mlp_dim=2 * WIDTH,
        dropout=0.1, attention_dropout=0.1, num_classes=5,
    )
    return model, (_images(),), {}, depth


def torch_transformer_encoder(depth=3):
    layer = torch.nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.1, batch_first=True, norm_first=True)
    model = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
    return model, (torch.randn(BATCH, TOKENS, WIDTH),), {}, depth


def _hf(model_type: str, **config):
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoModel.from_config(AutoConfig.for_model(model_type, **config)).train()


def hf_gpt2(depth=3):
    model = _hf("gpt2", n_layer=depth, n_embd=WIDTH, n_head=4, vocab_size=100, n_positions=64)
    return model, (torch.randint(0, 100, (BATCH, TOKENS)),), {}, depth


def hf_llama(depth=3):
    model = _hf(
        "llama", num_hidden_layers=depth, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, attention_dropout=0.1,
    )
    return model, (torch.randint(0, 100, (BATCH, TOKENS)),), {}, depth


CORE_MODELS = {
    "reference-vit": reference_vit,
    "timm-vit": timm_vit,
    "timm-deit3": timm_deit3,
    "torchvision-vit": torchvision_vit,
    "torch-transformer-encoder": torch_transformer_encoder,
    "hf-gpt2": hf_gpt2,
    "hf-llama": hf_llama,
}
