"""One benchmark run in its own process: ``python -m recbole_st2si.benchmark_worker < spec.json``.

The run's description (the request with its nested settings) comes as one JSON document on stdin. The worker trains and tests one model
through :func:`recbole_st2si.quick_start.run_recbole_st2si` (S3Rec: pre-training, then
fine-tuning), and writes one JSON file with the results, timings, epochs, parameter counts, the
evaluation settings the benchmark compares across runs, and the run's configuration.

Long runs survive interruptions: a run started again with the same request continues from the best
checkpoint its interrupted attempt saved (and reuses S3Rec's finished pre-training).
"""

import json
import sys
import time
from pathlib import Path

import recbole
import yaml

from recbole_st2si.errors import UserInputError
from recbole_st2si.quick_start import run_recbole_st2si
from recbole_st2si.run_records import ATTEMPTS_SEPARATOR, hardware_summary, now, read_json, write_json
from recbole_st2si.safe_io import DamagedFileError, load_checked
from recbole_st2si.run_files import RunFiles
from recbole_st2si.utils import create_config

EVALUATION_KEYS = (
    "eval_args",
    "metrics",
    "topk",
    "valid_metric",
    "MAX_ITEM_LIST_LENGTH",
    "valid_neg_sample_args",
    "test_neg_sample_args",
)
TRAINING_KEYS = ("epochs", "stopping_step", "eval_step", "learning_rate", "train_batch_size", "seed")
PRETRAINED_MARKER = "pretrained.json"
TRAINING_MARKER = "training.json"
CHECKPOINT_NAME = "model.pth"
MACHINE_KEYS = {
    "checkpoint_dir",
    "data_path",
    "feature_cache_dir",
    "pre_model_path",
    "device",
    "gpu_id",
    "show_progress",
    "local_rank",
}


def protocol_settings(request):
    """Switch the evaluation mode (``full`` -> e.g. ``uni19``) while keeping the configured split.

    A ``config_dict`` entry replaces a whole YAML entry, so the mode alone cannot be overridden:
    the merged ``eval_args`` are read from a probe config and only ``mode`` is changed.
    """
    settings = dict(request["config_dict"])
    mode = request["eval_mode"]
    probe = create_config(request["model"], request["dataset"], request["config_files"], settings)
    if set(probe["eval_args"]["mode"].values()) != {mode}:
        settings["eval_args"] = {**probe["eval_args"], "mode": {"valid": mode, "test": mode}}
    return settings


def pretrain_s3rec(request, settings, checkpoint_dir):
    """S3Rec's self-supervised pre-training, which fine-tuning starts from (RecBole runs the two
    stages as two separate runs); returns the checkpoint, the stage's epochs and time, and whether
    an earlier attempt's pre-training was reused.

    The stage is recorded next to its checkpoint, so a run that stops during fine-tuning (a crash,
    an interruption) reuses it when started again with the same request: on a CPU it takes hours.
    The marker names the checkpoint within its folder, so the folder may move to another machine.
    """
    marker = Path(checkpoint_dir) / PRETRAINED_MARKER
    previous = read_json(marker)
    if previous and previous["request"] == request:
        checkpoint = Path(checkpoint_dir) / Path(previous["checkpoint"]).name
        if checkpoint.is_file():
            load_checked(checkpoint)  # RecBole's fine-tuning reads it without checking it
            print(f"S3Rec pre-training: reusing {checkpoint}", flush=True)
            return str(checkpoint), previous["stats"], True
    pretrain = {**settings, "train_stage": "pretrain"}
    result = run_recbole_st2si(request["model"], request["dataset"], request["config_files"], pretrain, saved=False)
    trainer = result["trainer"]
    stats = {"pretrain_epochs": len(trainer.train_loss_dict), "pretrain_time_s": result["train_time_s"]}
    write_json({"request": request, "checkpoint": Path(trainer.saved_model_file).name, "stats": stats}, marker)
    return trainer.saved_model_file, stats, False


