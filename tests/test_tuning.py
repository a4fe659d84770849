"""Tuning on Ray Tune: RecBole hyper files, trials of ST2SI and SASRec on a local Ray, the outputs."""

import csv
import math
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml
from ray import tune
from ray.tune import Result

from recbole_st2si.tuning import (
    Study,
    collect_rows,
    grid_space,
    load_search_space,
    run_tuning,
    write_outputs,
)
from recbole_st2si.command_line import parse_overrides
from recbole_st2si.utils import create_config

from .test_cli import parse_test_results

DATA_DIR = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent
TEST_METRICS = ["test_recall@10", "test_ndcg@10", "test_mrr@10", "test_hit@10"]


@pytest.fixture
def run_hyper():
    """``run_hyper.py``'s ``main(argv)``."""
    main = runpy.run_path(str(REPO / "run_hyper.py"))["main"]
    return lambda *argv: main(list(argv))


def read_table(output_dir):
    with open(output_dir / "results.csv") as file:
        return list(csv.DictReader(file))


def test_example_hyper_files_read_with_recbole_semantics():
    st2si = load_search_space(REPO / "hyper" / "st2si.hyper")
    assert set(st2si) >= {"learning_rate", "ilp_learning_rate", "train_stage", "query_token", "id_alignment"}
    assert st2si["train_stage"].categories == ["ilp", "full"]
    assert st2si["query_token"].categories == [".", "[Q]"]
    assert math.exp(-11.5) == pytest.approx(st2si["learning_rate"].lower)  # loguniform bounds are natural logs
    sasrec = load_search_space(REPO / "hyper" / "sasrec.hyper")
    assert set(sasrec) >= {"learning_rate", "hidden_size", "n_layers"}
    grid = grid_space(sasrec)  # --search=grid: every combination of the choices, the rest still drawn
    assert grid["hidden_size"] == {"grid_search": [64, 128]} and grid["learning_rate"] is sasrec["learning_rate"]


def test_integer_quniform_yields_ints(tmp_path):
    hyper = tmp_path / "q.hyper"
    hyper.write_text("n_layers quniform 1,3,1\ndropout_prob quniform 0.1,0.5,0.1\n")
    space = load_search_space(hyper)
    assert isinstance(space["n_layers"], tune.search.sample.Integer)
    assert isinstance(space["dropout_prob"].sample(), float)


def test_command_line_settings_are_typed_as_recbole_types_them(settings):
    overrides = parse_overrides(["--epochs=2", "--learning_rate=1e-3", "--query_token=[Q]", "--multi_query=false"])
    config = create_config("ST2SI", "tiny", config_dict={**settings(), **overrides})
    typed = {key: config[key] for key in overrides}
    assert typed == {"epochs": 2, "learning_rate": 0.001, "query_token": "[Q]", "multi_query": False}
    assert type(typed["epochs"]) is int and type(typed["learning_rate"]) is float


