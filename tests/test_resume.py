"""An interrupted run, resumed, ends exactly as the same run without the interruption."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from recbole.model.sequential_recommender import SASRec

from recbole_st2si.model import ST2SI
from recbole_st2si.quick_start import run_recbole_st2si
from recbole_st2si.run_files import RunFiles
from recbole_st2si.trainer import SafeCheckpointMixin, get_trainer
from recbole_st2si.utils import create_config, create_dataset, data_preparation

from .conftest import DATA_DIR
from .test_cli import ROOT, parse_test_results

MODELS = {"ST2SI": ST2SI, "SASRec": SASRec}


class Interrupted(Exception):
    """Stands for a kill in the middle of an epoch."""


def count_or_interrupt(monkeypatch, model_class, interrupt_after=None):
    """Count the training batches of ``model_class``; with ``interrupt_after``, the next one fails
    as a kill would stop it."""
    original = model_class.calculate_loss
    calls = {"count": 0}

    def calculate_loss(self, interaction):
        calls["count"] += 1
        if interrupt_after is not None and calls["count"] > interrupt_after:
            raise Interrupted
        return original(self, interaction)

    monkeypatch.setattr(model_class, "calculate_loss", calculate_loss)
    return calls


def record_final_weights(monkeypatch):
    """The weights at the end of training, before the best checkpoint is reloaded for the test."""
    final = {}
    original = SafeCheckpointMixin.fit

    def fit(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        final.update({name: tensor.clone() for name, tensor in self.model.state_dict().items()})
        return result

    monkeypatch.setattr(SafeCheckpointMixin, "fit", fit)
    return final


def run_settings(settings, model):
    entries = settings(epochs=4, stopping_step=10, seed=3)
    if model == "ST2SI":  # random windows and a warm-up plus cosine schedule over every epoch
        entries.update(train_window="random", warmup_steps=2, learning_rate=1e-3)
    else:
        entries.update(hidden_size=16, inner_size=32, n_layers=1, n_heads=1, train_batch_size=64, learning_rate=1e-2)
        del entries["llm_path"], entries["train_stage"]
    return entries


@pytest.mark.parametrize("model", ["ST2SI", "SASRec"])
def test_a_run_interrupted_mid_epoch_and_resumed_ends_with_the_uninterrupted_weights(model, settings, tmp_path, monkeypatch):
    entries = run_settings(settings, model)
    final = record_final_weights(monkeypatch)
    with monkeypatch.context() as patch:
        calls = count_or_interrupt(patch, MODELS[model])
        uninterrupted = run_recbole_st2si(model, "tiny", config_dict=entries, checkpoint_file=tmp_path / "whole.pth")
    expected_weights = dict(final)
    epochs = len(uninterrupted["trainer"].train_loss_dict)
    assert epochs == 4
    batches_per_epoch = calls["count"] // epochs
    assert batches_per_epoch >= 2

    checkpoint = tmp_path / "interrupted.pth"
    with monkeypatch.context() as patch:  # killed in the middle of the third epoch
        count_or_interrupt(patch, MODELS[model], interrupt_after=2 * batches_per_epoch + batches_per_epoch // 2)
        with pytest.raises(Interrupted):
            run_recbole_st2si(model, "tiny", config_dict=entries, checkpoint_file=checkpoint)
    assert RunFiles.of(checkpoint).resume.is_file()

    final.clear()
    resumed = run_recbole_st2si(model, "tiny", config_dict=entries, checkpoint_file=checkpoint, resume=True)
    trainer = resumed["trainer"]
    assert trainer.start_epoch == 2, "resumed from the start of the interrupted epoch"
    assert trainer.train_loss_dict == uninterrupted["trainer"].train_loss_dict
    assert set(final) == set(expected_weights)
    for name, tensor in expected_weights.items():
        assert torch.equal(final[name], tensor), name
    assert resumed["test_result"] == uninterrupted["test_result"]
    assert not RunFiles.of(checkpoint).resume.exists(), "a finished run keeps only its best checkpoint"


def run_cli(*args, cwd):
    command = [sys.executable, str(ROOT / "run_recbole_st2si.py"), "--model=SASRec", "--dataset=tiny",
               f"--data_path={DATA_DIR}", "--show_progress=False", "--stopping_step=1000", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def checkpoint_test_result(checkpoint):
    """The test metrics of a SASRec checkpoint of :func:`run_cli`'s settings, evaluated in this process."""
    config = create_config("SASRec", "tiny", config_dict={
        "data_path": str(DATA_DIR), "show_progress": False, "checkpoint_dir": str(Path(checkpoint).parent),
    })
    _, _, test_data = data_preparation(config, create_dataset(config))
    model = SASRec(config, test_data.dataset)
    result = get_trainer(config["MODEL_TYPE"], "SASRec")(config, model).evaluate(test_data, model_file=checkpoint)
    return {name: float(value) for name, value in result.items()}


def test_the_command_line_resumes_a_killed_run(tmp_path):
    checkpoint = tmp_path / "run.pth"
    command = [sys.executable, str(ROOT / "run_recbole_st2si.py"), "--model=SASRec", "--dataset=tiny",
               f"--data_path={DATA_DIR}", "--show_progress=False", "--stopping_step=1000", "--epochs=1000",
               f"--checkpoint_file={checkpoint}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not RunFiles.of(checkpoint).resume.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert RunFiles.of(checkpoint).resume.is_file(), "the killed run saved its training state"

    refused = run_cli(f"--checkpoint_file={checkpoint}", "--epochs=1000", cwd=tmp_path)
    assert refused.returncode == 2 and "exists: pass --resume" in refused.stderr

    epoch = torch.load(RunFiles.of(checkpoint).resume, weights_only=True)["epoch"]
    resumed = run_cli(f"--checkpoint_file={checkpoint}", "--resume", f"--epochs={epoch + 3}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resume training from epoch {epoch + 1}, from its latest training state" in resumed.stdout + resumed.stderr
    assert parse_test_results(resumed.stdout) == checkpoint_test_result(checkpoint)
    assert not RunFiles.of(checkpoint).resume.exists()


