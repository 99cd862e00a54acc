"""The models of the training-step benchmark, at three sizes, with random weights.

``full`` is what a GPU runs (ViT-B/16 at 224, Swin-T at 224, MViTv2-T at 224, GPT-2 small
at 512 tokens); ``small`` keeps the same architectures at sizes two CPU cores can train
in seconds; ``tiny`` is the smallest that still has each architecture's structure (two
Swin and MViTv2 stages, so a stage transition), for dry runs of the GPU check. Each builder returns a ``Workload``: the model, how to make a batch, how to
take a loss from the output, and the blocks ``torch.utils.checkpoint`` should wrap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class Workload:
    model: nn.Module
    make_batch: Callable[[int, str], tuple[tuple, dict, object]]  # (batch, device) -> (args, kwargs, target)
    loss: Callable[[object, object], torch.Tensor]  # (model output, target) -> scalar
    blocks: Callable[[nn.Module], list[nn.Module]]  # the residual blocks, for per-block checkpointing

    def example(self, device: str) -> tuple[tuple, dict]:
        """One call for ``revcompile.convert``."""
        args, kwargs, _ = self.make_batch(2, device)
        return args, kwargs


def _image_workload(model: nn.Module, size: int, classes: int, blocks) -> Workload:
    def make_batch(batch: int, device: str):
        generator = torch.Generator().manual_seed(batch)
        images = torch.randn(batch, 3, size, size, generator=generator).to(device)
        labels = torch.randint(0, classes, (batch,), generator=generator).to(device)
        return (images,), {}, labels

    return Workload(model, make_batch, nn.functional.cross_entropy, blocks)


def vit_b(size: str, depth: int | None = None, width: int | None = None) -> Workload:
    import timm

    if size == "full":
        model = timm.create_model("vit_base_patch16_224", pretrained=False, depth=depth or 12, embed_dim=width or 768)
        return _image_workload(model, 224, 1000, lambda m: list(m.blocks))
    if size == "tiny":
        return _tiny_vit(depth or 2, width or 64)
    width = width or 192
    model = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=width, num_heads=width // 64,
        depth=depth or 6, num_classes=100,
    )
    return _image_workload(model, 64, 100, lambda m: list(m.blocks))


def vit_l(size: str, depth: int | None = None, width: int | None = None) -> Workload:
    """ViT-L/16: the model of the peak-memory-per-sample goal (24 blocks of width 1024 at full size)."""
    import timm

    if size == "full":
        model = timm.create_model("vit_large_patch16_224", pretrained=False, depth=depth or 24)
        return _image_workload(model, 224, 1000, lambda m: list(m.blocks))
    if size == "tiny":
        return _tiny_vit(depth or 4, width or 64)
    model = timm.create_model(
        "vit_large_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=width or 128, num_heads=2,
        depth=depth or 8, num_classes=100,
    )
    return _image_workload(model, 64, 100, lambda m: list(m.blocks))


def _tiny_vit(depth: int, width: int) -> Workload:
    import timm

    model = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=width, num_heads=2,
        depth=depth, num_classes=10,
    )
    return _image_workload(model, 32, 10, lambda m: list(m.blocks))


def swin_t(size: str, depth: int | None = None) -> Workload:
    import timm

    if size == "full":
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
        return _image_workload(model, 224, 1000, lambda m: [b for layer in m.layers for b in layer.blocks])
    side, shape = (32, dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)) if size == "tiny" else \
        (64, dict(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), num_classes=100))
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=side, window_size=4, **shape)
    return _image_workload(model, side, shape["num_classes"], lambda m: [b for layer in m.layers for b in layer.blocks])


def mvitv2_t(size: str, depth: int | None = None) -> Workload:
    import timm
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    def blocks(m):
        return [b for s in m.stages for b in s.blocks]

    if size == "tiny":  # two stages of two blocks, the second one pooled: one stage transition
        config = MultiScaleVitCfg(depths=(2, 2), embed_dim=32, num_heads=1, stride_q=((1, 1), (2, 2)))
        return _image_workload(MultiScaleVit(config, img_size=32, num_classes=10), 32, 10, blocks)
    side = 224 if size == "full" else 64
    model = timm.create_model("mvitv2_tiny", pretrained=False, img_size=side, num_classes=1000 if size == "full" else 100)
    return _image_workload(model, side, 1000 if size == "full" else 100, blocks)


def gpt2(size: str, depth: int | None = None) -> Workload:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    if size == "full":
        config, tokens = dict(n_layer=depth or 12), 512
    elif size == "tiny":
        config, tokens = dict(n_layer=depth or 2, n_embd=32, n_head=2, vocab_size=100, n_positions=32), 16
    else:
        config, tokens = dict(n_layer=depth or 4, n_embd=128, n_head=4, vocab_size=1000, n_positions=128), 64
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", **config))
    vocab = model.config.vocab_size

    def make_batch(batch: int, device: str):
        generator = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, vocab, (batch, tokens), generator=generator).to(device)
        return (ids,), {"labels": ids}, None

    return Workload(model, make_batch, lambda output, target: output.loss, lambda m: list(m.transformer.h))


MODELS = {
    "ViT-B/16 (timm)": vit_b,
    "Swin-T (timm, hierarchical)": swin_t,
    "MViTv2-T (timm, hierarchical)": mvitv2_t,
    "GPT-2 (HF)": gpt2,
}
# The model whose depth is swept (memory vs depth, largest batch under a cap).
DEEP_MODEL = "ViT-B/16 (timm)"
# The model of the peak-memory-per-sample goal; not one of the throughput models.
PEAK_MODEL = "ViT-L/16 (timm)"
ALL_MODELS = {**MODELS, PEAK_MODEL: vit_l}
