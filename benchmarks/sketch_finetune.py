"""Fine-tuning with sketched linear layers: accuracy and loss against the kept fraction (never a test).

    python benchmarks/sketch_finetune.py                       # rows: ~4 min on one busy CPU core
    python benchmarks/sketch_finetune.py --estimator gaussian  # ~12 min: S is drawn twice per layer

A small pre-norm transformer (byte vocabulary, 3 blocks, width 64) is converted with
revcompile and pretrained briefly as a byte-level language model on the Python standard
library's top-level modules, read from this interpreter's own stdlib (nothing is
downloaded). It is then fine-tuned on another domain -- CPython's C headers from this
interpreter's include directory, every fourth file held out for the test -- once exactly
and once per kept fraction with every linear layer sketched (``SketchConfig(keep,
layers="all")``, the seed paper's setting: all linear layers of the fine-tuned model).
Every run starts from the same pretrained weights with the same data order.

Per fraction: final training loss (mean of the last 20 steps), test loss and next-byte
accuracy on the held-out headers, the sketched layers' weight-gradient variance over the
batch-sampling variance (median and largest over layers, ``revcompile.sketch_variance``
on a fine-tuning batch), the bytes saved for backward by one step in the
stored-activation ("autograd") mode and in the reversible mode. Writes ``sketch_finetune_<estimator>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sysconfig
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import revcompile
from revcompile.measure import saved_for_backward
from revcompile.sketch_variance import sketch_report

CONTEXT, DIM, DEPTH, HEADS, VOCAB = 64, 64, 3, 4, 256


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def attention(self, h):
        batch, tokens, _ = h.shape
        q, k, v = self.qkv(h).view(batch, tokens, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, DIM))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.position = nn.Parameter(torch.randn(1, CONTEXT, DIM) * 0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.norm = nn.LayerNorm(DIM)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class LanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk, self.lm_head = Trunk(), nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        return self.lm_head(self.trunk(tokens))


# --- data: the standard library of this interpreter ------------------------------------------------


def _bytes(paths) -> torch.Tensor:
    data = b"\n".join(p.read_bytes() for p in paths)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def corpora():
    paths = sysconfig.get_paths()
    pretrain = _bytes(sorted(Path(paths["stdlib"]).glob("*.py")))
    headers = sorted(Path(paths["include"]).rglob("*.h"))
    held_out = headers[::4]
    return pretrain, _bytes([h for h in headers if h not in held_out]), _bytes(held_out)


def windows(text: torch.Tensor, count: int, generator) -> torch.Tensor:
    starts = torch.randint(0, len(text) - CONTEXT - 1, (count,), generator=generator)
    return torch.stack([text[s : s + CONTEXT + 1] for s in starts.tolist()])


def lm_loss(model, chunk) -> torch.Tensor:
    return F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())


# --- runs ----------------------------------------------------------------------------------------------


def pretrain(pretrain_text, steps: int, batch: int) -> dict:
    torch.manual_seed(0)
    model = LanguageModel()
    example = windows(pretrain_text, batch, torch.Generator().manual_seed(0))[:, :CONTEXT]
    converted = revcompile.convert(model, example)
    revcompile.set_backward(converted, "autograd")  # the same function and gradients, faster on CPU
    optimizer = torch.optim.AdamW(converted.parameters(), lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        loss = lm_loss(converted, windows(pretrain_text, batch, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  pretrain step {step}: loss {loss.item():.3f}", flush=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def evaluate(model, test_set) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(test_set[:, :-1]).flatten(0, 1)
    targets = test_set[:, 1:].flatten()
    return F.cross_entropy(logits, targets).item(), (logits.argmax(1) == targets).float().mean().item()


def _saved(converted, snippets, mode: str) -> int:
    revcompile.set_backward(converted, mode)
    _, saved = saved_for_backward(lambda: converted(snippets), converted)
    revcompile.set_backward(converted, "reversible")
    return saved.bytes


def finetune(pretrained, train_text, test_set, keep, args) -> dict:
    model = LanguageModel()
    model.load_state_dict(pretrained)
    generator = torch.Generator().manual_seed(3)
    example = windows(train_text, args.batch, generator)
    sketch = revcompile.SketchConfig(keep, layers="all", estimator=args.estimator, seed=4) if keep else None
    converted = revcompile.convert(model, example[:, :-1], sketch_linears=sketch)
    optimizer = torch.optim.AdamW(converted.parameters(), lr=args.lr, weight_decay=0.01)
    losses, start = [], time.perf_counter()
    for _ in range(args.finetune_steps):
        loss = lm_loss(converted, windows(train_text, args.batch, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    test_loss, accuracy = evaluate(converted, test_set)
    result = {"keep": keep or 1.0, "exact": keep is None, "train_loss": statistics.mean(losses[-20:]),
              "test_loss": test_loss, "test_accuracy": accuracy, "seconds": seconds,
              "saved_bytes_autograd": _saved(converted, example[:, :-1], "autograd"),
              "saved_bytes_reversible": _saved(converted, example[:, :-1], "reversible")}
    if keep:
        chunk = windows(train_text, args.batch, torch.Generator().manual_seed(5))
        loss = lambda out: F.cross_entropy(out.flatten(0, 1), chunk[:, 1:].flatten())  # noqa: E731
        report = sketch_report(converted, (chunk[:, :-1],), {}, loss, draws=args.draws)
        ratios = [v.ratio for v in report.layers if v.ratio is not None]
        result.update(variance_ratio_median=statistics.median(ratios), variance_ratio_max=max(ratios),
                      sketch_variance_median=statistics.median(v.sketch_measured for v in report.layers),
                      batch_variance_median=statistics.median(v.batch for v in report.layers),
                      layers=len(report.layers))
    return result


def markdown_table(results: list[dict]) -> str:
    lines = ["| kept fraction | train loss | test loss | next-byte test accuracy | sketch var / batch var (median, max over layers) "
             "| saved for backward, autograd mode | reversible mode | fine-tune time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = "exact" if r["exact"] else f"{r['variance_ratio_median']:.2f}, {r['variance_ratio_max']:.2f}"
        keep = "1.0 (exact, not sketched)" if r["exact"] else f"{r['keep']:g}"
        lines.append(f"| {keep} | {r['train_loss']:.3f} | {r['test_loss']:.3f} | {r['test_accuracy'] * 100:.1f}% | {ratio} "
                     f"| {r['saved_bytes_autograd'] / 2**20:.1f} MiB | {r['saved_bytes_reversible'] / 2**20:.2f} MiB "
                     f"| {r['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimator", default="rows", choices=("gaussian", "rademacher", "rows"))
    parser.add_argument("--fractions", default="1.0,0.5,0.25,0.1")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--test-size", type=int, default=256, help="held-out windows of 64 bytes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--draws", type=int, default=16, help="sketches per layer for the measured variance")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pretrain_text, train, test = corpora()
    test_set = windows(test, args.test_size, torch.Generator().manual_seed(6))
    print(f"pretrain: {len(pretrain_text):,} bytes of stdlib; fine-tune: {len(train):,} bytes of C headers "
          f"({len(test):,} held out)", flush=True)
    start = time.perf_counter()
    pretrained = pretrain(pretrain_text, args.pretrain_steps, args.batch)
    results = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        result = finetune(pretrained, train, test_set, None if fraction == 1.0 else fraction, args)
        print(f"  keep {fraction:g}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})}", flush=True)
        results.append(result)
    table = markdown_table(results)
    print(table)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "seconds": time.perf_counter() - start,
            "args": vars(args), "pretrain_bytes": len(pretrain_text), "finetune_bytes": len(train), "test_bytes": len(test)}
    out = Path(args.out) / f"sketch_finetune_{args.estimator}.json"
    out.write_text(json.dumps({"meta": meta, "results": results, "table": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
