"""Training curves from scratch: original vs converted, and where the gradient-norm spike comes from.

    OMP_NUM_THREADS=1 python benchmarks/train_curves.py            # GPT-2 and ViT, every arm (34 min here, loaded)
    OMP_NUM_THREADS=1 python benchmarks/train_curves.py --quick    # a smoke test (a few minutes)

Short trainings from random weights, on data that needs no download:

* ``gpt2``: HF GPT-2 from a config, 4 layers of width 128, 4 heads, context 64, byte
  vocabulary, with GPT-2's own initialisation (embeddings at std 0.02) and dropout 0.1, on
  this repository's own ``.py`` files (every 10th file validates);
* ``vit``: revcompile's reference ViT, 4 blocks of width 64, on scikit-learn's bundled 8x8
  digits upsampled to 16x16, all ten classes, no dropout;
* ``bytegpt`` (``--models bytegpt``): the fine-tuning benchmark's GPT of the same shape, whose
  embeddings start at std 1 and which has no dropout.

Each model is trained once per *arm* (``ARMS``): the original; converted with the Rev-ViT
coupling, fusion "mean" and "sum", in the default reversible backward and again under
``set_backward(model, "autograd")`` (the same coupled architecture with stored activations:
the gradient reference); and the dual coupling. Every arm starts from the same initial
weights, sees the same batches and has its own AdamW with linear warm-up then cosine decay.
Gradients are clipped at ``--clip`` (default 1.0; 0 turns clipping off).

Logged per step: loss, learning rate, the total gradient norm before clipping, the gradient
norm of every block's F branch (attention, which adds into the first stream) and G branch
(MLP, into the second), of the parameters outside the blocks, and the RMS of the two
streams at the segment's output. Besides, ``exactness``: at the step of the largest spike,
the reversible backward's float64 gradients against the autograd reference's.

Writes ``benchmarks/results/train_curves[_quick].json`` and, with matplotlib,
``docs/images/train_curves.png`` (tables: ``train_curves_report.py``).
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F

import revcompile
from revcompile.reference import reference_vit

from finetune import ByteGPT, image_batches, read_corpus, text_batches, val_image_batches  # benchmarks/ is on sys.path
from results_io import run_meta
from train_curves_report import plot, summary, tables, write

ROOT = Path(__file__).resolve().parent.parent

# Arms: name -> (convert() keywords or None for the original, backward mode).
ARMS = {
    "original": (None, None),
    "revvit mean": (dict(coupling="revvit", fusion="mean"), "reversible"),
    "revvit mean, autograd": (dict(coupling="revvit", fusion="mean"), "autograd"),
    "revvit sum": (dict(coupling="revvit", fusion="sum"), "reversible"),
    "dual k=8": (dict(coupling="dual"), "reversible"),
}

SIZES = {
    "full": dict(gpt=dict(layers=4, width=128, heads=4, context=64), gpt_batch=16, gpt_lr=1e-3,
                 vit=dict(depth=4, dim=64, heads=4), vit_batch=64, vit_lr=1e-3,
                 steps=150, warmup=30, val_every=25, val_batches=4),
    "quick": dict(gpt=dict(layers=2, width=32, heads=2, context=16), gpt_batch=4, gpt_lr=1e-3,
                  vit=dict(depth=2, dim=32, heads=2), vit_batch=16, vit_lr=1e-3,
                  steps=8, warmup=3, val_every=4, val_batches=2),
}
# Which sub-modules of a block belong to its first residual branch (F); the rest is G.
F_PARTS = {"ln_1", "attn", "norm1", "drop_path1"}
SKIP_DIRS = {".venv", ".git", "__pycache__", "revcompile.egg-info", "results"}


# --- the streams at a segment's output ------------------------------------------------------

# Per segment call: RMS of the first stream, of the second, and the smallest RMS of one token's
# vector in each (the scale a LayerNorm reading that stream divides by).
STREAMS: list[tuple[float, float, float, float]] = []


def probed(coupling):
    """``coupling`` whose ``leave`` also records the RMS of the two final streams.

    Both backward modes leave a segment through ``Coupling.leave``, so the probe sees the
    training forward's own streams and changes nothing they compute.
    """

    class Probed(type(coupling)):
        def leave(self, arith, prev, cur):
            STREAMS.append((_rms(prev), _rms(cur), _smallest_token_rms(prev), _smallest_token_rms(cur)))
            return super().leave(arith, prev, cur)

    return Probed(**{f.name: getattr(coupling, f.name) for f in fields(coupling)})


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().square().mean().sqrt())


def _smallest_token_rms(t: torch.Tensor) -> float:
    return float(t.detach().double().square().mean(-1).sqrt().min())


# --- data -----------------------------------------------------------------------------------


def code_text(limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This repository's ``.py`` files as bytes (train, validation)."""
    train, val = read_corpus([ROOT], ".py", limit, skip=SKIP_DIRS)
    as_tensor = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(val)


