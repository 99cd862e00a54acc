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


def timm_swin(depths=(2, 2), img_size=32, width=WIDTH, window=4):
    import timm

    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=img_size, patch_size=4, window_size=window,
        embed_dim=width, depths=depths, num_heads=(2, 4), num_classes=5, drop_path_rate=0.1, proj_drop_rate=0.1,
        attn_drop_rate=0.1,
    )
    return model, (_images(img_size),), {}, sum(depths)


def timm_mvitv2(depths=(1, 2), img_size=32, width=WIDTH):
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(depths=depths, embed_dim=width, num_heads=1)
    model = MultiScaleVit(cfg, img_size=(img_size, img_size), num_classes=5, drop_path_rate=0.1)
    # every stage after the first starts with a transition block (pooled skip path): it stays ordinary autograd
    return model, (_images(img_size),), {}, sum(depths) - (len(depths) - 1)


def timm_eva02(depth=3):
    import timm

    model = timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=depth, embed_dim=WIDTH, num_heads=2,
        num_classes=5, drop_path_rate=0.1, proj_drop_rate=0.1,
    )
    return model, (torch.randn(BATCH, 3, 28, 28),), {}, depth


def timm_beit(depth=3, img_size=32, width=WIDTH):
    import timm

    model = timm.create_model(
        "beit_base_patch16_224", pretrained=False, img_size=img_size, patch_size=8, depth=depth, embed_dim=width,
        num_heads=2, num_classes=5, drop_path_rate=0.1, proj_drop_rate=0.1,
    )
    return model, (_images(img_size),), {}, depth


def timm_cait(depth=3):
    import timm

    model = timm.create_model(
        "cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, depth=depth, embed_dim=WIDTH, num_heads=2,
        num_classes=5, drop_path_rate=0.1, proj_drop_rate=0.1,
    )
    return model, (_images(),), {}, depth + 2  # + two class-attention blocks


def torchvision_swin(depths=(2, 2), img_size=32, width=WIDTH, window=4):
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=width, depths=list(depths), num_heads=[2, 4], window_size=[window, window],
        stochastic_depth_prob=0.1, dropout=0.1, attention_dropout=0.1, num_classes=5,
    )
    return model, (_images(img_size),), {}, sum(depths)


def hf_bert(depth=2, model_type="bert"):
    model = _hf(model_type, num_hidden_layers=depth, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=4, vocab_size=100)
    return model, (torch.randint(0, 100, (BATCH, TOKENS)),), {}, depth


def hf_roberta(depth=2):
    return hf_bert(depth, "roberta")


def _decoder_lm(model_type: str, depth=2, **config):
    model = _hf(model_type, num_hidden_layers=depth, hidden_size=WIDTH, num_attention_heads=4, vocab_size=100, **config)
    return model, (torch.randint(0, 100, (BATCH, TOKENS)),), {}, depth


def hf_mistral(depth=2):
    return _decoder_lm("mistral", depth, intermediate_size=2 * WIDTH, num_key_value_heads=2, attention_dropout=0.1)


def hf_qwen2(depth=2):
    return _decoder_lm("qwen2", depth, intermediate_size=2 * WIDTH, num_key_value_heads=2, attention_dropout=0.1)


def hf_opt(depth=2):
    return _decoder_lm("opt", depth, ffn_dim=2 * WIDTH, word_embed_proj_dim=WIDTH)


def hf_gpt_neox(depth=2):
    return _decoder_lm("gpt_neox", depth, intermediate_size=2 * WIDTH, hidden_dropout=0.1, attention_dropout=0.1)


def hf_phi(depth=2):
    return _decoder_lm("phi", depth, intermediate_size=2 * WIDTH, resid_pdrop=0.1, attention_dropout=0.1)


def hf_t5(depth=2):
    model = _hf("t5", num_layers=depth, num_decoder_layers=depth, d_model=WIDTH, d_ff=2 * WIDTH, num_heads=4, d_kv=8, vocab_size=100)
    ids = torch.randint(0, 100, (BATCH, TOKENS))
    return model, (ids,), {"decoder_input_ids": ids[:, : TOKENS // 2]}, 2 * depth


def hf_bart(depth=2):
    model = _hf(
        "bart", encoder_layers=depth, decoder_layers=depth, d_model=WIDTH, encoder_ffn_dim=2 * WIDTH,
        decoder_ffn_dim=2 * WIDTH, encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=100,
    )
    ids = torch.randint(0, 100, (BATCH, TOKENS))
    return model, (ids,), {"decoder_input_ids": ids[:, : TOKENS // 2]}, 2 * depth


def hf_vit(depth=2):
    model = _hf("vit", num_hidden_layers=depth, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=4, image_size=32, patch_size=8, hidden_dropout_prob=0.1)
    return model, (_images(),), {}, depth


# Every family of the conformance suite: builder, the options a user passes for it, and
# the reversible segments a full conversion makes (one per stage / stack).
ZOO = {
    "timm-vit": (timm_vit, {}, 1),
    "timm-deit3": (timm_deit3, {}, 1),
    "timm-eva02": (timm_eva02, {}, 1),
    "timm-beit": (timm_beit, {}, 1),
    "timm-cait": (timm_cait, {}, 2),  # patch blocks, then class-attention blocks
    "timm-swin": (timm_swin, {}, 2),  # one per stage
    "timm-mvitv2": (timm_mvitv2, {}, 2),  # one per stage, transition block between
    "torchvision-vit": (torchvision_vit, {}, 1),
    "torchvision-swin": (torchvision_swin, {}, 2),
    "torch-transformer-encoder": (torch_transformer_encoder, {}, 1),
    "hf-gpt2": (hf_gpt2, {}, 1),
    "hf-bert": (hf_bert, {"post_norm": "move"}, 1),
    "hf-roberta": (hf_roberta, {"post_norm": "move"}, 1),
    "hf-llama": (hf_llama, {}, 1),
    "hf-mistral": (hf_mistral, {}, 1),
    "hf-qwen2": (hf_qwen2, {}, 1),
    "hf-opt": (hf_opt, {}, 1),
    "hf-gpt-neox": (hf_gpt_neox, {}, 1),  # parallel residual
    "hf-phi": (hf_phi, {}, 1),  # parallel residual
    "hf-t5": (hf_t5, {}, 2),  # encoder, decoder
    "hf-bart": (hf_bart, {"post_norm": "move"}, 2),  # encoder, decoder
    "hf-vit": (hf_vit, {}, 1),
}

CORE_MODELS = {
    "reference-vit": reference_vit,
    "timm-vit": timm_vit,
    "timm-deit3": timm_deit3,
    "torchvision-vit": torchvision_vit,
    "torch-transformer-encoder": torch_transformer_encoder,
    "hf-gpt2": hf_gpt2,
    "hf-llama": hf_llama,
}
