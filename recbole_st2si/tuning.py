"""Hyperparameter tuning on Ray Tune: RecBole hyper files, one RecBole run per trial, ASHA stopping.

RecBole's own ``run_hyper`` runs its trials one after another in one process. Here every trial is a
:func:`~recbole_st2si.quick_start.run_recbole_st2si` run in a Ray worker, so trials spread over the
CPUs and GPUs of a local Ray instance or of a cluster, and each validation score goes to Ray as soon
as it is known, so that an ASHA scheduler can stop poor trials early. The results are written as a
table sorted by the validation metric and the best configuration as a YAML file that
``run_recbole_st2si.py --config_files=...`` accepts.
"""

import ast
import contextlib
import csv
import math
import os
import shutil
import sys
import time
import types
from dataclasses import dataclass
from functools import partial
from logging import getLogger
from pathlib import Path
from unittest import mock

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.sample import Categorical
from recbole.trainer import HyperTuning

from recbole_st2si.errors import UserInputError
from recbole_st2si.quick_start import run_recbole_st2si
from recbole_st2si.safe_io import atomic_file, write_text
from recbole_st2si.utils import create_config

VALID_SCORE = "valid_score"  # what each trial reports to Ray, and the scheduler's metric
EPOCH = "epoch"  # the scheduler's clock: epochs trained so far
TEST_PREFIX = "test_"
TRIAL_CHECKPOINTS = "saved"  # each trial's checkpoint folder, inside its Ray trial folder
HYPER_FORMAT = (
    "each line is `name type values`, e.g. `learning_rate choice [0.01,0.001]`, "
    "`dropout_prob uniform 0.1,0.5`, `n_layers quniform 1,3,1`, "
    "`learning_rate loguniform -9.2,-4.6` (bounds of the natural log)"
)
MAX_RAY_TEMP_DIR = 40  # Ray's Unix sockets live below its temp dir; socket paths must stay < 108 bytes


class TuningFailed(RuntimeError):
    """No trial finished a validation epoch (the table is written all the same)."""


@dataclass
class Study:
    """What every trial shares, and what the outputs are about."""

    model: str
    dataset: str
    config_files: list
    overrides: dict
    param_names: list
    valid_column: str  # ``valid_`` + RecBole's valid_metric
    bigger: bool = True  # RecBole's valid_metric_bigger
    epochs: int = 1
    command: str | None = None


def load_search_space(params_file):
    """A RecBole hyper file as a Ray Tune search space, parsed by RecBole's own parser.

    RecBole's parser builds hyperopt's ``hp`` expressions; it is handed an ``hp`` that builds the
    equivalent Ray Tune domains instead, so the file means exactly what it means to RecBole.
    """
    path = Path(params_file)
    if not path.is_file():
        raise UserInputError(f"params file not found: {params_file}")
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip() and len(line.strip().split(" ")) < 3:  # RecBole would skip it silently
            raise UserInputError(f"{params_file}, line {number}: malformed line {line.strip()!r}: {HYPER_FORMAT}")
    try:
        with mock.patch.dict(sys.modules, {"hyperopt": _hyperopt_building_ray_domains()}):
            space = HyperTuning._build_space_from_file(str(path))
    except (ValueError, TypeError, SyntaxError, NameError) as error:
        raise UserInputError(f"malformed hyper file {params_file}: {error}; {HYPER_FORMAT}") from None
    if not space:
        raise UserInputError(f"{params_file} names no parameter: {HYPER_FORMAT}")
    return space


def _without_fixed(space, overrides, params_file):
    """The space less the parameters fixed by ``overrides``: as in RecBole, the command line wins."""
    fixed = sorted(set(space) & set(overrides))
    if fixed:
        getLogger(__name__).warning(f"not tuned, fixed by the command line: {', '.join(fixed)}")
    space = {name: domain for name, domain in space.items() if name not in overrides}
    if not space:
        raise UserInputError(f"every parameter of {params_file} is fixed by a --key=value setting")
    return space


def _hyperopt_building_ray_domains():
    """A stand-in ``hyperopt`` module whose ``hp`` returns Ray Tune domains."""
    module = types.ModuleType("hyperopt")
    module.hp = types.SimpleNamespace(
        choice=lambda name, options: tune.choice(options),
        uniform=lambda name, low, high: tune.uniform(low, high),
        quniform=_quniform,
        loguniform=lambda name, low, high: tune.loguniform(math.exp(low), math.exp(high)),
    )
    return module