def digits() -> tuple[tuple, tuple]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target)
    cut = len(labels) * 4 // 5
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


# --- the workloads --------------------------------------------------------------------------


def gpt2_workload(size: dict, seed: int) -> dict:
    """HF GPT-2 from a config (its own initialisation: embeddings at std 0.02, dropout 0.1), byte vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    shape = size["gpt"]
    torch.manual_seed(seed)
    config = AutoConfig.for_model("gpt2", n_layer=shape["layers"], n_embd=shape["width"], n_head=shape["heads"],
                                  n_positions=shape["context"], vocab_size=256)
    return _text_workload(AutoModelForCausalLM.from_config(config), lambda m: m.transformer.h, "HF GPT-2", size, seed)


def bytegpt_workload(size: dict, seed: int) -> dict:
    """The fine-tuning benchmark's nanoGPT-style GPT (embeddings at std 1, no dropout)."""
    torch.manual_seed(seed)
    return _text_workload(ByteGPT(**size["gpt"]), lambda m: m.blocks, "ByteGPT", size, seed)


def _text_workload(model, blocks, kind: str, size: dict, seed: int) -> dict:
    train, val = code_text(limit=10**7)
    context = size["gpt"]["context"]
    batches = text_batches(train, size["gpt_batch"], context, torch.Generator().manual_seed(seed))
    vals = text_batches(val, size["gpt_batch"], context, torch.Generator().manual_seed(seed + 1))
    return dict(model=model, blocks=blocks, lr=size["gpt_lr"], seed=seed,
                batches=[next(batches) for _ in range(size["steps"])], val=[next(vals) for _ in range(size["val_batches"])],
                data=dict(corpus="this repository's .py files, bytes", train_bytes=len(train), val_bytes=len(val)),
                shape=dict(kind=kind, batch=size["gpt_batch"], **size["gpt"]))


def vit_workload(size: dict, seed: int) -> dict:
    train, val = digits()
    shape = size["vit"]
    torch.manual_seed(seed)
    model = reference_vit(img_size=16, patch_size=4, in_chans=1, num_classes=10, drop=0.0, attn_drop=0.0, drop_path=0.0, **shape)
    stream = image_batches(train, size["vit_batch"], torch.Generator().manual_seed(seed))
    return dict(model=model, blocks=lambda m: m.blocks, lr=size["vit_lr"], seed=seed,
                batches=[next(stream) for _ in range(size["steps"])], val=val_image_batches(val, size["vit_batch"]),
                data=dict(corpus="sklearn digits, 16x16", train_images=len(train[1]), val_images=len(val[1])),
                shape=dict(kind="reference_vit", img_size=16, patch_size=4, batch=size["vit_batch"], **shape))


WORKLOADS = {"gpt2": gpt2_workload, "vit": vit_workload, "bytegpt": bytegpt_workload}


# --- training -------------------------------------------------------------------------------


def batch_loss(model, batch) -> torch.Tensor:
    inputs, targets = batch
    output = model(inputs)
    output = getattr(output, "logits", output)
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))


def parameter_groups(model, blocks) -> dict[str, list]:
    """Parameters by where they act: ``block i F``, ``block i G`` and ``outside blocks``."""
    groups, inside = {}, set()
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            branch = "F" if name.split(".")[0] in F_PARTS else "G"
            groups.setdefault(f"block {i} {branch}", []).append(p)
            inside.add(id(p))
    groups["outside blocks"] = [p for p in model.parameters() if id(p) not in inside]
    return groups


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up to the peak over ``warmup`` steps, then cosine decay to a tenth of it."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def build_arm(workload: dict, arm: str):
    """(model to train, the original module whose parameters it shares)."""
    settings, mode = ARMS[arm]
    original = copy.deepcopy(workload["model"])
    if settings is None:
        return original, original
    net = revcompile.convert(original, (workload["batches"][0][0],), **settings)
    revcompile.set_backward(net, mode)
    net.reversible_settings.coupling = probed(net.reversible_settings.coupling)
    net.zero_grad(set_to_none=True)
    return net, original


@torch.no_grad()
def evaluate(model, batches) -> float:
    model.eval()
    loss = sum(float(batch_loss(model, b)) for b in batches) / len(batches)
    model.train()
    return loss


