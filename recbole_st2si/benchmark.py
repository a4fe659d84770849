"""Side-by-side benchmark of ST2SI and RecBole's sequential baselines under one evaluation.

    python -m recbole_st2si.benchmark --dataset=ml-100k --models=ST2SI,SASRec,GRU4Rec,BERT4Rec,FDSA,S3Rec

Every model (ST2SI: every train stage and ablation variant) and seed runs in its own subprocess, so a
crash loses one row only; each finished run is written to ``<output_dir>/<dataset>/runs/`` at once
and is not run again unless ``--rerun``; ``--jobs=N`` runs N of them side by side. The table, CSV,
per-model configurations and chart are written to ``<output_dir>/<dataset>/`` (``-uni19`` /
``-ablation`` suffixes for those modes). Any other ``--key=value`` overrides a setting for every
model; ``--Model.key=value`` (or ``--ST2SI-ilp.key=value`` for one variant) for one model only.
See docs/benchmark.md.
"""

import argparse
import csv
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from recbole_st2si.command_line import parse_overrides, split_list
from recbole_st2si.errors import UserInputError
from recbole_st2si.run_records import ATTEMPTS_SEPARATOR, hardware_summary, now, read_json, usable_cores, write_json
from recbole_st2si.safe_io import atomic_file, write_text