def _quniform(name, low, high, q):
    """hyperopt's ``quniform``; with integer bounds and step it yields ints, so ``n_layers`` works."""
    if all(float(value).is_integer() for value in (low, high, q)):
        return tune.qrandint(int(low), int(high), int(q))
    return tune.quniform(low, high, q)


def parse_value(text):
    """A setting's text typed as RecBole types it: a Python literal, ``true``/``false``, or the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(text.lower(), text)


def run_tuning(
    model,
    dataset,
    params_file,
    config_file_list=None,
    overrides=None,
    *,
    num_samples=None,
    search="random",
    scheduler="asha",
    grace_period=1,
    cpus_per_trial=1,
    gpus_per_trial=None,
    num_cpus=None,
    ray_address=None,
    output_dir="tuning",
    keep_checkpoints=False,
    command=None,
):
    """Tune ``model`` on ``dataset`` over the space of ``params_file``; one RecBole run per trial.

    Args:
        config_file_list, overrides: YAML files and settings shared by every trial.
        num_samples: trials drawn from the space (``search="random"``, default 10), or runs of every
            combination of the ``choice`` parameters (``search="grid"``, default 1).
        scheduler: ``asha`` stops poor trials early (after ``grace_period`` epochs at least), ``fifo``
            runs every trial to its end.
        gpus_per_trial: default 1 when the Ray cluster has GPUs, else 0; fractions share a GPU.
        num_cpus, ray_address: CPUs of the local Ray instance started here, or the address of a
            running cluster to join (``auto``). A Ray already initialized in this process is used.
        output_dir: gets ``results.csv``, ``README.md``, ``best.yaml`` and Ray's trial folders.

    Returns:
        list[dict]: one row per trial, best first.
    """
    _check_options(grace_period, gpus_per_trial)
    space = _without_fixed(load_search_space(params_file), overrides or {}, params_file)
    study = _study(model, dataset, list(space), config_file_list, overrides, command)
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    started_ray = _connect_ray(ray_address, num_cpus, output_dir)
    try:
        resources = _trial_resources(cpus_per_trial, gpus_per_trial, check_cpus=started_ray and not ray_address)
        experiment = f"{model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        trainable = partial(
            _run_trial,
            study=study,
            workdir=os.getcwd(),
            experiment_dir=str(output_dir / "ray_results" / experiment),
            keep_checkpoints=keep_checkpoints,
        )
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            param_space=grid_space(space) if search == "grid" else space,
            tune_config=tune.TuneConfig(
                metric=VALID_SCORE,
                mode="max" if study.bigger else "min",
                num_samples=num_samples or (1 if search == "grid" else 10),
                scheduler=_scheduler(scheduler, grace_period, study.epochs),
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(
                name=experiment,
                storage_path=str(output_dir / "ray_results"),
                log_to_file=True,
                verbose=1,
            ),
        )
        results = tuner.fit()
        if not keep_checkpoints:  # those of the trials the scheduler stopped
            for result in results:
                shutil.rmtree(Path(result.path) / TRIAL_CHECKPOINTS, ignore_errors=True)
    finally:
        if started_ray:
            ray.shutdown()
    rows = collect_rows(results, study.param_names, study.valid_column, study.bigger)
    if not write_outputs(rows, output_dir, study):
        raise TuningFailed(f"no trial finished a validation epoch; see {output_dir / 'README.md'} and the trial logs")
    return rows


def _check_options(grace_period, gpus_per_trial):
    """Refuse what cannot work before anything starts."""
    if grace_period < 1:
        raise UserInputError(f"grace_period must be at least 1 epoch, got {grace_period}")
    if gpus_per_trial is not None and gpus_per_trial > 1:
        raise UserInputError(
            "gpus_per_trial above 1: a trial is one process on one GPU; "
            "train on several GPUs with run_recbole_st2si.py --nproc=N instead"
        )


def _study(model, dataset, param_names, config_file_list, overrides, command):
    """The settings every trial shares, checked by building RecBole's config once before Ray starts."""
    config_files = [os.path.abspath(path) for path in config_file_list or []]
    overrides = dict(overrides or {})
    with _cuda_devices_kept():
        config = create_config(model, dataset, config_files, overrides)
    valid_column = f"valid_{config['valid_metric'].lower()}"
    bigger, epochs = config["valid_metric_bigger"], config["epochs"]
    return Study(model, dataset, config_files, overrides, param_names, valid_column, bigger, epochs, command)


