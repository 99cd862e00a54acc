"""A conversion spares the cycle collector the process's older objects, and leaves its freeze state as it was."""

from __future__ import annotations

import gc

import pytest
import torch

import revcompile
from revcompile.collector import collector_spared
from revcompile.reference import example_inputs, reference_vit


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    model = reference_vit(depth=2, dim=32, heads=2, img_size=16, patch_size=4, num_classes=5)
    return model, example_inputs(model, 2)


def test_objects_alive_before_are_frozen_inside_and_handed_back_after():
    older = [object() for _ in range(3)]  # noqa: F841 (kept alive on purpose)
    assert gc.get_freeze_count() == 0
    with collector_spared():
        assert gc.get_freeze_count() > 0
        inside = gc.get_freeze_count()
        with collector_spared():  # nested (convert calls plan_memory): the outer freeze stands
            assert gc.get_freeze_count() == inside
        assert gc.get_freeze_count() == inside
    assert gc.get_freeze_count() == 0


def test_garbage_made_inside_is_still_collected():
    class Cycle:
        pass

    with collector_spared():
        a, b = Cycle(), Cycle()
        a.other, b.other = b, a
        del a, b
        assert gc.collect() >= 2


def test_convert_leaves_no_freeze_behind(tiny_vit):
    model, args = tiny_vit
    converted = revcompile.convert(model, args)
    assert gc.get_freeze_count() == 0
    converted(*args).sum().backward()


def test_a_process_that_froze_objects_keeps_its_freeze(tiny_vit):
    model, args = tiny_vit
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        revcompile.convert(model, args)
        assert gc.get_freeze_count() == frozen  # not unfrozen by revcompile
    finally:
        gc.unfreeze()


def test_a_disabled_collector_stays_disabled_and_unfrozen(tiny_vit):
    model, args = tiny_vit
    gc.disable()
    try:
        revcompile.convert(model, args)
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()
