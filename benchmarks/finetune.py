"""Fine-tuning pretrained models after conversion: which coupling keeps what pretraining learned?

    python benchmarks/finetune.py            # the full run (about 15 minutes on two CPU cores)
    python benchmarks/finetune.py --quick    # a smoke test (under a minute)

Two experiments on data that needs no download:

* text: a byte-level GPT (written below, nanoGPT-style), pretrained on the interpreter's own
  standard-library sources, then fine-tuned on C headers (``/usr/include``, else Python's
  own include directory);
* images: revcompile's reference ViT on scikit-learn's bundled 8x8 digits upsampled to
  16x16, pretrained on digits 0-4, then fine-tuned on digits 5-9 through the same 5-way head.

Each pretrained model is fine-tuned once per *arm*: the original model (ordinary
fine-tuning), ``coupling="revvit"``, ``coupling="dual"`` at several beta, ``alpha=1``
beside ``alpha=None`` at one beta, and dual with ``revcompile.beta_schedule`` applied by
``set_coefficients`` before each step. Every arm starts from a copy of the same weights,
gets the same batches in the same order and its own AdamW with the same settings. The
arms step in rotation (step i of every arm, then step i+1), so that a change in the load of
a shared machine hits every arm alike.

Measured per arm: validation loss of the converted model before any fine-tuning step, on
the pretraining task and on the fine-tuning task (the original's beside it); validation
loss on the fine-tuning task every few steps and at the end; bytes saved for backward by
one training forward (``revcompile.measure.saved_for_backward``, parameters excluded); the
median fine-tuning step time (forward, loss, backward, AdamW step). Besides, the saved
bytes of a 12-layer, width-128 GPT: original against dual at k = 8.

Writes JSON (``--json``) and, with matplotlib, the validation curves (``--image``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import sysconfig
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import revcompile
from revcompile.measure import saved_for_backward
from revcompile.reference import reference_vit

from finetune_report import plot, tables  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent

# Arms: name -> convert() keywords (None: the original model, unconverted), and whether
# beta follows revcompile.beta_schedule from 2**-8 to 2**-2 over fine-tuning.
ARMS = {
    "original": None,
    "revvit": dict(coupling="revvit"),
    "dual k=8": dict(coupling="dual", beta=2.0**-8),
    "dual k=4": dict(coupling="dual", beta=2.0**-4),
    "dual k=2": dict(coupling="dual", beta=2.0**-2),
    "dual k=2 alpha=1": dict(coupling="dual", beta=2.0**-2, alpha=1.0),
    "dual schedule k=8..2": dict(coupling="dual", beta=2.0**-8),
}
SCHEDULED = {"dual schedule k=8..2": (2.0**-8, 2.0**-2)}

# Sizes: the full run and the smoke test.
SIZES = {
    "full": dict(gpt=dict(layers=6, width=128, heads=4, context=64), gpt_batch=8, gpt_pretrain=300,
                 vit=dict(depth=6, dim=64, heads=4), vit_batch=32, vit_pretrain=200,
                 finetune=100, eval_every=20, val_batches=6, corpus_bytes=2_000_000),
    "quick": dict(gpt=dict(layers=6, width=32, heads=2, context=32), gpt_batch=8, gpt_pretrain=40,
                  vit=dict(depth=6, dim=32, heads=2), vit_batch=32, vit_pretrain=20,
                  finetune=4, eval_every=2, val_batches=2, corpus_bytes=200_000),
}


# --- the GPT --------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, width))


class GPTBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ByteGPT(nn.Module):
    """A pre-norm GPT over bytes: token and learned position embeddings, blocks, norm, head."""

    def __init__(self, layers: int, width: int, heads: int, context: int):
        super().__init__()
        self.token = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.randn(1, context, width) * 0.02)
        self.blocks = nn.Sequential(*(GPTBlock(width, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)

    def forward(self, idx):
        x = self.token(idx) + self.position[:, : idx.shape[1]]
        return self.head(self.ln_f(self.blocks(x)))


# --- data -----------------------------------------------------------------------------------


def source_files(root: Path, suffix: str, skip: set):
    """Files named ``*suffix`` under ``root`` in sorted order, walked lazily, ``skip`` folders left out."""
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in skip)
        yield from (Path(folder) / name for name in sorted(names) if name.endswith(suffix))


def read_corpus(roots: list[Path], suffix: str, limit: int, skip=frozenset()) -> tuple[bytes, bytes]:
    """Files under the first root that has any, up to ``limit`` bytes; every 10th file (at least one) validates."""
    for root in roots:
        files, total = [], 0
        for path in source_files(root, suffix, skip):
            files.append(path.read_bytes())
            total += len(files[-1])
            if total >= limit:
                break
        if len(files) >= 2:
            val = set(range(9, len(files), 10)) or {len(files) - 1}
            return (b"\n".join(f for i, f in enumerate(files) if i not in val),
                    b"\n".join(f for i, f in enumerate(files) if i in val))
    raise SystemExit(f"fewer than two {suffix} files under {', '.join(map(str, roots))}: nothing to train on")


def text_tasks(limit: int) -> dict:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    python = read_corpus([stdlib], ".py", limit, skip={"test", "tests", "idlelib", "site-packages", "__pycache__"})
    headers = read_corpus([Path("/usr/include"), Path(sysconfig.get_paths()["include"])], ".h", limit)
    as_tensor = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # noqa: E731
    return {name: tuple(map(as_tensor, split)) for name, split in (("python", python), ("c_headers", headers))}


def text_batches(data: torch.Tensor, batch: int, context: int, generator: torch.Generator):
    """An endless stream of (input, next-byte target) windows drawn with ``generator``."""
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=generator)
        windows = torch.stack([data[s: s + context + 1] for s in starts.tolist()])
        yield windows[:, :-1], windows[:, 1:]


def image_tasks() -> dict:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the image experiment uses scikit-learn's bundled digits: pip install scikit-learn") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    tasks = {}
    for name, first in (("digits 0-4", 0), ("digits 5-9", 5)):
        chosen = ((labels >= first) & (labels < first + 5)).nonzero().squeeze(1)
        cut = len(chosen) * 4 // 5  # the bundled order is mixed already
        tasks[name] = ((images[chosen[:cut]], labels[chosen[:cut]] - first), (images[chosen[cut:]], labels[chosen[cut:]] - first))
    return tasks


def image_batches(split, batch: int, generator: torch.Generator):
    images, labels = split
    while True:
        for chunk in torch.randperm(len(labels), generator=generator).split(batch):
            if len(chunk) == batch:
                yield images[chunk], labels[chunk]


def fixed_batches(stream, count: int) -> list:
    return [next(stream) for _ in range(count)]


def val_image_batches(split, batch: int) -> list:
    images, labels = split
    return [(images[i: i + batch], labels[i: i + batch]) for i in range(0, len(labels) - batch + 1, batch)]


# --- training -------------------------------------------------------------------------------


def batch_loss(model, batch) -> torch.Tensor:
    inputs, targets = batch
    output = model(inputs)
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model, batches) -> float:
    was_training = model.training
    model.eval()
    loss = sum(float(batch_loss(model, b)) for b in batches) / len(batches)
    model.train(was_training)
    return loss


def make_optimizer(model, lr: float):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def train_step(model, optimizer, batch) -> None:
    loss = batch_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def pretrain(model, stream, steps: int, lr: float) -> list[float]:
    optimizer = make_optimizer(model, lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        train_step(model, optimizer, next(stream))
        schedule.step()
        times.append(time.perf_counter() - began)
    return times


def build_arms(pretrained: nn.Module, example) -> dict[str, nn.Module]:
    arms = {}
    for name, settings in ARMS.items():
        model = copy.deepcopy(pretrained)
        arms[name] = model if settings is None else revcompile.convert(model, (example,), **settings)
    return arms


def finetune(arms: dict, stream, val: list, steps: int, eval_every: int, lr: float) -> dict:
    """Fine-tune every arm on the same batches, in rotation; validation curves and step times."""
    optimizers = {name: make_optimizer(model, lr) for name, model in arms.items()}
    curves = {name: [[0, evaluate(model, val)]] for name, model in arms.items()}
    times = {name: [] for name in arms}
    for step in range(steps):
        batch = next(stream)
        for name, model in arms.items():
            if name in SCHEDULED:
                start, end = SCHEDULED[name]
                revcompile.set_coefficients(model, beta=revcompile.beta_schedule(step, steps, start=start, end=end))
            began = time.perf_counter()
            train_step(model, optimizers[name], batch)
            times[name].append(time.perf_counter() - began)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            for name, model in arms.items():
                curves[name].append([step + 1, evaluate(model, val)])
    return {"curves": curves, "times": times}


def saved_bytes(model, batch) -> int:
    _, saved = saved_for_backward(lambda: batch_loss(model, batch), model)
    return saved.bytes


def arm_saved_bytes(arms: dict, batch) -> dict:
    """Saved-for-backward bytes of one training forward per arm (the schedule's at its start and end)."""
    result = {}
    for name, model in arms.items():
        result[name] = saved_bytes(model, batch)
        if name in SCHEDULED:
            start, end = SCHEDULED[name]
            result[name] = {}
            for label, beta in (("start", start), ("end", end)):
                revcompile.set_coefficients(model, beta=beta)
                result[name][label] = saved_bytes(model, batch)
            revcompile.set_coefficients(model, beta=start)
    return result


# --- the experiments ------------------------------------------------------------------------


def experiment(name, model, pretrain_stream, pretrain_val, finetune_stream, finetune_val, size, lrs) -> dict:
    print(f"[{name}] pretraining {size['pretrain']} steps", flush=True)
    began = time.perf_counter()
    pretrain_times = pretrain(model, pretrain_stream, size["pretrain"], lrs[0])
    print(f"[{name}] pretrained in {time.perf_counter() - began:.0f} s; converting", flush=True)
    train_batch = next(finetune_stream)
    arms = build_arms(model, train_batch[0])
    after = {arm: {"pretrain_task": evaluate(m, pretrain_val), "finetune_task": evaluate(m, finetune_val)}
             for arm, m in arms.items()}
    saved = arm_saved_bytes(arms, train_batch)
    print(f"[{name}] fine-tuning {len(arms)} arms x {size['finetune']} steps", flush=True)
    run = finetune(arms, finetune_stream, finetune_val, size["finetune"], size["eval_every"], lrs[1])
    warm = max(1, len(next(iter(run["times"].values()))) // 10)
    return {
        "model": size["model"],
        "pretrain": {"steps": size["pretrain"], "lr": lrs[0], "median_step_s": statistics.median(pretrain_times),
                     "val_loss": evaluate(model, pretrain_val)},
        "finetune": {"steps": size["finetune"], "lr": lrs[1], "batch": list(train_batch[0].shape)},
        "arms": {
            arm: {
                "convert": ARMS[arm],
                "val_loss_after_conversion": after[arm],
                "final_val_loss": run["curves"][arm][-1][1],
                "curve": run["curves"][arm],
                "saved_for_backward_bytes": saved[arm],
                "median_step_s": statistics.median(run["times"][arm][warm:]),
            }
            for arm in arms
        },
    }


def gpt_experiment(size: dict, seed: int) -> dict:
    corpora = text_tasks(size["corpus_bytes"])
    shape = size["gpt"]
    torch.manual_seed(seed)
    model = ByteGPT(**shape)
    streams = {name: (text_batches(train, size["gpt_batch"], shape["context"], torch.Generator().manual_seed(seed + i)),
                      text_batches(val, size["gpt_batch"], shape["context"], torch.Generator().manual_seed(seed + 10 + i)))
               for i, (name, (train, val)) in enumerate(corpora.items())}
    vals = {name: fixed_batches(val_stream, size["val_batches"]) for name, (_, val_stream) in streams.items()}
    result = experiment(
        "gpt", model, streams["python"][0], vals["python"], streams["c_headers"][0], vals["c_headers"],
        dict(size, pretrain=size["gpt_pretrain"], model=dict(kind="ByteGPT", **shape)), lrs=(1e-3, 3e-4),
    )
    result["data"] = {name: {"train_bytes": len(t), "val_bytes": len(v)} for name, (t, v) in corpora.items()}
    result["tasks"] = ["python stdlib sources (pretrain)", "C headers (fine-tune)"]
    return result


def vit_experiment(size: dict, seed: int) -> dict:
    tasks = image_tasks()
    shape = size["vit"]
    torch.manual_seed(seed)
    model = reference_vit(img_size=16, patch_size=4, in_chans=1, num_classes=5, drop=0.0, attn_drop=0.0, drop_path=0.0, **shape)
    batch = size["vit_batch"]
    first, second = tasks["digits 0-4"], tasks["digits 5-9"]
    result = experiment(
        "vit", model, image_batches(first[0], batch, torch.Generator().manual_seed(seed)), val_image_batches(first[1], batch),
        image_batches(second[0], batch, torch.Generator().manual_seed(seed + 1)), val_image_batches(second[1], batch),
        dict(size, pretrain=size["vit_pretrain"], model=dict(kind="reference_vit", img_size=16, patch_size=4, **shape)),
        lrs=(1e-3, 3e-4),
    )
    result["data"] = {name: {"train_images": len(t[1]), "val_images": len(v[1])} for name, (t, v) in tasks.items()}
    result["tasks"] = ["digits 0-4 (pretrain)", "digits 5-9 (fine-tune, same 5-way head)"]
    return result


def depth12_saved_bytes(size: dict, seed: int) -> dict:
    """Saved-for-backward bytes of a 12-layer, width-128 byte GPT: original, dual at k = 8 and 2, revvit."""
    torch.manual_seed(seed)
    context = size["gpt"]["context"]
    model = ByteGPT(layers=12, width=128, heads=4, context=context)
    batch = (torch.randint(0, 256, (size["gpt_batch"], context)), torch.randint(0, 256, (size["gpt_batch"], context)))
    result = {"model": dict(layers=12, width=128, heads=4, context=context, batch=size["gpt_batch"]),
              "original": saved_bytes(model, batch)}
    for name, settings in (("dual k=8", dict(coupling="dual", beta=2.0**-8)), ("dual k=2", dict(coupling="dual", beta=2.0**-2)),
                           ("revvit", dict(coupling="revvit"))):
        result[name] = saved_bytes(revcompile.convert(copy.deepcopy(model), (batch[0],), **settings), batch)
    result["ratio original / dual k=8"] = result["original"] / result["dual k=8"]
    return result


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_at_start": list(os.getloadavg())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke test (< 60 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a loaded shared machine, two threads ran 10x slower)")
    parser.add_argument("--json", type=Path, help="default benchmarks/results/finetune[_quick].json")
    parser.add_argument("--image", type=Path, help="default docs/images/finetune_curves.png (none with --quick)")
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    torch.set_num_threads(args.threads)
    json_path = args.json or ROOT / "benchmarks" / "results" / ("finetune_quick.json" if args.quick else "finetune.json")
    image_path = args.image or (None if args.quick else ROOT / "docs" / "images" / "finetune_curves.png")
    began = time.perf_counter()
    results = {"command": " ".join(["python", "benchmarks/finetune.py", *(argv if argv is not None else sys.argv[1:])]),
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
               "size": "quick" if args.quick else "full", "seed": args.seed}
    results["gpt"] = gpt_experiment(size, args.seed)
    results["vit"] = vit_experiment(size, args.seed)
    results["depth12_saved_bytes"] = depth12_saved_bytes(size, args.seed)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - began
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    print(f"wrote {json_path}", flush=True)
    if image_path is not None:
        plot(results, image_path)
    print(tables(results))
    return results


if __name__ == "__main__":
    main()
