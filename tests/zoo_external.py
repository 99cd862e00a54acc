"""Models from libraries users bring beside timm/torchvision/HF, and the hand-written
constructs of tests/zoo_constructs.py, each with the outcome the conformance suite expects.

Every builder makes a small config with random weights (nothing is downloaded) and
returns ``(model, args, kwargs, layers)`` like tests/models.py. ``EXTERNAL`` maps a family
name to its library (the test skips when it is not installed; ``pip install -e ".[zoo]"``
installs them), builder, options and one expected outcome:

- ``Converts``: every layer of the config becomes a reversible block;
- ``Partial``: the listed number of blocks converts and each residual left alone says
  why (``reason`` is part of that explanation);
- ``Refused``: ``convert`` raises ``ConversionError`` matching ``reason``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from tests import zoo_constructs as constructs

BATCH, TOKENS, WIDTH = 2, 12, 32


@dataclass(frozen=True)
class Converts:
    segments: int


@dataclass(frozen=True)
class Partial:
    blocks: int
    segments: int
    reason: str


@dataclass(frozen=True)
class Refused:
    reason: str


@dataclass(frozen=True)
class Family:
    library: str  # the import name pytest.importorskip looks for
    build: Callable
    expect: Converts | Partial | Refused
    options: dict = field(default_factory=dict)
    slow: bool = False
    # more to assert once it converted: check(model, plan, compared), where compared is the
    # number of gradients (parameters and inputs) compared with a non-zero reference
    check: Callable | None = None
    note: str = ""  # what is special about it (why it is partial or refused), for docs/zoo.md


def _images(size=32):
    return torch.randn(BATCH, 3, size, size)


def _ids():
    return torch.randint(0, 100, (BATCH, TOKENS))


# ---- vit-pytorch (lucidrains): einops rearranges, ModuleList pairs in a Python loop


def vitp_vit(depth=2):
    from vit_pytorch import ViT

    model = ViT(
        image_size=32, patch_size=8, num_classes=5, dim=WIDTH, depth=depth, heads=2, dim_head=16, mlp_dim=2 * WIDTH,
        dropout=0.1, emb_dropout=0.1,
    )
    return model.train(), (_images(),), {}, depth


def vitp_simple_vit(depth=2):
    from vit_pytorch import SimpleViT

    # its sine-cosine positions are a plain tensor attribute (self.pos_embedding = table)
    model = SimpleViT(image_size=32, patch_size=8, num_classes=5, dim=WIDTH, depth=depth, heads=2, dim_head=16, mlp_dim=2 * WIDTH)
    return model.train(), (_images(),), {}, depth


def vitp_deepvit(depth=2):
    from vit_pytorch.deepvit import DeepViT

    model = DeepViT(
        image_size=32, patch_size=8, num_classes=5, dim=WIDTH, depth=depth, heads=2, dim_head=16, mlp_dim=2 * WIDTH, dropout=0.1,
    )
    return model.train(), (_images(),), {}, depth


def vitp_cait(depth=2, layer_dropout=0.0):
    from vit_pytorch.cait import CaiT

    model = CaiT(
        image_size=32, patch_size=8, num_classes=5, dim=WIDTH, depth=depth, cls_depth=1, heads=2, mlp_dim=2 * WIDTH,
        dropout=0.1, emb_dropout=0.1, layer_dropout=layer_dropout,
    )
    return model.train(), (_images(),), {}, depth + 1  # + one class-attention layer


# ---- x-transformers: the stack is one flat ModuleList of (norm, branch, residual) triples


def _xt(depth=2, decoder=True, **options):
    from x_transformers import Decoder, Encoder, TransformerWrapper

    stack = (Decoder if decoder else Encoder)(dim=WIDTH, depth=depth, heads=2, attn_dropout=0.1, ff_dropout=0.1, **options)
    model = TransformerWrapper(num_tokens=100, max_seq_len=32, attn_layers=stack, emb_dropout=0.1)
    return model.train(), (_ids(),), {}, depth


def xt_decoder(depth=2):
    return _xt(depth)


def xt_sandwich_norm_encoder(depth=2):
    return _xt(depth, decoder=False, sandwich_norm=True, ff_glu=True)


def xt_rotary(depth=2):
    return _xt(depth, rotary_pos_emb=True)


def xt_alibi(depth=2):
    return _xt(depth, alibi_pos_bias=True, use_rmsnorm=True)


def xt_residual_attention(depth=2):
    return _xt(depth, decoder=False, residual_attn=True)


def xt_post_norm(depth=2):
    return _xt(depth, decoder=False, pre_norm=False)


# ---- open_clip: CLIP built from a model config dict (no pretrained tag, nothing downloaded)


def _clip(vision_layers=2, text_layers=2, **vision):
    from open_clip.model import CLIP

    vision_cfg = dict(image_size=32, layers=vision_layers, width=WIDTH, head_width=16, patch_size=8, mlp_ratio=2.0, **vision)
    text_cfg = dict(context_length=TOKENS, vocab_size=100, width=WIDTH, heads=2, layers=text_layers)
    return CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg).train()


def clip(layers=2):
    return _clip(layers, layers), (_images(), _ids()), {}, 2 * layers


def clip_visual_layerscale(layers=4):
    model = _clip(layers, 1, ls_init_value=0.1, patch_dropout=0.5).visual
    return model, (_images(),), {}, layers


# ---- peft: LoRA adapters on HF models; only the adapters train


def _lora(model_type: str, targets: list[str], **config):
    from peft import LoraConfig, get_peft_model

    from tests.models import _hf

    base = _hf(model_type, **config)
    fan_in_fan_out = model_type == "gpt2"  # GPT-2's Conv1D stores weights transposed
    adapters = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.1, fan_in_fan_out=fan_in_fan_out)
    return get_peft_model(base, adapters).train()


def lora_gpt2(depth=2):
    model = _lora("gpt2", ["c_attn", "c_fc"], n_layer=depth, n_embd=WIDTH, n_head=4, vocab_size=100, n_positions=64)
    # called as users call it: PeftModel.forward(**kwargs) passes use_cache on unseen, and
    # revcompile still turns the key/value cache off
    return model, (_ids(),), {}, depth


def lora_llama(depth=2):
    model = _lora(
        "llama", ["q_proj", "v_proj", "up_proj"], num_hidden_layers=depth, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, attention_dropout=0.1,
    )
    return model, (_ids(),), {"use_cache": False}, depth


# ---- HF ALBERT: one layer's weights shared by every layer


def hf_albert(depth=3):
    from tests.models import _hf

    model = _hf(
        "albert", num_hidden_layers=depth, hidden_size=WIDTH, embedding_size=16, intermediate_size=2 * WIDTH,
        num_attention_heads=4, vocab_size=100, hidden_dropout_prob=0.1,
    )
    return model, (_ids(),), {}, depth


def shared_by(parameter: str, blocks: int) -> Callable:
    """ALBERT-style sharing: ``parameter`` is read by the attention branch of ``blocks``
    blocks of one segment, so the reversible backward adds each block's contribution into
    one gradient (which test_external_family compares)."""

    def check(model, plan, compared):
        assert len(plan.segments) == 1, str(plan)
        assert sum(parameter in block.f.parameters for block in plan.blocks) == blocks, str(plan)

    return check


def adapters_alone_train(model, plan, compared):
    """peft freezes the base model: the adapters are the only trainable parameters, and
    every one of them has a real gradient, compared exactly."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    assert compared == len(trainable)