DEFAULT_MODELS = ("ST2SI", "SASRec", "GRU4Rec", "BERT4Rec", "FDSA", "S3Rec")
ABLATIONS = {  # the paper's Table 3 rows: variant suffix -> ST2SI settings
    "": {},
    "-wo-multi-query": {"multi_query": False},
    "-wo-id-alignment": {"id_alignment": False},
    "-wo-both": {"multi_query": False, "id_alignment": False},
}
RESERVED_KEYS = {  # settings the benchmark sets itself, with the option that controls them
    "seed": "--seeds",
    "train_stage": "--st2si_stages",
    "pretrain_epochs": "--s3rec_pretrain_epochs",
    "checkpoint_dir": "--output_dir",
}
EFFORT_COLUMNS = ("train_time_s", "total_time_s", "epoch_time_s", "epochs")
TIME_COLUMNS = ("train_time_s", "total_time_s", "epoch_time_s")
METRIC_NAMES = {"ndcg": "NDCG", "recall": "Recall", "mrr": "MRR", "hit": "Hit"}
LOG_TAIL_LINES = 40
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: the candidates ranked, the metrics reported and charted."""

    eval_mode: str
    suffix: str
    columns: tuple
    chart: tuple
    chart_file: str
    settings: dict = field(default_factory=dict)


PROTOCOLS = {
    "full": Protocol(
        "full", "", ("ndcg@10", "recall@10", "mrr@10", "hit@10"), ("ndcg@10", "recall@10"), "ndcg_recall.png"
    ),
    # The paper's Table 9: the target among 19 uniformly sampled negatives, HitRatio@1.
    "uni19": Protocol(
        "uni19",
        "-uni19",
        ("hit@1", "hit@5", "ndcg@5", "hit@10", "ndcg@10", "mrr@10"),
        ("hit@1", "ndcg@10"),
        "hit1_ndcg.png",
        {"metrics": ["Hit", "NDCG", "MRR"], "topk": [1, 5, 10]},
    ),
}


class ComparabilityError(Exception):
    """Runs that were meant to share one evaluation did not."""


@dataclass(frozen=True)
class Variant:
    """One row of the table: a model, or an ST2SI train stage / ablation."""

    name: str
    model: str
    settings: dict = field(default_factory=dict)
    starts_from: str = ""  # the variant whose trained head (ILP, item embedding) this one starts from


# --- command line --------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m recbole_st2si.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --seed=1 must not silently become --seeds=1
    )
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name (default: ml-100k)")
    parser.add_argument(
        "--models", default=None, help=f"comma-separated (default: {','.join(DEFAULT_MODELS)}; ST2SI with --ablation)"
    )
    parser.add_argument("--seeds", default="2020", help="comma-separated seeds; several give mean and std "
                        "(--Model.seeds=... for one model)")
    parser.add_argument("--config_files", default="", help="YAML files for every model, separated by spaces or commas")
    parser.add_argument(
        "--output_dir", default="results", help="results go to <output_dir>/<dataset>[-uni19][-ablation]"
    )
    parser.add_argument("--rerun", action="store_true", help="run again the runs that finished before")
    parser.add_argument("--st2si_stages", default=None, help="ST2SI train stages, one row each: ilp,top2,full,lora, "
                        "any with +id (id_embedding), e.g. ilp,top2,top2+id; stage@other starts from the head that "
                        "the listed stage other trained (same seed), e.g. ilp+id,top2+id@ilp+id "
                        "(default: full on a GPU, ilp on CPU)")
    parser.add_argument("--ablation", action="store_true", help="ST2SI w/o multi-query, w/o ID alignment, w/o both")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="full",
                        help="full: rank every item; uni19: the target among 19 sampled negatives (HitRatio@1)")
    parser.add_argument("--s3rec_pretrain_epochs", type=int, default=10,
                        help="S3Rec pre-training epochs before fine-tuning (default: 10; RecBole's own is 500)")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep <results>/saved/ after each run")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (default: 1); small models share a "
                        "GPU or many cores well, each run gets cores/jobs torch threads unless OMP_NUM_THREADS is set")
    return parser


def scoped_overrides(extra):
    """``--key=value`` for every model and ``--Scope.key=value`` for one model or variant, by scope
    (``""``: every model)."""
    overrides = {}
    for scoped_key, value in parse_overrides(extra).items():
        scope, _, key = scoped_key.rpartition(".")
        if not key:
            raise UserInputError(f"empty setting name in --{scoped_key}={value}")
        if key in RESERVED_KEYS:
            raise UserInputError(f"{key} is set by the benchmark: use {RESERVED_KEYS[key]}")
        overrides.setdefault(scope, {})[key] = value
    return overrides


def parse_models(text, ablation):
    """Requested model names, checked against the plugin's and RecBole's models."""
    from recbole_st2si.utils import get_model  # imports RecBole and transformers: only once the input is read

    if text is None:
        text = "ST2SI" if ablation else ",".join(DEFAULT_MODELS)
    models = list(dict.fromkeys(split_list(text)))
    if not models:
        raise UserInputError("--models is empty: name at least one model, e.g. --models=ST2SI,SASRec")
    for model in models:
        get_model(model)
    return models


def parse_seeds(text, option="--seeds"):
    try:
        seeds = [int(seed) for seed in split_list(text)]
    except ValueError:
        raise UserInputError(f"{option} must be integers separated by commas, got {text!r}") from None
    if not seeds:
        raise UserInputError(f"{option} is empty")
    return list(dict.fromkeys(seeds))


def scoped_seeds(overrides):
    """``--Scope.seeds=...``, taken out of the settings: a costly model can run fewer seeds."""
    return {
        scope: parse_seeds(settings.pop("seeds"), f"--{scope}.seeds")
        for scope, settings in overrides.items()
        if scope and "seeds" in settings
    }


STAGE_VARIANT = re.compile(r"(?P<stage>[a-z]+?)(?P<layers>\d*)(?P<ids>\+id)?")


def stage_settings(name):
    """The settings of a train-stage row: ``ilp``, ``top2`` (``top_layers: 2``), ``ilp+id`` (``id_embedding``);
    of ``top2+id@ilp+id``, those of ``top2+id``."""
    parts = STAGE_VARIANT.fullmatch(name.partition("@")[0]).groupdict()
    settings = {"train_stage": parts["stage"], "id_embedding": bool(parts["ids"])}  # explicit, whatever the default
    if parts["layers"]:
        settings["top_layers"] = int(parts["layers"])
    return settings


def parse_stages(text, models):
    """Train-stage rows of the models that have them (ST2SI): a stage, ``top`` with its layer count
    (``top2``), either with ``+id`` (``id_embedding``), optionally ``@`` another listed stage whose
    trained head it starts from (``top2+id@ilp+id``); by default the stage ``train_stage: auto``
    picks on this machine."""
    from recbole_st2si.model.st2si import auto_train_stage

    staged = [model for model in models if stage_names(model)]
    if not staged:
        return []
    stages = split_list(text) if text is not None else [auto_train_stage("cuda" if torch.cuda.is_available() else "cpu")]
    allowed = [stage for stage in stage_names(staged[0]) if stage != "pretrain"]

    def known(name):
        match = STAGE_VARIANT.fullmatch(name)
        return match and match["stage"] in allowed and (not match["layers"] or match["stage"] == "top")

    def well_formed(name):
        stage, at, source = name.partition("@")
        return known(stage) and (not at or (known(source) and source in stages))

    if not stages or not all(well_formed(stage) for stage in stages):
        raise UserInputError(f"--st2si_stages must be comma-separated stages of {allowed} (top with its layers, "
                             f"e.g. top2; any with +id for id_embedding; stage@other for a stage that starts "
                             f"from the head of another listed stage, e.g. ilp+id,top2+id@ilp+id), got {text!r}")
    return list(dict.fromkeys(stages))


def parse_config_files(text):
    files = split_list(text)
    for name in files:
        if not os.path.isfile(name):
            raise UserInputError(f"config file not found: {name}")
    return [str(Path(name).resolve()) for name in files]


def prepare_output(path):
    """Create the results folder and make sure it can be written, before hours of training."""
    try:
        (path / "runs").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path / "runs"):
            pass
    except OSError as error:
        raise UserInputError(f"cannot write to the output directory {path}: {error.strerror}") from None


# --- planning and running ------------------------------------------------------------------------


def stage_names(model):
    """The train stages a model runs as rows of their own (its class's ``train_stages``), or ()."""
    from recbole_st2si.utils import get_model

    return getattr(get_model(model), "train_stages", ())


def plan_variants(models, stages, ablation):
    """The table's rows: every model, a model with train stages (ST2SI) once per stage (and ablation variant)."""
    ablations = ABLATIONS if ablation else {"": {}}
    variants = []
    for model in models:
        if not stage_names(model):
            variants.append(Variant(model, model))
            continue
        for stage in stages:
            source = stage.partition("@")[2]
            for suffix, settings in ablations.items():
                variants.append(Variant(f"{model}-{stage}{suffix}", model, {**stage_settings(stage), **settings},
                                        starts_from=source and f"{model}-{source}{suffix}"))
    return variants


def check_scopes(overrides, variants):
    names = {variant.model for variant in variants} | {variant.name for variant in variants}
    unknown = sorted(scope for scope in overrides if scope and scope not in names)
    if unknown:
        raise UserInputError(f"--{unknown[0]}.key=value names no model or variant of this run; known: {sorted(names)}")


def build_request(variant, seed, args, protocol, overrides, config_files):
    """Everything that defines one run; a stored run is reused only if its request is identical."""
    config_dict = {
        "show_progress": False,
        **protocol.settings,
        **overrides.get("", {}),
        **overrides.get(variant.model, {}),
        **overrides.get(variant.name, {}),
        **variant.settings,
        "seed": seed,
    }
    request = {
        "variant": variant.name,
        "model": variant.model,
        "dataset": args.dataset,
        "seed": seed,
        "eval_mode": protocol.eval_mode,
        "config_files": config_files,
        "config_dict": config_dict,
    }
    if variant.model == "S3Rec":
        request["s3rec_pretrain_epochs"] = args.s3rec_pretrain_epochs
    if variant.starts_from:  # the head file and the source run's time are added once it has run
        request["starts_from"] = f"{variant.starts_from}-seed{seed}"
    return json.loads(json.dumps(request))  # as it reads back from a run file


def run_name(request):
    return f"{request['variant']}-seed{request['seed']}"


def report_progress(line):
    """One write per line: ``print`` writes the text and its newline apart, and side-by-side runs
    (``--jobs``) then ran their lines together."""
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def head_file(results_dir, name):
    """Where the run ``name`` keeps its trained head (ILP, item embedding) for the runs that start from it."""
    from recbole_st2si.benchmark_worker import CHECKPOINT_NAME
    from recbole_st2si.run_files import RunFiles

    return RunFiles.of(results_dir / "saved" / name / CHECKPOINT_NAME).ilp


def run_or_reuse(request, results_dir, rerun, keep_checkpoints, worker_env=None, keep_head=False):
    """The run's record: read back if it finished before with the same request (and, where a later
    run starts from its head, that head was kept), else run now."""
    result_file = results_dir / "runs" / f"{run_name(request)}.json"
    previous = read_json(result_file)
    if not rerun and previous and previous.get("status") == "ok" and previous.get("request") == request:
        if not keep_head or head_file(results_dir, run_name(request)).is_file():
            report_progress(f"{run_name(request)}: finished before, skipped (--rerun runs it again)")
            return previous
        report_progress(f"{run_name(request)}: finished before without keeping its head, which a later run "
                        "starts from: running it again")
    checkpoint_dir = results_dir / "saved" / run_name(request)
    if rerun:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # a rerun starts over, S3Rec pre-training included
    return launch(request, results_dir, result_file, checkpoint_dir, keep_checkpoints, worker_env, keep_head)


def remove_checkpoints(checkpoint_dir, keep=None):
    """Remove a finished run's checkpoints, all but the file ``keep``."""
    if keep is None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return
    for path in checkpoint_dir.iterdir():
        if path == keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def launch(request, results_dir, result_file, checkpoint_dir, keep_checkpoints, worker_env=None, keep_head=False):
    """Run the worker in a subprocess with a clean command line; a crash becomes a failed record.

    The checkpoints of a failed run stay, so that its finished S3Rec pre-training is reused."""
    name = run_name(request)
    log_file = results_dir / "runs" / f"{name}.log"
    result_file.unlink(missing_ok=True)
    spec = {"request": request, "result_file": str(result_file), "checkpoint_dir": str(checkpoint_dir)}
    report_progress(f"{name}: running (log: {log_file})")
    # an interrupted attempt's log stays, followed by the attempt that resumes it
    with open(log_file, "a" if checkpoint_dir.is_dir() else "w") as log:
        completed = subprocess.run(
            [sys.executable, "-m", "recbole_st2si.benchmark_worker"],
            input=json.dumps(spec),
            text=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=worker_env,
        )
    record = read_json(result_file) if completed.returncode == 0 else None
    if record is not None and not keep_checkpoints:
        remove_checkpoints(checkpoint_dir, keep=head_file(results_dir, name) if keep_head else None)
    if record is None:
        record = failure_record(request, completed.returncode, log_file)
        write_json(record, result_file)
        report_progress(f"{name}: FAILED (exit status {completed.returncode}), see {log_file}")
    else:
        report_progress(f"{name}: done in {record['total_time_s']:.0f} s, test {record['test_result']}")
    return record


def failure_record(request, returncode, log_file):
    lines = log_file.read_text(errors="replace").splitlines()
    return {
        "status": "failed",
        "request": request,
        "returncode": returncode,
        "log": log_file.name,
        "log_tail": "\n".join(lines[-LOG_TAIL_LINES:]),
        "finished_at": now(),
    }


# --- checks and aggregation ----------------------------------------------------------------------


def check_comparable(records):
    """Fail unless every finished run used the same evaluation settings and dataset statistics."""
    finished = [record for record in records if record["status"] == "ok"]
    keys = sorted({key for record in finished for key in record["evaluation"]})
    problems = []
    for key in keys:
        groups = {}
        for record in finished:
            value = json.dumps(record["evaluation"].get(key), sort_keys=True)
            groups.setdefault(value, []).append(run_name(record["request"]))
        if len(groups) > 1:
            described = [f"{value} ({', '.join(names)})" for value, names in groups.items()]
            problems.append(f"{key}: " + " vs ".join(described))
    if problems:
        raise ComparabilityError("runs were not evaluated the same way:\n  " + "\n  ".join(problems))


def value_of(record, column):
    """A test metric (``ndcg@10``) or a measurement (``train_time_s``) of one finished run."""
    return record["test_result"].get(column) if "@" in column else record.get(column)


def mean_std(values):
    """Mean and sample standard deviation (None for a single value) of the values that exist."""
    values = [value for value in values if value is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def trained_on_one_machine(records):
    """Whether every attempt of every run trained on the same machine."""
    machines = {(record["hardware"], record["device"]) for record in records}
    return len(machines) == 1 and ATTEMPTS_SEPARATOR not in next(iter(machines))[0]


def summarize(variant_name, records, columns):
    """One table row from the runs (seeds) of one variant: mean and std of every column."""
    finished = [record for record in records if record["status"] == "ok"]
    if len(finished) == len(records):
        status = "ok"
    else:
        status = "partly failed" if finished else "failed"
    row = {
        "model": variant_name,
        "status": status,
        "seeds": " ".join(str(record["request"]["seed"]) for record in records),
        "seeds_ok": len(finished),
    }
    times_compare = trained_on_one_machine(finished)
    for column in (*columns, *EFFORT_COLUMNS):
        if column in TIME_COLUMNS and not times_compare:
            row[f"{column}_mean"], row[f"{column}_std"] = None, None
            continue
        row[f"{column}_mean"], row[f"{column}_std"] = mean_std([value_of(record, column) for record in finished])
    row["params_trainable"] = finished[0]["params_trainable"] if finished else None
    row["params_total"] = finished[0]["params_total"] if finished else None
    row["device"] = " ".join(sorted({record["device"] for record in finished}))  # runs may come from several machines
    row["failed_logs"] = " ".join(f"runs/{record['log']}" for record in records if record["status"] != "ok")
    return row


def group_by_variant(records):
    groups = {}
    for record in records:
        groups.setdefault(record["request"]["variant"], []).append(record)
    return groups


def csv_columns(columns):
    stats = [f"{column}_{stat}" for column in (*columns, *EFFORT_COLUMNS) for stat in ("mean", "std")]
    return ["model", "status", "seeds", "seeds_ok", *stats, "params_trainable", "params_total", "device", "failed_logs"]


# --- report --------------------------------------------------------------------------------------


def display_name(column):
    metric, _, k = column.partition("@")
    return f"{METRIC_NAMES.get(metric, metric)}@{k}"


def format_cell(row, column, digits):
    mean, std = row[f"{column}_mean"], row[f"{column}_std"]
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(rows, columns):
    header = [
        *(display_name(column) for column in columns),
        "train time (s)",
        "total time (s)",
        "s per epoch",
        "epochs",
        "params (trainable / total)",
        "device",
    ]
    lines = ["| model | " + " | ".join(header) + " | seeds | status |", "|---" * (len(header) + 3) + "|"]
    for row in rows:
        params = f"{row['params_trainable']:,} / {row['params_total']:,}" if row["params_total"] is not None else "–"
        cells = [format_cell(row, column, 4) for column in columns]
        cells += [format_cell(row, "train_time_s", 0), format_cell(row, "total_time_s", 0), format_cell(row, "epoch_time_s", 1),
                  format_cell(row, "epochs", 1), params]
        cells.append(row["device"] or "–")
        status = row["status"] + (f" ({row['failed_logs']})" if row["failed_logs"] else "")
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {row['seeds']} | {status} |")
    return "\n".join(lines)


def library_versions():
    versions = {"python": platform.python_version()}
    for package in ("recbole-st2si", "recbole", "torch", "transformers", "numpy", "pandas"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    try:  # a copy without git (or without its history) just has no commit to report
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    except OSError:
        return versions
    if commit.returncode == 0:
        versions["recbole-st2si commit"] = commit.stdout.strip()
    return versions


def readme_text(rows, records, protocol, command, dataset):
    finished = [record for record in records if record["status"] == "ok"]
    evaluation = finished[0]["evaluation"] if finished else {}
    hardware = sorted({record["hardware"] for record in finished}) or [hardware_summary()]
    versions = ", ".join(f"{name} {version}" for name, version in library_versions().items())
    if protocol.eval_mode == "full":
        mode, candidates = "every item ranked", []
    else:
        mode = f"the target among {protocol.eval_mode[3:]} sampled negatives"
        candidates = ["Negatives are drawn by RecBole's sampler with each run's seed, so the spread over seeds",
                      "includes the spread over candidate sets.", ""]
    times_not_averaged = [row["model"] for row in rows if row["seeds_ok"] and row["train_time_s_mean"] is None]
    resumed_runs = [
        f"{run_name(record['request'])} from its epoch-{record['resumed_from_epoch']} checkpoint"
        for record in finished
        if record.get("resumed_from_epoch") is not None
    ]
    at_epoch_limit = [
        f"{run_name(record['request'])} ({record['epochs']} epochs)"
        for record in finished
        if record["epochs"] >= record["config"]["epochs"]
    ]
    notes = []  # each a paragraph under the table, only where it names something
    if times_not_averaged:
        notes.append(f"No time for {', '.join(times_not_averaged)}: its runs, or one run's resumed attempts, trained on\n"
                     "different machines (each run's JSON in `runs/` has its own times and machines).")
    if resumed_runs:
        notes.append("Resumed after an interruption (the epochs after the checkpoint were trained again; the train\n"
                     f"time includes the interrupted attempt's up to the checkpoint): {', '.join(resumed_runs)}.")
    if at_epoch_limit:
        notes.append("Trained up to the epoch limit, which ended them before early stopping could (more epochs\n"
                     f"might score higher): {', '.join(at_epoch_limit)}.")
    lines = [
        f"# Benchmark on {dataset}: {mode}",
        "",
        f"- command: `{command}`",
        f"- date: {now()}",
        f"- hardware: {'; '.join(hardware)}",
        f"- libraries: {versions}",
        "- shared evaluation (checked identical for every run): "
        + ", ".join(f"{key}={json.dumps(value)}" for key, value in evaluation.items()),
        "",
        "Test results, mean ± sample standard deviation over the seeds. Train time: seconds in training and",
        "validation (S3Rec: pre-training included); epochs: training epochs run (early stopping on the valid metric);",
        "device: where the runs trained (see hardware above); compare times only between runs on one device.",
        "",
        *candidates,
        markdown_table(rows, protocol.columns),
        "",
        *(f"{note}\n" for note in notes),
        "Per-run results and logs: `runs/`; configuration of each model's best run: `configs/`; CSV: `results.csv`.",
        "",
    ]
    if any(row["seeds_ok"] for row in rows):  # the chart is drawn only from finished runs
        lines += [f"![{' and '.join(display_name(column) for column in protocol.chart)}]({protocol.chart_file})", ""]
    return "\n".join(lines)


def plot_chart(rows, protocol, path):
    """Grouped bars of the protocol's two headline metrics, with standard deviations as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = [row for row in rows if row[f"{protocol.chart[0]}_mean"] is not None]
    figure, axes = pyplot.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    width = 0.8 / len(protocol.chart)
    for index, column in enumerate(protocol.chart):
        positions = [position + (index - (len(protocol.chart) - 1) / 2) * width for position in range(len(rows))]
        means = [row[f"{column}_mean"] or 0.0 for row in rows]
        # no bar for a single seed, whose spread is unknown rather than zero
        errors = [math.nan if row[f"{column}_std"] is None else row[f"{column}_std"] for row in rows]
        axes.bar(positions, means, width, yerr=errors, capsize=3, label=display_name(column))
    axes.set_xticks(range(len(rows)), [row["model"] for row in rows], rotation=30, ha="right")
    axes.set_ylabel("test score")
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(protocol.chart), frameon=False)  # clear of the bars
    figure.tight_layout()
    with atomic_file(path) as file:
        figure.savefig(file, dpi=120, format=Path(path).suffix[1:])
    pyplot.close(figure)


def best_run(records):
    """The seed with the best validation score: its configuration is the model's reported one."""
    finished = [record for record in records if record["status"] == "ok"]
    if not finished:
        return None
    return max(finished, key=lambda record: record["best_valid_score"] * (1 if record["valid_score_bigger"] else -1))


def write_report(results_dir, records, protocol, command, dataset):
    """README.md, results.csv, configs/<variant>.yaml and the chart, from the runs' records."""
    import yaml

    groups = group_by_variant(records)
    rows = [summarize(name, group, protocol.columns) for name, group in groups.items()]
    with atomic_file(results_dir / "results.csv", text=True) as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns(protocol.columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: round(value, 6) if isinstance(value, float) else value for key, value in row.items()})
    (results_dir / "configs").mkdir(exist_ok=True)
    for name, group in groups.items():
        best = best_run(group)
        if best:
            write_text(results_dir / "configs" / f"{name}.yaml", yaml.safe_dump(best["config"], sort_keys=True))
    if any(row["seeds_ok"] for row in rows):
        plot_chart(rows, protocol, results_dir / protocol.chart_file)
    write_text(results_dir / "README.md", readme_text(rows, records, protocol, command, dataset))
    return rows


# --- entry point ---------------------------------------------------------------------------------


def make_plan(argv):
    """Read and check the command line; returns the options, output folder and run requests."""
    args, extra = build_parser().parse_known_args(argv)
    overrides = scoped_overrides(extra)
    models = parse_models(args.models, args.ablation)
    stages = parse_stages(args.st2si_stages, models)
    seeds = parse_seeds(args.seeds)
    seeds_by_scope = scoped_seeds(overrides)
    config_files = parse_config_files(args.config_files)
    if args.s3rec_pretrain_epochs < 1:
        raise UserInputError("--s3rec_pretrain_epochs must be at least 1")
    if args.jobs < 1:
        raise UserInputError("--jobs must be at least 1")
    variants = plan_variants(models, stages, args.ablation)
    check_scopes(overrides, variants)
    protocol = PROTOCOLS[args.protocol]
    results_dir = Path(args.output_dir) / f"{args.dataset}{protocol.suffix}{'-ablation' if args.ablation else ''}"
    prepare_output(results_dir)
    requests = [
        build_request(variant, seed, args, protocol, overrides, config_files)
        for variant in variants
        for seed in seeds_by_scope.get(variant.name, seeds_by_scope.get(variant.model, seeds))
    ]
    check_sources(requests)
    return args, protocol, results_dir, requests


def check_sources(requests):
    """Every run that starts from another's head needs that run (the same seed) in this plan."""
    names = {run_name(request) for request in requests}
    for request in requests:
        source = request.get("starts_from")
        if source is not None and source not in names:
            raise UserInputError(f"{run_name(request)} starts from {request['starts_from']}, which this plan does "
                                 f"not run: give both stages the same seeds")


def started_from(request, source, results_dir):
    """``request`` with the head file of its finished source run, and that run's finishing time, so
    that it runs again whenever its source did."""
    config_dict = {**request["config_dict"], "ilp_checkpoint": str(head_file(results_dir, run_name(source["request"])))}
    return {**request, "config_dict": config_dict, "source_finished_at": source["finished_at"]}


def run_all(requests, results_dir, args):
    """Every run's record, in the order of ``requests``; ``args.jobs`` of them at a time, the runs
    that start from another's head after all the others."""
    worker_env = None
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # else each side-by-side run claims every core
        worker_env = {**os.environ, "OMP_NUM_THREADS": str(max(1, usable_cores() // args.jobs))}
    sources = {request["starts_from"] for request in requests if "starts_from" in request}

    def run(request):
        source = records.get(request.get("starts_from"))
        if source is not None and source["status"] != "ok":
            report_progress(f"{run_name(request)}: not run, its source {run_name(source['request'])} failed")
            return {**source, "request": request}
        if source is not None:
            request = started_from(request, source, results_dir)
        keep_head = run_name(request) in sources
        return run_or_reuse(request, results_dir, args.rerun, args.keep_checkpoints, worker_env, keep_head)

    records = {}
    for wave in ([r for r in requests if "starts_from" not in r], [r for r in requests if "starts_from" in r]):
        if args.jobs == 1:
            finished = [run(request) for request in wave]
        else:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                finished = list(pool.map(run, wave))
        records.update((run_name(request), record) for request, record in zip(wave, finished))
    return [records[run_name(request)] for request in requests]


def main(argv=None):
    """Run the benchmark; exit status 0 if every run finished, 1 if one failed or runs disagree,
    2 for unusable input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, protocol, results_dir, requests = make_plan(argv)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        records = run_all(requests, results_dir, args)
        check_comparable(records)
        command = shlex.join(["python", "-m", "recbole_st2si.benchmark", *argv])
        rows = write_report(results_dir, records, protocol, command, args.dataset)
    except ComparabilityError as error:
        print(f"error: {error}\nNo table written; fix the settings and rerun the runs named above.", file=sys.stderr)
        return 1
    except UserInputError as error:  # a full disk, say: the files written before stay intact
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"results: {results_dir / 'README.md'}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
