"""Tracing: fx first, torch.export as fallback, and the traps of exported graphs solved."""

from __future__ import annotations

import pytest
import torch

import revcompile
from revcompile import ConversionError
from tests import blocks as B
from tests.conftest import assert_gradients_match, perturb_parameters
from tests.models import hf_gpt2, reference_vit


def test_auto_prefers_fx_and_falls_back_to_export():
    model, args, _, _ = reference_vit()
    assert revcompile.explain(revcompile.convert(model, args)).tracer == "fx"
    gpt2, ids, _, _ = hf_gpt2(depth=1)
    plan = revcompile.explain(revcompile.convert(gpt2, ids))
    assert plan.tracer == "export"
    assert any("fx tracing failed" in note for note in plan.notes)


def test_forced_export_of_an_fx_traceable_model_is_exact():
    torch.manual_seed(0)
    model, (x,), _, depth = reference_vit(depth=3)
    model = perturb_parameters(model.double())
    converted = revcompile.convert(model, x.double(), tracer="export")
    plan = revcompile.explain(converted)
    assert plan.tracer == "export" and len(plan.blocks) == depth
    assert_gradients_match(converted, (x.double(),), tol=1e-10)


def test_exported_model_accepts_other_batch_and_sequence_lengths_without_retracing():
    torch.manual_seed(0)
    model, (ids,), _, _ = hf_gpt2(depth=1)
    converted = revcompile.convert(model, ids).eval()
    converted(ids)
    variants = len(converted.reversible_variants)
    other = torch.randint(0, 100, (5, 9))
    full = converted(other).last_hidden_state
    assert full.shape == (5, 9, model.config.n_embd)
    assert len(converted.reversible_variants) == variants
    # the dynamic batch dimension really is per-sample: a sub-batch gives the same rows
    torch.testing.assert_close(converted(other[:2]).last_hidden_state, full[:2])
    torch.testing.assert_close(converted(other[:1]).last_hidden_state, full[:1])


def test_train_and_eval_switch_dropout_on_an_exported_model():
    torch.manual_seed(0)
    model, (ids,), _, _ = hf_gpt2(depth=1)
    converted = revcompile.convert(model, ids)
    converted.eval()
    assert torch.equal(converted(ids).last_hidden_state, converted(ids).last_hidden_state)
    converted.train()
    torch.manual_seed(1)
    a = converted(ids).last_hidden_state
    torch.manual_seed(2)
    b = converted(ids).last_hidden_state
    assert not torch.equal(a, b)
    torch.manual_seed(1)
    assert torch.equal(a, converted(ids).last_hidden_state)
    plans = {v.compiled.plan.signature() for v in converted.reversible_variants}
    assert len(plans) == 1  # eval and train variants convert the same blocks


def test_keyword_arguments_from_conversion_stay_optional():
    torch.manual_seed(0)
    model, (ids,), _, _ = hf_gpt2(depth=1)
    ones = torch.ones_like(ids)
    converted = revcompile.convert(model, ids, {"attention_mask": ones}).eval()
    with_mask = converted(ids, attention_mask=ones).last_hidden_state
    without = converted(ids).last_hidden_state  # the original's default (None) works
    torch.testing.assert_close(with_mask, without)

    plain = revcompile.convert(model, ids).eval()  # and the other way round
    torch.testing.assert_close(plain(ids, attention_mask=ones).last_hidden_state, without)


def test_dtype_change_after_conversion_retraces_and_stays_exact():
    torch.manual_seed(0)
    model, (x,), _, _ = reference_vit(depth=2)
    converted = revcompile.convert(model, x)
    perturb_parameters(converted.double())
    assert converted(x.double()).dtype == torch.float64
    assert_gradients_match(converted, (x.double(),), tol=1e-10)


def test_a_variant_converting_other_blocks_is_refused():
    class TrainOnlyMlp(B.Stack):
        def forward(self, x):
            x = self.embed(x)
            for block in self.blocks:
                x = x + block.attn(block.norm1(x))
                if self.training:
                    x = x + block.mlp(block.norm2(x))
            return self.head(x)

    model = TrainOnlyMlp()
    converted = revcompile.convert(model, B.tokens())
    converted.eval()
    with pytest.raises(ConversionError, match="different blocks"):
        converted(B.tokens())