@contextlib.contextmanager
def _cuda_devices_kept():
    """RecBole's Config sets ``CUDA_VISIBLE_DEVICES``; Ray must still see every GPU of this machine
    when it starts."""
    cuda_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        yield
    finally:
        if cuda_devices is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda_devices


def _connect_ray(address, num_cpus, output_dir):
    """Join the cluster at ``address`` or start a private local Ray; False if Ray was already up."""
    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address)
        except ConnectionError:
            raise UserInputError(
                f"cannot join the Ray cluster at {address}: no Ray {ray.__version__} head answers there, or it "
                "uses token authentication (then set RAY_AUTH_MODE=token and give this machine the cluster's "
                "token, ~/.ray/auth_token or RAY_AUTH_TOKEN); see docs/tuning.md"
            ) from None
    else:
        ray.init(  # the trials' output goes to their folders, not to this console
            num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _temp_dir=_ray_temp_dir(output_dir)
        )
    return True


def _ray_temp_dir(output_dir):
    """Ray's session files (logs, sockets) below the output folder; Ray's own /tmp/ray where that
    path is too long for Unix sockets."""
    folder = output_dir / "ray_tmp"
    return str(folder) if len(str(folder)) <= MAX_RAY_TEMP_DIR else None


def _trial_resources(cpus_per_trial, gpus_per_trial, check_cpus):
    """What each trial asks of Ray; a trial that can never fit would otherwise wait forever."""
    cluster = ray.cluster_resources()
    if gpus_per_trial is None:
        gpus_per_trial = 1 if cluster.get("GPU", 0) > 0 else 0
    if check_cpus and cpus_per_trial > cluster.get("CPU", 0):
        raise UserInputError(f"cpus_per_trial={cpus_per_trial} but the local Ray has {cluster.get('CPU', 0):g} CPUs")
    return {"cpu": cpus_per_trial, "gpu": gpus_per_trial}


def grid_space(space):
    """Every combination of the ``choice`` parameters; the others are still sampled."""
    return {
        name: tune.grid_search(domain.categories) if isinstance(domain, Categorical) else domain
        for name, domain in space.items()
    }


def _scheduler(name, grace_period, epochs):
    """ASHA on the epoch clock, with its rungs before the last epoch, or FIFO.

    A trial ASHA stops is never tested, so no rung may sit at the last epoch: ``max_t`` is one epoch
    short and ``stop_last_trials`` off, and every trial that trains to its end is tested.
    """
    if name == "fifo" or epochs <= grace_period:  # nothing ASHA could stop
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=EPOCH, max_t=epochs - 1, grace_period=grace_period, reduction_factor=2, stop_last_trials=False
    )


def _run_trial(params, study, workdir, experiment_dir, keep_checkpoints):
    """One trial: a RecBole run that reports each validation score, then its test result, to Ray.

    Its checkpoints go to its folder under ``experiment_dir`` (Ray's trial folder, named by the trial
    id), not to Ray's per-node working directory, so that the driver can remove them when they are
    not kept, including those of the trials the scheduler stopped.
    """
    if os.path.isdir(workdir):
        os.chdir(workdir)  # relative paths (data, feature cache) mean what they mean to the driver
    checkpoint_dir = Path(experiment_dir) / tune.get_context().get_trial_id() / TRIAL_CHECKPOINTS
    config_dict = {
        "show_progress": False,
        **study.overrides,
        **params,
        "checkpoint_dir": str(checkpoint_dir),
        "gpu_id": ",".join(str(gpu) for gpu in ray.get_gpu_ids()),  # RecBole would pick GPU 0 itself
    }
    epochs_done = 0

    def report_validation(epoch_idx, valid_score):
        nonlocal epochs_done
        epochs_done = epoch_idx + 1
        tune.report({VALID_SCORE: float(valid_score), EPOCH: epochs_done})

    result = run_recbole_st2si(
        study.model, study.dataset, study.config_files, config_dict, callback_fn=report_validation
    )
    if not keep_checkpoints:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    test = {f"{TEST_PREFIX}{metric}": float(value) for metric, value in (result["test_result"] or {}).items()}
    tune.report({VALID_SCORE: float(result["best_valid_score"]), EPOCH: epochs_done, **test})


def collect_rows(results, param_names, valid_column, bigger):
    """One row per trial (status, parameters, best validation score, test metrics), best first.

    A trial that the scheduler stopped never reached its test: its status says ``stopped early``.
    """
    rows = [_row(result, param_names, valid_column, bigger) for result in results]
    return sorted(rows, key=lambda row: _ranking_key(row[valid_column], bigger))