@pytest.mark.parametrize(
    "hyper_text, argv, message",
    [
        (None, [], "params file not found"),
        ("learning_rate choice\n", [], "line 1: malformed line"),
        ("learning_rate normal 0,1\n", [], "Illegal param type"),
        ("learning_rate choice [0.1,\n", [], "malformed hyper file"),
        ("learning_rate choice [0.1]\n", ["--model=NoSuchModel"], "unknown model"),
        ("learning_rate choice [0.1]\n", ["stray"], "unrecognized argument"),
        ("learning_rate choice [0.1]\n", ["--gpus_per_trial=2"], "gpus_per_trial above 1"),
        ("learning_rate choice [0.1]\n", ["--learning_rate=0.1"], "every parameter of"),
    ],
)
def test_bad_input_exits_with_status_2_and_a_message(run_hyper, tmp_path, capsys, hyper_text, argv, message):
    hyper = tmp_path / "bad.hyper"
    if hyper_text is not None:
        hyper.write_text(hyper_text)
    with pytest.raises(SystemExit) as stop:
        run_hyper("--dataset=tiny", f"--data_path={DATA_DIR}", f"--params_file={hyper}", *argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error


def test_a_cluster_that_cannot_be_joined_is_one_line(run_hyper, tmp_path, capsys, monkeypatch):
    def refuse(**options):
        raise ConnectionError(f"Failed to connect to Ray cluster at {options['address']}")

    monkeypatch.setattr(ray, "init", refuse)
    hyper = tmp_path / "lr.hyper"
    hyper.write_text("learning_rate choice [0.1]\n")
    with pytest.raises(SystemExit) as stop:
        run_hyper("--dataset=tiny", f"--data_path={DATA_DIR}", f"--params_file={hyper}", "--ray_address=127.0.0.1:1")
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot join the Ray cluster at 127.0.0.1:1") and "RAY_AUTH_MODE=token" in error


def fake_result(trial_id, scores, test=None, error=None):
    history = pd.DataFrame({"valid_score": scores, "epoch": range(1, len(scores) + 1)})
    metrics = {"trial_id": trial_id, "valid_score": scores[-1], "epoch": len(scores), "config": {"learning_rate": 0.01}}
    return Result(
        metrics={**metrics, **(test or {})},
        checkpoint=None,
        error=error,
        path=f"/trials/{trial_id}",
        metrics_dataframe=history,
    )


def test_table_marks_stopped_trials_and_ranks_by_best_valid_score(tmp_path):
    test = {name: 0.5 for name in TEST_METRICS}
    results = [
        fake_result("a", [0.1, 0.3, 0.2], test),
        fake_result("b", [0.05], None),  # stopped by ASHA after one epoch
        fake_result("c", [0.2, 0.4], test),
        fake_result("d", [float("nan")], None, error=RuntimeError("boom")),
    ]
    study = Study("SASRec", "tiny", [], {"epochs": 3}, ["learning_rate"], "valid_ndcg@10")
    rows = collect_rows(results, study.param_names, study.valid_column, bigger=True)
    assert write_outputs(rows, tmp_path, study)

    table = read_table(tmp_path)
    assert [row["trial"] for row in table] == ["c", "a", "b", "d"]  # best valid (not last) decides
    assert [row["status"] for row in table] == ["completed", "completed", "stopped early", "error"]
    assert table[0]["valid_ndcg@10"] == "0.4" and table[2]["test_ndcg@10"] == ""
    readme = (tmp_path / "README.md").read_text()
    assert "| 3 | b | stopped early | 1 | 0.01 | 0.05 | stopped | stopped | stopped | stopped |" in readme
    assert yaml.safe_load((tmp_path / "best.yaml").read_text()) == {"epochs": 3, "learning_rate": 0.01}


def check_outputs(output_dir, model, overrides):
    """Two rows sorted by the validation score, and a best.yaml that RecBole's config accepts."""
    table = read_table(output_dir)
    assert len(table) == 2
    scores = [float(row["valid_ndcg@10"]) for row in table]
    assert scores == sorted(scores, reverse=True)
    assert {row["status"] for row in table} <= {"completed", "stopped early"}
    completed = [row for row in table if row["status"] == "completed"]
    assert completed and all(row[name] for row in completed for name in TEST_METRICS)
    best = yaml.safe_load((output_dir / "best.yaml").read_text())
    assert best.items() >= overrides.items()
    config = create_config(model, "tiny", [str(output_dir / "best.yaml")])
    for name, value in best.items():
        assert config[name] == value or name == "data_path"  # RecBole appends the dataset folder
    stopped = [row for row in table if row["status"] == "stopped early"]
    assert all(row[name] == "" for row in stopped for name in TEST_METRICS)
    return best


def test_st2si_trials_on_a_local_ray(tmp_path):
    hyper = tmp_path / "st2si.hyper"
    hyper.write_text(
        "learning_rate loguniform -9.2,-6.9\ntrain_stage choice ['ilp','full']\nquery_token choice ['.','[Q]']\n"
    )
    overrides = {
        "data_path": str(DATA_DIR),
        "llm_path": "tiny-random",
        "epochs": 2,
        "MAX_ITEM_LIST_LENGTH": 10,
        "feature_cache_dir": str(tmp_path / "cache"),
    }
    options = dict(num_samples=2, num_cpus=2, cpus_per_trial=1, output_dir=tmp_path / "out")
    rows = run_tuning("ST2SI", "tiny", hyper, overrides=overrides, **options)
    assert len(rows) == 2
    best = check_outputs(tmp_path / "out", "ST2SI", overrides)
    assert best["train_stage"] in ("ilp", "full") and best["query_token"] in (".", "[Q]")
    assert not list((tmp_path / "out" / "ray_results").glob("*/*/saved"))  # checkpoints are removed


def test_sasrec_trials_from_the_command_line_and_rerun_of_best_yaml(run_hyper, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "out"
    run_hyper(
        "--model=SASRec",
        "--dataset=tiny",
        f"--params_file={REPO / 'hyper' / 'sasrec.hyper'}",
        "--num_samples=2",
        "--num_cpus=2",
        "--cpus_per_trial=1",
        "--scheduler=fifo",
        f"--output_dir={output_dir}",
        f"--data_path={DATA_DIR}",
        "--epochs=2",
        "--MAX_ITEM_LIST_LENGTH=10",
    )
    assert "best configuration" in capsys.readouterr().out
    check_outputs(output_dir, "SASRec", {"data_path": str(DATA_DIR), "epochs": 2})
    assert {row["status"] for row in read_table(output_dir)} == {"completed"}  # FIFO stops nothing

    rerun = runpy.run_path(str(REPO / "run_recbole_st2si.py"))["main"]
    best = f"--config_files={output_dir / 'best.yaml'}"
    argv = ["--model=SASRec", "--dataset=tiny", best, f"--checkpoint_dir={tmp_path}", "--show_progress=False"]
    monkeypatch.setattr(sys, "argv", ["run_recbole_st2si.py", *argv])
    rerun()
    best_trial = read_table(output_dir)[0]
    printed = {f"test_{name}": value for name, value in parse_test_results(capsys.readouterr().out).items()}
    assert printed == {name: float(best_trial[name]) for name in TEST_METRICS}  # the best trial, run again