def test_nothing_convertible_says_what_was_found():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(ConversionError, match="no residual connections"):
        revcompile.convert(mlp, torch.randn(2, 8))
    with pytest.raises(ConversionError, match="post_norm='move'"):
        revcompile.convert(B.sequential(B.PostNormBlock()), B.tokens(), tracer="fx")


def test_untraceable_model_reports_both_tracers():
    class DataDependent(B.Stack):
        def forward(self, x):
            if x.sum() > 0:
                x = -x
            return super().forward(x)

    with pytest.raises(ConversionError) as caught:
        revcompile.convert(DataDependent(), B.tokens())
    message = str(caught.value)
    assert "fx:" in message and "export:" in message and "Try:" in message


def test_bad_example_inputs_and_options_get_clear_errors():
    model, (x,), _, _ = reference_vit(depth=1)
    with pytest.raises(ConversionError, match="do not match"):
        revcompile.convert(model, (x,), {"pixels": x})
    with pytest.raises(ValueError, match="tracer"):
        revcompile.convert(model, x, tracer="jit")
    with pytest.raises(ValueError, match="fusion"):
        revcompile.convert(model, x, fusion="concat")
    with pytest.raises(ValueError, match="streams"):
        revcompile.convert(model, x, streams="int8")
    with pytest.raises(ValueError, match="post_norm"):
        revcompile.convert(model, x, post_norm="drop")
    converted = revcompile.convert(model, x)
    with pytest.raises(ConversionError, match="already converted"):
        revcompile.convert(converted, x)
    with pytest.raises(TypeError, match="do not match"):
        converted(x, x)
    assert revcompile.unconvert(converted) is model


def test_deepcopy_is_an_independent_converted_model():
    import copy

    torch.manual_seed(0)
    model, (x,), _, _ = reference_vit(depth=2)
    converted = revcompile.convert(model, x)
    clone = copy.deepcopy(converted)
    assert not set(map(id, clone.parameters())) & set(map(id, converted.parameters()))
    torch.manual_seed(5)
    a = converted(x)
    torch.manual_seed(5)
    assert torch.equal(clone(x), a)  # same function, same random masks
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.5)
    torch.manual_seed(5)
    assert torch.equal(converted(x), a)  # the original conversion is untouched
    clone(x).sum().backward()
    assert all(p.grad is not None for p in clone.parameters()) and all(p.grad is None for p in converted.parameters())
    # the copy's compiled graphs read the copy's live attributes, not snapshots
    assert clone.reversible_variants[0].module._buffers is clone._buffers


def test_pickled_model_retraces_and_keeps_its_plan(tmp_path):
    torch.manual_seed(0)
    model, (x,), _, _ = reference_vit(depth=2)
    converted = revcompile.convert(model, x)
    torch.save(converted, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert revcompile.explain(loaded) == revcompile.explain(converted)
    loaded.eval(), converted.eval()
    assert torch.equal(loaded(x), converted(x))


def test_a_call_like_the_example_reuses_the_conversion_trace():
    """No retrace on the first call: lifted constants must not change the variant key."""
    from tests.models import hf_llama

    torch.manual_seed(0)
    model, args, kwargs, _ = hf_llama(depth=1)
    converted = revcompile.convert(model, args, kwargs)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(type(t)) or t, lambda t: t):
        converted(*args, **kwargs)
    assert len(converted.reversible_variants) == 1
    assert torch.Tensor in seen and all(t is torch.Tensor or issubclass(t, torch.nn.Parameter) for t in seen)


def test_retracing_does_not_show_fake_tensors_to_user_hooks():
    torch.manual_seed(0)
    model, (ids,), _, _ = hf_gpt2(depth=1)
    converted = revcompile.convert(model, ids)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(type(t).__name__) or t, lambda t: t):
        converted(ids, attention_mask=torch.ones_like(ids))  # a new variant: traced here
    assert len(converted.reversible_variants) == 2
    assert "FakeTensor" not in seen
