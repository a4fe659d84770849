"""torch.compile where it pays (recbole_st2si.compiling): the same results as the uncompiled modules,
and a run that goes on uncompiled when compiling fails."""

import logging

import pytest
import torch

from recbole_st2si import compiling
from recbole_st2si.compiling import Compiled, compile_wanted
from recbole_st2si.feature_cache import FrozenPass

from .test_ilp_tuning import build, cached_dataloaders
from .test_top_layers import top_config


@pytest.mark.parametrize("setting,tokens,wanted", [
    ("auto", compiling.COMPILE_MIN_TOKENS, True), ("auto", compiling.COMPILE_MIN_TOKENS - 1, False),
    (True, 10, True), (False, 10**9, False),
])
def test_compile_when_asked_or_when_the_work_repays_it(setting, tokens, wanted):
    assert compile_wanted(setting, tokens) is wanted


def test_a_failing_compile_warns_once_and_runs_the_module(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(compiling.torch, "compile", lambda module, dynamic: broken)
    layer = torch.nn.Linear(3, 2)
    compiled, inputs = Compiled(layer), torch.randn(4, 3)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(compiled(inputs), layer(inputs)) and torch.equal(compiled(inputs), layer(inputs))
    assert [record.message for record in caplog.records].count(
        "compiling Linear failed (RuntimeError: no C++ compiler here); it runs uncompiled (compile: False skips the attempt)") == 1
    assert compiled.weight is layer.weight  # the module's attributes, as the module's


@pytest.mark.slow
def test_compiled_top_layers_and_frozen_pass_give_the_uncompiled_results(make_config, tmp_path):
    config = top_config(make_config, tmp_path, mixed_precision="no")
    model, loaders = build(config)
    batch = cached_dataloaders(config, model, *loaders)[0].collate_fn(list(range(20)))
    with torch.no_grad():
        plain = model.calculate_loss(batch)
        model.compile_trained_layers()
        assert torch.allclose(model.calculate_loss(batch), plain, atol=1e-5)
        items, lengths = loaders[0].collate_fn([0, 1, 2])["item_id_list"], torch.tensor([5, 6, 7])
        eager = FrozenPass(model, torch.float32)(items[:, :7], lengths)
        assert torch.allclose(FrozenPass(model, torch.float32, compiled=True)(items[:, :7], lengths), eager, atol=1e-5)