def _row(result, param_names, valid_column, bigger):
    """A trial's row; its best validation score over all its reports, not its last."""
    metrics = result.metrics or {}
    history = result.metrics_dataframe
    scores = [] if history is None or VALID_SCORE not in history else history[VALID_SCORE].dropna().tolist()
    test = {key: value for key, value in metrics.items() if key.startswith(TEST_PREFIX)}
    if result.error:
        status = "error"
    else:
        status = "completed" if test else "stopped early"
    row = {
        "trial": metrics.get("trial_id") or Path(result.path).name,
        "status": status,
        "epochs": metrics.get(EPOCH, 0),
    }
    row.update({name: _plain((result.config or {}).get(name)) for name in param_names})
    row[valid_column] = (max if bigger else min)(scores) if scores else None
    row.update(test)
    return row


def _plain(value):
    """Numpy scalars (as Ray samples them) as Python numbers, for CSV and YAML."""
    return value.item() if hasattr(value, "item") else value


def _ranking_key(score, bigger):
    """Best score first; trials without a score (failed early) last."""
    if score is None or math.isnan(score):
        return (1, 0.0)
    return (0, -score if bigger else score)


def write_outputs(rows, output_dir, study):
    """``results.csv`` and ``README.md`` (the table), ``best.yaml`` (fixed settings + best trial);
    False when no trial has a validation score, and so no best configuration."""
    columns = ["rank", *dict.fromkeys(key for row in rows for key in row)]
    ranked = [{"rank": rank, **row} for rank, row in enumerate(rows, start=1)]
    with atomic_file(output_dir / "results.csv", text=True) as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(ranked)
    has_best = bool(rows) and rows[0][study.valid_column] is not None
    rerun = _write_best_yaml(rows[0], len(rows), output_dir, study) if has_best else None
    write_text(output_dir / "README.md", _readme(ranked, columns, study, rerun))
    return has_best


def _as_typed(path):
    """``path`` as a user would type it here: relative to the working directory when under it."""
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else Path(relative).as_posix()


def _write_best_yaml(best, num_trials, output_dir, study):
    """The fixed settings and the best trial's parameters, typed as RecBole types them; returns
    the command that reruns the best configuration."""
    settings = {**study.overrides, **{name: best[name] for name in study.param_names}}
    settings = {key: parse_value(value) if isinstance(value, str) else value for key, value in settings.items()}
    path = output_dir / "best.yaml"
    config_files = ",".join([*study.config_files, _as_typed(path)])
    rerun = f"python run_recbole_st2si.py --model={study.model} --dataset={study.dataset} --config_files={config_files}"
    header = (
        f"# Best of {num_trials} trials tuning {study.model} on {study.dataset}: trial {best['trial']}, "
        f"{study.valid_column} {best[study.valid_column]:.4g}.\n"
        f"# The tuning run's fixed settings, then the trial's parameters. Rerun it with\n#   {rerun}\n"
    )
    write_text(path, header + yaml.safe_dump(settings, sort_keys=False))
    return rerun


def _readme(ranked, columns, study, rerun):
    """The table as Markdown, with what its statuses mean and how to rerun the best trial."""
    statuses = [row["status"] for row in ranked]
    counts = {status: statuses.count(status) for status in ("completed", "stopped early", "error")}
    lines = [f"# Tuning {study.model} on {study.dataset}", ""]
    if study.command:
        lines += [f"`{study.command}`", ""]
    lines += [
        f"{len(ranked)} trials: {counts['completed']} completed, {counts['stopped early']} stopped early by the "
        f"scheduler (never tested: their test cells read `stopped`), {counts['error']} failed; "
        f"best `{study.valid_column}` (best validation score of the trial) first.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in ranked:
        lines.append("| " + " | ".join(_cell(row, column) for column in columns) + " |")
    lines.append("")
    if rerun:
        lines += ["The best configuration is in [`best.yaml`](best.yaml); rerun it with", "", f"    {rerun}", ""]
    lines += [
        "Each trial's folder under `ray_results/` holds its per-epoch results (`progress.csv`); "
        "its console output is in Ray's session folder (docs/tuning.md, Outputs).",
        "",
    ]
    return "\n".join(lines)


def _cell(row, column):
    """A Markdown cell; a stopped trial's missing test result reads ``stopped``, not blank."""
    value = row.get(column)
    if value is None and column.startswith(TEST_PREFIX) and row["status"] == "stopped early":
        return "stopped"
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