def conditioning_is_a_side_input(model, plan, compared):
    """DiT: the shift/scale/gate computed from the timestep and label enter the segment as
    side inputs of its branches; the timestep's gradient (input 1), the token input's and
    every parameter's (the modulation layers' among them) are compared."""
    assert plan.segments[0].side_inputs, str(plan)
    assert compared == 2 + sum(1 for _ in model.parameters())


EXTERNAL: dict[str, Family] = {
    "vitp-vit-1": Family("vit_pytorch", lambda: vitp_vit(1), Converts(1)),
    "vitp-vit-3": Family("vit_pytorch", lambda: vitp_vit(3), Converts(1), slow=True),
    "vitp-simple-vit": Family(
        "vit_pytorch", vitp_simple_vit, Converts(1), note="its positions are a plain tensor attribute"
    ),
    "vitp-deepvit": Family("vit_pytorch", vitp_deepvit, Converts(1), slow=True),  # re-attention mixes heads
    "vitp-cait": Family("vit_pytorch", lambda: vitp_cait(1), Converts(2), slow=True),  # patch blocks, class-attention blocks
    "vitp-cait-layerdrop": Family(
        "vit_pytorch", lambda: vitp_cait(2, 0.1), Refused(r"could not trace CaiT.*data-dependent"),
        note="LayerDrop (layer_dropout > 0) decides in Python, from a random tensor, which layers run: "
        "data-dependent control flow neither tracer captures. With layer_dropout=0 (vitp-cait) it converts.",
    ),
    "xt-decoder-1": Family("x_transformers", lambda: xt_decoder(1), Converts(1)),
    "xt-decoder-3": Family("x_transformers", lambda: xt_decoder(3), Converts(1), slow=True),
    "xt-sandwich-glu": Family("x_transformers", xt_sandwich_norm_encoder, Converts(1)),
    "xt-rotary": Family(
        "x_transformers", xt_rotary, Partial(1, 1, "code after this residual add reads it too"),
        note="the rotary frequencies are applied inside an autocast-disabled region that export captures as one "
        "node together with the first layer's query, and the later layers reuse its output: by data flow it depends "
        "on the first attention branch, so every attention layer after the first stays ordinary autograd.",
    ),
    "xt-alibi-rmsnorm": Family(
        "x_transformers", xt_alibi, Converts(1),
        note="the ALiBi bias is computed from sizes once and read by every layer as a side input of the "
        "segment, so every layer converts.",
    ),
    "xt-residual-attn": Family(
        "x_transformers", xt_residual_attention, Partial(1, 1, "code after this residual add reads it too"),
        note="RealFormer residual attention: each attention layer adds the previous layer's scores, a value "
        "computed from the stream inside another block; the later layers stay ordinary autograd (by design).",
    ),
    "xt-post-norm": Family(
        "x_transformers", xt_post_norm, Refused(r"no attention/MLP pair converts"), {"post_norm": "move"},
        note="post-norm here is layer_norm(x) * (gamma + 1) (an affine-free norm, then a scale): "
        "post_norm='move' moves a norm op alone, so no residual pairs up.",
    ),
    "openclip-clip": Family("open_clip", clip, Converts(2)),  # image tower, text tower
    "openclip-visual-layerscale": Family("open_clip", clip_visual_layerscale, Converts(1), slow=True),
    "peft-lora-gpt2": Family("peft", lora_gpt2, Converts(1), check=adapters_alone_train),
    "peft-lora-llama": Family("peft", lora_llama, Converts(1), slow=True, check=adapters_alone_train),
    "hf-albert": Family(
        "transformers", hf_albert, Converts(1), {"post_norm": "move"},
        check=shared_by("encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight", 3),
    ),
    "plain-tensor-positions": Family(
        "torch", constructs.plain_tensor_positions, Converts(1), note="self.pos_embedding = tensor"
    ),
    "shared-block-loop": Family("torch", constructs.shared_block_loop, Converts(1), check=shared_by("block.attn.qkv.weight", 4)),
    "shared-groups-loop": Family("torch", constructs.shared_groups_loop, Converts(1), check=shared_by("groups.1.attn.qkv.weight", 2)),
    "loop-over-pairs": Family("torch", constructs.loop_over_pairs, Converts(1)),
    "dit-adaln": Family("torch", constructs.dit, Converts(1), check=conditioning_is_a_side_input),
}
