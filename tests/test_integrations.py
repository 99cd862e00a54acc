"""A converted model in the training loops people run: HF Trainer, Accelerate, PyTorch Lightning.

Each test trains a tiny model from a config (random weights) a few steps on CPU: the loss goes
down, and what the tool saves is the original model's checkpoint. The tools come with the
``integrations`` extra (CI installs it); a test is skipped only where its tool is missing.
The examples in docs/usage.md ("With HF Trainer, Accelerate and Lightning") are these tests.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import revcompile
from revcompile.reference import example_inputs, reference_vit


ROOT = Path(__file__).resolve().parents[1]


def _tiny_vit(dtype=torch.float32):
    torch.manual_seed(0)
    return reference_vit(depth=3, dim=32, heads=2, num_classes=4).to(dtype)


def _assert_same_state(loaded: dict, trained: dict) -> None:
    assert list(loaded) == list(trained)
    for key in trained:
        assert torch.equal(loaded[key], trained[key]), key


# -- HF Trainer ----------------------------------------------------------------------------


@pytest.mark.slow  # ~15 s on a loaded 2-core CPU: torch.export of GPT-2 and the Trainer's setup
def test_hf_trainer_trains_a_converted_gpt2_and_saves_the_original_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    # In a process of its own: a Trainer run leaves torch function modes disabled for the rest
    # of the process (torch 2.14, transformers 5.23, accelerate 1.16), so a later
    # `with torch.device("meta")` would silently build on the CPU.
    probe = f"from tests.test_integrations import _trainer_run; import pathlib; _trainer_run(pathlib.Path({str(tmp_path)!r}))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def _trainer_run(tmp_path):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    class OriginalCheckpointTrainer(Trainer):
        """Checkpoints hold the original model, saved by its own save_pretrained (tied weights once)."""

        def save_model(self, output_dir=None, _internal_call=False):
            revcompile.unconvert(self.model).save_pretrained(output_dir or self.args.output_dir)

    transformers.set_seed(0)
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    tokens = torch.randint(0, 64, (8, 16))
    converted = revcompile.convert(AutoModelForCausalLM.from_config(config), tokens, {"labels": tokens})
    assert len(revcompile.explain(converted).blocks) == 2

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=1, save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False,  # the converted forward takes (*args, **kwargs): keep every column
    )
    trainer = OriginalCheckpointTrainer(model=converted, args=args,
                                        train_dataset=[{"input_ids": t, "labels": t} for t in tokens])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    # Trainer adds num_items_in_batch to the call: traced once more, not once a step
    assert len(converted.reversible_variants) <= 2

    trained = {k: v.detach().clone() for k, v in converted.state_dict().items()}
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-4")
    _assert_same_state(original.state_dict(), trained)

    # and back into a converted model: the same keys, strictly
    again = copy.deepcopy(converted)
    for parameter in again.parameters():
        parameter.data.zero_()
    again.load_state_dict(original.state_dict(), strict=True)
    _assert_same_state(again.state_dict(), trained)
    converted.eval(), again.eval()
    assert torch.equal(again(tokens).logits, converted(tokens).logits)

    # and Trainer's own resume loads it into a converted model (at max_steps: no step taken after)
    resumed = copy.deepcopy(converted).train()
    for parameter in resumed.parameters():
        parameter.data.zero_()
    OriginalCheckpointTrainer(model=resumed, args=args, train_dataset=trainer.train_dataset).train(
        resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    _assert_same_state(resumed.state_dict(), trained)


# -- Accelerate ----------------------------------------------------------------------------


def _vit_batches(model, steps=3):
    """One batch, three times: with the same dropout masks each step, the loss must fall."""
    torch.manual_seed(1)
    images, labels = example_inputs(model, batch_size=4, dtype=torch.float64)[0], torch.randint(0, 4, (4,))
    return [(images, labels)] * steps


def _loss(model, images, labels):
    return torch.nn.functional.cross_entropy(model(images), labels)


def test_accelerate_trains_a_converted_vit_with_the_gradients_of_a_plain_loop():
    accelerate = pytest.importorskip("accelerate")

    model = _tiny_vit(torch.float64)  # dropout and drop path on
    batches = _vit_batches(model)
    converted = revcompile.convert(model, batches[0][0])
    reference = copy.deepcopy(converted)
    revcompile.set_backward(reference, "autograd")  # activations stored: the exact gradients

    accelerator = accelerate.Accelerator(cpu=True)
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    prepared, optimizer, loader = accelerator.prepare(converted, optimizer, loader)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)

    losses = []
    for step, (images, labels) in enumerate(loader):
        images.grad = None  # the loader hands out the same tensor each step
        images.requires_grad_(True)
        torch.manual_seed(100)  # the same dropout masks in both loops and every step
        loss = _loss(prepared, images, labels)
        optimizer.zero_grad()
        accelerator.backward(loss)
        reference_images = batches[step][0].detach().clone().requires_grad_(True)
        torch.manual_seed(100)
        reference_loss = _loss(reference, reference_images, labels)
        reference_optimizer.zero_grad()
        reference_loss.backward()

        assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-12)
        pairs = [*zip(converted.named_parameters(), reference.parameters()), (("input", images), reference_images)]
        scale = max(q.grad.abs().max().item() for _, q in pairs)
        for (name, p), q in pairs:
            own = q.grad.abs().max().item()  # a zero true gradient: compare on the model's scale
            assert (p.grad - q.grad).abs().max().item() <= 1e-10 * (own or scale), name
        optimizer.step()
        reference_optimizer.step()
        losses.append(loss.item())
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]


# -- PyTorch Lightning ---------------------------------------------------------------------


def test_lightning_trains_a_converted_vit_and_its_checkpoint_loads_into_the_original(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")

    class Classifier(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.losses = []

        def training_step(self, batch, batch_index):
            loss = torch.nn.functional.cross_entropy(self.model(batch[0]), batch[1])
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    model = _tiny_vit()
    torch.manual_seed(1)
    images, labels = example_inputs(model, batch_size=8)[0], torch.randint(0, 4, (8,))
    classifier = Classifier(revcompile.convert(model, images))
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=True,
                         default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(classifier, torch.utils.data.DataLoader([(images, labels)] * 4, batch_size=None))
    assert len(classifier.losses) == 4 and classifier.losses[-1] < classifier.losses[0]

    (saved,) = tmp_path.glob("checkpoints/*.ckpt")
    state = torch.load(saved, weights_only=True)["state_dict"]
    assert all(key.startswith("model.") for key in state)
    original = _tiny_vit()
    original.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    _assert_same_state(original.state_dict(), classifier.model.state_dict())