class ResumableTraining:
    """The run's checkpoint at a fixed path, and the training time up to each epoch in a marker next
    to it, so that a run started again with the same request resumes instead of starting over.

    A resumed run reports the epochs and training time of its whole course: the interrupted
    attempt's up to the checkpoint's epoch (set-up included), then its own; and the machine of
    each attempt, since an attempt may continue on another machine.
    """

    def __init__(self, request, checkpoint_dir):
        self.request = request
        self.marker = Path(checkpoint_dir) / TRAINING_MARKER
        self.checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME
        previous = read_json(self.marker)
        self.resumed_from_epoch = None
        self.time_before_s = 0.0
        self.elapsed_by_epoch = {}
        self.hardware_by_attempt = [hardware_summary()]
        has_checkpoint = RunFiles.of(self.checkpoint).interrupted()
        if previous and previous["request"] == request and has_checkpoint:
            epoch = RunFiles.of(self.checkpoint).last_finished_epoch()
            if str(epoch) in previous["elapsed_s_by_epoch"]:
                self.resumed_from_epoch = epoch
                self.time_before_s = previous["elapsed_s_by_epoch"][str(epoch)]
                self.elapsed_by_epoch = previous["elapsed_s_by_epoch"]
                self.hardware_by_attempt = previous.get("hardware_by_attempt", []) + self.hardware_by_attempt
                print(f"resuming from the checkpoint of epoch {epoch}: {self.checkpoint}", flush=True)
        if self.resumed_from_epoch is None and has_checkpoint:  # another request's, or nothing to resume
            print(f"starting over: the checkpoint in {self.checkpoint.parent} is not this run's to continue", flush=True)
            RunFiles.of(self.checkpoint).discard_training()
        self.start = time.perf_counter()

    def seconds_per_epoch(self):
        """Mean seconds of a training epoch with its validation, from the second on (the first also
        builds what a run computes once, e.g. ST2SI's feature cache); None below two epochs."""
        elapsed = [self.elapsed_by_epoch[key] for key in sorted(self.elapsed_by_epoch, key=int)]
        return (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1) if len(elapsed) > 1 else None

    def after_validation(self, epoch_idx, valid_score):
        """RecBole's ``callback_fn``: the training time up to this epoch, written down at once."""
        self.elapsed_by_epoch[str(epoch_idx)] = self.time_before_s + time.perf_counter() - self.start
        write_json(
            {
                "request": self.request,
                "elapsed_s_by_epoch": self.elapsed_by_epoch,
                "hardware_by_attempt": self.hardware_by_attempt,
            },
            self.marker,
        )

    def hardware(self):
        """The machines the run trained on, in order, each named once."""
        return ATTEMPTS_SEPARATOR.join(dict.fromkeys(self.hardware_by_attempt))


def plain(value):
    """A JSON/YAML-safe copy of a config value (enums, devices and the like become strings)."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_configuration(config, model_name):
    """The entries that define this run: everything set by the plugin's defaults, a file, the
    benchmark or the user, the model's own hyper-parameters, and the main training settings; no machine paths."""
    model_file = Path(recbole.__file__).parent / "properties" / "model" / f"{model_name}.yaml"
    model_defaults = yaml.safe_load(model_file.read_text()) if model_file.is_file() else {}
    keys = set(config.plugin_config_dict) | set(config.external_config_dict) | set(model_defaults) | set(TRAINING_KEYS) | set(EVALUATION_KEYS)
    return {key: plain(config[key]) for key in sorted(keys - MACHINE_KEYS) if key in config}


def measure(result):
    """Evaluation settings, dataset statistics, size and effort of a finished run."""
    config, model = result["config"], result["trainer"].model
    evaluation = {key: plain(config[key]) for key in EVALUATION_KEYS}
    statistics = result["dataset_statistics"]
    evaluation.update(users=statistics["users"], items=statistics["items"], inters=statistics["inters"])
    return {
        "train_time_s": result["train_time_s"],
        "epochs": max(result["trainer"].train_loss_dict, default=result["trainer"].start_epoch - 1) + 1,
        "params_total": sum(parameter.numel() for parameter in model.parameters()),
        "params_trainable": sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad),
        "evaluation": evaluation,
        "config": run_configuration(config, config["model"]),
        "device": str(config["device"]),
    }


def run(spec):
    """Train and test the run described by ``spec``; returns the result record."""
    request = spec["request"]
    settings = {**protocol_settings(request), "checkpoint_dir": spec["checkpoint_dir"]}
    start = time.perf_counter()
    pretraining, reused_pretraining = {}, False
    if request["model"] == "S3Rec":
        epochs = request["s3rec_pretrain_epochs"]
        settings.update(pretrain_epochs=epochs, save_step=epochs)  # one checkpoint: the last epoch's
        pre_model_path, pretraining, reused_pretraining = pretrain_s3rec(request, settings, spec["checkpoint_dir"])
        settings.update(train_stage="finetune", pre_model_path=pre_model_path)
    training = ResumableTraining(request, spec["checkpoint_dir"])
    result = run_recbole_st2si(
        request["model"],
        request["dataset"],
        request["config_files"],
        settings,
        callback_fn=training.after_validation,
        checkpoint_file=training.checkpoint,
        resume=training.resumed_from_epoch is not None,
    )
    result["train_time_s"] += training.time_before_s
    # what earlier attempts did and this one reused counts as this run's time
    earlier_attempts_s = training.time_before_s + (pretraining["pretrain_time_s"] if reused_pretraining else 0.0)
    record = {
        "status": "ok",
        "request": request,
        "best_valid_score": float(result["best_valid_score"]),
        "valid_score_bigger": bool(result["valid_score_bigger"]),
        "best_valid_result": plain(result["best_valid_result"]),
        "test_result": plain(result["test_result"]),
        **measure(result),
        **pretraining,
        "resumed_from_epoch": training.resumed_from_epoch,
        "epoch_time_s": training.seconds_per_epoch(),
        "total_time_s": time.perf_counter() - start + earlier_attempts_s,
        "hardware": training.hardware(),
        "finished_at": now(),
    }
    record["train_time_s"] += pretraining.get("pretrain_time_s", 0.0)
    return record


def main():
    spec = json.load(sys.stdin)
    try:
        record = run(spec)
    except DamagedFileError as error:
        sys.exit(f"error: {error.path} is damaged ({error.reason}): start this run over with --rerun, or delete it")
    except UserInputError as error:
        sys.exit(f"error: {error}")
    write_json(record, spec["result_file"])


if __name__ == "__main__":
    main()