def train(workload: dict, arm: str, size: dict, clip: float, stop: int | None = None):
    """Train one arm: its per-step log; with ``stop``, (model, batch, log) at that step's gradients.

    The generator is seeded before the first step, so every arm draws the same dropout masks
    and a run to ``stop`` repeats the first ``stop`` steps of the full run bit for bit."""
    net, original = build_arm(workload, arm)
    torch.manual_seed(workload["seed"] + 2)
    groups = parameter_groups(original, workload["blocks"](original))
    optimizer = torch.optim.AdamW(net.parameters(), lr=workload["lr"], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, size["warmup"], size["steps"]))
    log = {k: [] for k in ("loss", "lr", "grad_norm", "streams")}
    log["groups"] = {g: [] for g in groups}
    log["val"] = [[0, evaluate(net, workload["val"])]]
    for step, batch in enumerate(workload["batches"][:stop]):
        STREAMS.clear()
        log["lr"].append(optimizer.param_groups[0]["lr"])
        loss = batch_loss(net, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, params in groups.items():
            log["groups"][name].append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        total = torch.nn.utils.clip_grad_norm_(net.parameters(), clip if clip > 0 else math.inf)
        log["loss"].append(float(loss.detach()))
        log["grad_norm"].append(float(total))
        log["streams"].append(list(STREAMS[-1]) if STREAMS else None)
        if stop is not None and step == stop - 1:
            return net, batch, log
        optimizer.step()
        schedule.step()
        if (step + 1) % size["val_every"] == 0 or step + 1 == size["steps"]:
            log["val"].append([step + 1, evaluate(net, workload["val"])])
    return log


def exactness(workload: dict, arm: str, size: dict, clip: float, step: int) -> dict:
    """At ``step`` of ``arm`` (the spike), float64 gradients of the training loss, reversible
    backward vs the autograd reference, per parameter."""
    net, batch, log = train(workload, arm, size, clip, stop=step + 1)
    net = net.double()
    inputs = batch[0].double() if batch[0].is_floating_point() else batch[0]
    grads = {}
    for mode in ("reversible", "autograd"):
        revcompile.set_backward(net, mode)
        net.zero_grad(set_to_none=True)
        torch.manual_seed(workload["seed"] + 3)  # the same dropout masks in both modes
        batch_loss(net, (inputs, batch[1])).backward()
        grads[mode] = {n: p.grad.clone() for n, p in net.named_parameters()}
    reference, candidate = grads["autograd"], grads["reversible"]
    scale = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in reference.values()])))
    errors = {n: float((candidate[n] - g).norm() / max(float(g.norm()), 1e-6 * scale)) for n, g in reference.items()}
    worst = max(errors, key=errors.get)
    return {"arm": arm, "step": step, "rerun_grad_norm_float32": log["grad_norm"][-1], "dtype": "float64",
            "grad_norm": scale, "parameters": len(errors),
            "worst_parameter": worst, "worst_relative_error": errors[worst]}


def experiment(name: str, workload: dict, size: dict, clip: float, arms: list[str]) -> dict:
    result = {"model": workload["shape"], "data": workload["data"], "lr": workload["lr"], "arms": {}}
    for arm in arms:
        began = time.perf_counter()
        result["arms"][arm] = train(workload, arm, size, clip)
        print(f"[{name}] {arm}: {time.perf_counter() - began:.0f} s, "
              f"max grad norm {max(result['arms'][arm]['grad_norm']):.2f}", flush=True)
    reversible = [a for a in arms if ARMS[a][1] == "reversible"]
    result["exactness"] = None
    if reversible:  # the largest spike from half-way through warm-up on, as train_curves_report counts it
        start = size["warmup"] // 2
        spiking = max(reversible, key=lambda a: max(result["arms"][a]["grad_norm"][start:]))
        curve = result["arms"][spiking]["grad_norm"]
        result["exactness"] = exactness(workload, spiking, size, clip, curve.index(max(curve[start:]), start))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (0: none)")
    parser.add_argument("--models", nargs="+", default=["gpt2", "vit"], choices=list(WORKLOADS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--name", default=None, help="result file stem (default train_curves[_quick])")
    parser.add_argument("--json", type=Path, help="default benchmarks/results/<name>.json")
    parser.add_argument("--image", type=Path, help="default docs/images/<name>.png (none with --quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = SIZES["quick" if args.quick else "full"]
    name = args.name or ("train_curves_quick" if args.quick else "train_curves")
    began = time.perf_counter()
    command = "OMP_NUM_THREADS=1 python benchmarks/train_curves.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    results = {"meta": run_meta(command=command, device="CPU (2 shared cores)", size="quick" if args.quick else "full",
                                seed=args.seed, clip=args.clip, steps=size["steps"], warmup=size["warmup"])}
    for model in args.models:
        results[model] = experiment(model, WORKLOADS[model](size, args.seed), size, args.clip, args.arms)
    results["meta"]["wall_s"] = time.perf_counter() - began
    results["summary"] = summary(results)
    image = args.image or (None if args.quick else ROOT / "docs" / "images" / f"{name}.png")
    write(results, args.json or ROOT / "benchmarks" / "results" / f"{name}.json", image)
    print(tables(results))
    return results


if __name__ == "__main__":
    main()
