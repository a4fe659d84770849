"""The side-by-side benchmark: real runs on the tiny dataset, resumability, crashes, mismatches,
bad input, and the aggregation into table and CSV."""

import ast
import csv
import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

from recbole_st2si import benchmark, run_records
from recbole_st2si.errors import UserInputError

from .conftest import without_colours

DATA_DIR = Path(__file__).parent / "data"

SMALL_S3REC = ["--S3Rec.item_attribute=brand", "--S3Rec.hidden_size=8", "--S3Rec.inner_size=16", "--S3Rec.n_layers=1"]



@pytest.fixture(scope="module")
def common(tiny_backbone_dir, tmp_path_factory):
    """Settings of every real run: the tiny dataset, the tiny backbone, one epoch."""
    cache = tmp_path_factory.mktemp("feature_cache")
    return [
        "--dataset=tiny",
        f"--data_path={DATA_DIR}",
        f"--llm_path={tiny_backbone_dir}",
        f"--feature_cache_dir={cache}",
        "--epochs=1",
        "--s3rec_pretrain_epochs=1",
    ]


def logged_test_result(log_file):
    """The test metrics of a run's log: RecBole's last ``test result`` line (S3Rec's pre-training
    states one first), its colour codes removed."""
    text = without_colours(log_file.read_text())
    stated = re.findall(r"test result\s*: (\{.*\})", text)
    assert stated, text[-2000:]
    return ast.literal_eval(stated[-1])


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, common):
    """ST2SI, S3Rec (pre-training + fine-tuning) and a GRU4Rec that crashes on a bad setting."""
    output = tmp_path_factory.mktemp("benchmark")
    argv = [*common, "--models=ST2SI,S3Rec,GRU4Rec", f"--output_dir={output}", *SMALL_S3REC]
    argv.append("--GRU4Rec.embedding_size=-1")
    status = benchmark.main(argv)
    return status, output / "tiny"


def test_runs_every_model_and_writes_the_report(first_run):
    status, results = first_run
    assert status == 1  # GRU4Rec failed
    rows = {row["model"]: row for row in read_csv(results / "results.csv")}
    assert list(rows) == ["ST2SI-ilp", "S3Rec", "GRU4Rec"]
    for name in ("ST2SI-ilp", "S3Rec"):
        assert rows[name]["status"] == "ok"
        assert float(rows[name]["train_time_s_mean"]) > 0 and rows[name]["epochs_mean"] == "1"
        assert 0 < int(rows[name]["params_trainable"]) <= int(rows[name]["params_total"])
        record = json.loads((results / "runs" / f"{name}-seed2020.json").read_text())
        logged = logged_test_result(results / "runs" / f"{name}-seed2020.log")
        assert record["status"] == "ok" and record["test_result"] == logged
        assert float(rows[name]["ndcg@10_mean"]) == pytest.approx(logged["ndcg@10"], abs=5e-7)  # the CSV's 6 places
        assert (results / "configs" / f"{name}.yaml").is_file()
    # ST2SI on CPU trains only its item linear projection
    assert int(rows["ST2SI-ilp"]["params_trainable"]) < int(rows["ST2SI-ilp"]["params_total"])
    s3rec = json.loads((results / "runs" / "S3Rec-seed2020.json").read_text())
    assert s3rec["pretrain_epochs"] == 1 and s3rec["config"]["train_stage"] == "finetune"
    readme = (results / "README.md").read_text()
    assert "| ST2SI-ilp |" in readme and "| S3Rec |" in readme and "python -m recbole_st2si.benchmark" in readme
    assert (results / "ndcg_recall.png").stat().st_size > 0
    assert not any((results / "saved").iterdir())  # checkpoints are removed after each run


def test_crashed_model_is_reported_with_its_log(first_run):
    _, results = first_run
    row = {row["model"]: row for row in read_csv(results / "results.csv")}["GRU4Rec"]
    assert row["status"] == "failed" and row["failed_logs"] == "runs/GRU4Rec-seed2020.log"
    record = json.loads((results / "runs" / "GRU4Rec-seed2020.json").read_text())
    assert record["status"] == "failed" and record["returncode"] != 0
    assert "embedding_size must be an integer >= 1, got -1" in record["log_tail"]
    assert "embedding_size must be an integer >= 1" in (results / "runs" / "GRU4Rec-seed2020.log").read_text()
    assert "| GRU4Rec |" in (results / "README.md").read_text()


def test_second_invocation_skips_finished_runs(first_run, common, capsys):
    _, results = first_run
    before = {path.name: path.read_text() for path in (results / "runs").glob("*.json")}
    argv = [*common, "--models=ST2SI,S3Rec", f"--output_dir={results.parent}", *SMALL_S3REC]
    assert benchmark.main(argv) == 0
    output = capsys.readouterr().out
    assert output.count("finished before, skipped") == 2 and "running" not in output
    assert {path.name: path.read_text() for path in (results / "runs").glob("*.json")} == before
    assert [row["model"] for row in read_csv(results / "results.csv")] == ["ST2SI-ilp", "S3Rec"]


def test_s3rec_pretraining_is_reused_by_a_run_that_did_not_finish(common, tmp_path):
    argv = [*common, "--models=S3Rec", "--keep_checkpoints", *SMALL_S3REC]
    assert benchmark.main([*argv, f"--output_dir={tmp_path / 'first'}"]) == 0
    (tmp_path / "first").rename(tmp_path / "moved")  # e.g. to continue on another machine
    argv.append(f"--output_dir={tmp_path / 'moved'}")
    runs = tmp_path / "moved" / "tiny" / "runs"
    first = json.loads((runs / "S3Rec-seed2020.json").read_text())
    (runs / "S3Rec-seed2020.json").unlink()  # as if fine-tuning had been interrupted
    assert benchmark.main(argv) == 0
    assert "S3Rec pre-training: reusing" in (runs / "S3Rec-seed2020.log").read_text()
    pretrained = torch.load(next((runs.parent / "saved").glob("S3Rec-seed2020/S3Rec-*.pth")), weights_only=True)
    assert "optimizer" not in pretrained  # weights only, which fine-tuning loads on any device
    assert {tensor.device.type for tensor in pretrained["state_dict"].values()} == {"cpu"}
    resumed = json.loads((runs / "S3Rec-seed2020.json").read_text())
    assert resumed["pretrain_time_s"] == first["pretrain_time_s"]
    assert resumed["total_time_s"] > resumed["pretrain_time_s"]  # the reused pre-training counts
    assert benchmark.main([*argv, "--rerun"]) == 0
    assert "reusing" not in (runs / "S3Rec-seed2020.log").read_text()


def test_mismatched_evaluation_is_caught(first_run, common, tmp_path, capsys):
    _, results = first_run
    shutil.copytree(results / "runs", tmp_path / "tiny" / "runs")
    argv = [*common, "--models=ST2SI,S3Rec", f"--output_dir={tmp_path}", *SMALL_S3REC]
    argv.append("--ST2SI.MAX_ITEM_LIST_LENGTH=20")
    assert benchmark.main(argv) == 1
    captured = capsys.readouterr()
    assert "S3Rec-seed2020: finished before, skipped" in captured.out  # only ST2SI ran again
    assert "MAX_ITEM_LIST_LENGTH: 20 (ST2SI-ilp-seed2020) vs 50 (S3Rec-seed2020)" in captured.err
    assert not (tmp_path / "tiny" / "README.md").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--models="], "--models is empty"),
        (["--models=SASRec,NoSuchRec"], "unknown model 'NoSuchRec'"),
        (["--models=SASRec", "--seeds=one"], "--seeds must be integers"),
        (["--models=ST2SI", "--st2si_stages=ilp,huge"], "--st2si_stages must be"),
        (["--models=SASRec", "--GRU4Rec.epochs=1"], "names no model or variant"),
        (["--models=SASRec", "--seed=3"], "use --seeds"),
        (["--models=SASRec", "epochs"], "settings are given as --key=value"),
        (["--models=SASRec", "--config_files=missing.yaml"], "config file not found"),
        (["--models=SASRec", "--jobs=0"], "--jobs must be at least 1"),
    ],
)
def test_bad_input_exits_with_status_2(arguments, message, tmp_path, capsys):
    assert benchmark.main([*arguments, f"--output_dir={tmp_path}"]) == 2
    assert message in capsys.readouterr().err


def test_unwritable_output_dir_exits_with_status_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert benchmark.main(["--models=SASRec", f"--output_dir={blocker}"]) == 2
    assert "cannot write to the output directory" in capsys.readouterr().err


def test_ablation_and_stages_plan_one_row_per_variant():
    variants = benchmark.plan_variants(["ST2SI", "SASRec"], ["ilp", "full"], ablation=True)
    names = [variant.name for variant in variants]
    assert names[:4] == ["ST2SI-ilp", "ST2SI-ilp-wo-multi-query", "ST2SI-ilp-wo-id-alignment", "ST2SI-ilp-wo-both"]
    assert len(names) == 9 and names[-1] == "SASRec"
    assert variants[3].settings == {"train_stage": "ilp", "id_embedding": False, "multi_query": False, "id_alignment": False}
    assert variants[4].settings == {"train_stage": "full", "id_embedding": False}


def test_a_model_can_run_its_own_seeds(tmp_path):
    argv = ["--models=ST2SI,GRU4Rec", "--st2si_stages=ilp", "--seeds=1,2,3", "--GRU4Rec.seeds=7", f"--output_dir={tmp_path}"]
    requests = benchmark.make_plan(argv)[3]
    assert [(request["variant"], request["seed"]) for request in requests] == [
        ("ST2SI-ilp", 1), ("ST2SI-ilp", 2), ("ST2SI-ilp", 3), ("GRU4Rec", 7)
    ]
    assert all("seeds" not in request["config_dict"] for request in requests)
    with pytest.raises(benchmark.UserInputError, match="--GRU4Rec.seeds must be integers"):
        benchmark.make_plan([*argv, "--GRU4Rec.seeds=x"])


def test_jobs_run_side_by_side_and_keep_the_order(tmp_path, monkeypatch):
    """Each run waits at a barrier for the other: only runs under way at once get past it."""
    barrier, worker_envs = threading.Barrier(2, timeout=30), []

    def launch(request, results_dir, result_file, checkpoint_dir, keep_checkpoints, worker_env=None, keep_head=False):
        barrier.wait()
        worker_envs.append(worker_env)
        return {"status": "ok", "request": request}

    monkeypatch.setattr(benchmark, "launch", launch)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv = ["--models=SASRec,GRU4Rec", "--jobs=2", f"--output_dir={tmp_path}"]
    args, _, results_dir, requests = benchmark.make_plan(argv)
    records = benchmark.run_all(requests, results_dir, args)
    assert [record["request"]["variant"] for record in records] == ["SASRec", "GRU4Rec"]
    threads = str(max(1, run_records.usable_cores() // 2))
    assert [env["OMP_NUM_THREADS"] for env in worker_envs] == [threads, threads]


def test_side_by_side_progress_lines_stay_whole(tmp_path, monkeypatch):
    """Lines written by concurrent runs must not run together: each is written in one piece."""
    writes = []
    recorder = type("Recorder", (), {"write": writes.append, "flush": lambda self: None})
    monkeypatch.setattr(benchmark.sys, "stdout", recorder())
    argv = ["--models=SASRec,GRU4Rec", "--jobs=2", f"--output_dir={tmp_path}"]
    args, _, results_dir, requests = benchmark.make_plan(argv)
    for request in requests:
        record_file = results_dir / "runs" / f"{benchmark.run_name(request)}.json"
        run_records.write_json({"status": "ok", "request": request}, record_file)
    benchmark.run_all(requests, results_dir, args)
    skipped = "finished before, skipped (--rerun runs it again)"
    assert sorted(writes) == [f"GRU4Rec-seed2020: {skipped}\n", f"SASRec-seed2020: {skipped}\n"]


def fake_run(variant, seed, ndcg, status="ok", **evaluation):
    """A run record as the worker writes it, with only what the report reads."""
    request = {"variant": variant, "seed": seed}
    if status != "ok":
        return {"status": status, "request": request, "log": f"{variant}-seed{seed}.log"}
    return {
        "status": "ok",
        "request": request,
        "test_result": {"ndcg@10": ndcg, "recall@10": 2 * ndcg, "mrr@10": ndcg / 2, "hit@10": 2 * ndcg},
        "best_valid_score": ndcg,
        "valid_score_bigger": True,
        "train_time_s": 10.0 * seed,
        "total_time_s": 20.0 * seed,
        "epoch_time_s": 4.0 * seed,
        "epochs": seed,
        "params_trainable": 100,
        "params_total": 1000,
        "evaluation": {"topk": [10], "users": 31, **evaluation},
        "config": {"seed": seed, "ndcg": ndcg, "epochs": 100},
        "hardware": "CPU: test",
        "device": "cpu",
    }


def test_aggregation_into_table_csv_and_configs(tmp_path):
    records = [
        fake_run("SASRec", 1, 0.1),
        fake_run("SASRec", 2, 0.3),
        fake_run("GRU4Rec", 1, 0.2),
        fake_run("GRU4Rec", 2, None, status="failed"),
        fake_run("BERT4Rec", 1, None, status="failed"),
    ]
    protocol = benchmark.PROTOCOLS["full"]
    rows = benchmark.write_report(tmp_path, records, protocol, "python -m recbole_st2si.benchmark", "tiny")

    table = {row["model"]: row for row in read_csv(tmp_path / "results.csv")}
    assert list(table) == ["SASRec", "GRU4Rec", "BERT4Rec"]
    assert float(table["SASRec"]["ndcg@10_mean"]) == pytest.approx(0.2)
    assert float(table["SASRec"]["ndcg@10_std"]) == pytest.approx(0.141421, abs=1e-6)  # sample std
    assert float(table["SASRec"]["recall@10_mean"]) == pytest.approx(0.4)
    assert float(table["SASRec"]["train_time_s_mean"]) == pytest.approx(15.0)
    assert table["SASRec"]["params_total"] == "1000" and table["SASRec"]["seeds"] == "1 2"
    assert table["GRU4Rec"]["status"] == "partly failed" and table["GRU4Rec"]["ndcg@10_std"] == ""
    assert table["GRU4Rec"]["failed_logs"] == "runs/GRU4Rec-seed2.log"
    assert table["BERT4Rec"]["status"] == "failed" and table["BERT4Rec"]["ndcg@10_mean"] == ""
    assert rows[0]["seeds_ok"] == 2

    readme = (tmp_path / "README.md").read_text()
    sasrec = "| SASRec | 0.2000 ± 0.1414 | 0.4000 ± 0.2828 | 0.1000 ± 0.0707 | 0.4000 ± 0.2828 | 15 ± 7 | 30 ± 14 | 6.0 ± 2.8 | 1.5 ± 0.7 |"
    assert table["SASRec"]["device"] == "cpu"
    assert sasrec in readme
    assert "| BERT4Rec | – | – |" in readme and "partly failed (runs/GRU4Rec-seed2.log)" in readme
    # the configuration kept is the seed with the best validation score
    assert "seed: 2" in (tmp_path / "configs" / "SASRec.yaml").read_text()
    assert not (tmp_path / "configs" / "BERT4Rec.yaml").exists()
    assert (tmp_path / "ndcg_recall.png").is_file()


def test_times_are_averaged_only_over_runs_on_one_machine(tmp_path):
    on_gpu = {**fake_run("SASRec", 2, 0.3), "hardware": "GPU: test", "device": "cuda"}
    records = [fake_run("SASRec", 1, 0.1), on_gpu, fake_run("GRU4Rec", 1, 0.2), fake_run("GRU4Rec", 2, 0.2)]
    sasrec, gru4rec = benchmark.write_report(tmp_path, records, benchmark.PROTOCOLS["full"], "command", "tiny")
    assert sasrec["ndcg@10_mean"] == pytest.approx(0.2) and sasrec["epochs_mean"] == pytest.approx(1.5)
    assert sasrec["train_time_s_mean"] is None and sasrec["total_time_s_mean"] is None
    assert sasrec["device"] == "cpu cuda" and gru4rec["train_time_s_mean"] == pytest.approx(15.0)
    readme = (tmp_path / "README.md").read_text()
    assert "| 0.4000 ± 0.2828 | – | – | – | 1.5 ± 0.7 |" in readme
    assert "No time for SASRec: its runs, or one run's resumed attempts, trained on" in readme


def test_a_run_resumed_on_another_machine_shows_no_time(tmp_path):
    moved = {**fake_run("S3Rec", 1, 0.3), "hardware": f"GPU: test{run_records.ATTEMPTS_SEPARATOR}CPU: test"}
    stayed = [{**fake_run("SASRec", seed, 0.1), "hardware": "CPU: test; GPU: none"} for seed in (1, 2)]
    s3rec, sasrec = benchmark.write_report(tmp_path, [moved, *stayed], benchmark.PROTOCOLS["full"], "command", "tiny")
    assert s3rec["ndcg@10_mean"] == pytest.approx(0.3) and s3rec["epochs_mean"] == pytest.approx(1.0)
    assert s3rec["train_time_s_mean"] is None and s3rec["total_time_s_mean"] is None
    assert sasrec["train_time_s_mean"] == pytest.approx(15.0)


def test_runs_ended_by_the_epoch_limit_are_named(tmp_path):
    at_limit = fake_run("FDSA", 10, 0.3)
    at_limit["config"]["epochs"] = 10
    records = [at_limit, fake_run("SASRec", 1, 0.1)]
    benchmark.write_report(tmp_path, records, benchmark.PROTOCOLS["full"], "command", "tiny")
    readme = (tmp_path / "README.md").read_text()
    assert "which ended them before early stopping could" in readme
    assert "could (more epochs\nmight score higher): FDSA-seed10 (10 epochs).\n" in readme


def test_uni19_report_shows_hit_at_1_with_its_spread_over_seeds(tmp_path):
    records = [fake_run("ST2SI-ilp", seed, 0.5) for seed in (1, 2)]
    for record, hit in zip(records, (0.25, 0.35)):
        record["test_result"].update({"hit@1": hit, "hit@5": 0.7, "ndcg@5": 0.5})
    benchmark.write_report(tmp_path, records, benchmark.PROTOCOLS["uni19"], "python -m recbole_st2si.benchmark", "tiny")
    row = read_csv(tmp_path / "results.csv")[0]
    assert float(row["hit@1_mean"]) == pytest.approx(0.3) and float(row["hit@1_std"]) == pytest.approx(0.070711, abs=1e-6)
    readme = (tmp_path / "README.md").read_text()
    assert "the target among 19 sampled negatives" in readme and "| ST2SI-ilp | 0.3000 ± 0.0707 |" in readme
    assert (tmp_path / "hit1_ndcg.png").is_file()


def test_comparability_check_names_the_differing_setting():
    same = [fake_run("SASRec", 1, 0.1), fake_run("GRU4Rec", 1, 0.2), fake_run("BERT4Rec", 1, None, status="failed")]
    benchmark.check_comparable(same)
    different = [fake_run("SASRec", 1, 0.1), fake_run("GRU4Rec", 1, 0.2, eval_mode="uni19")]
    expected = r'eval_mode: null \(SASRec-seed1\) vs "uni19" \(GRU4Rec-seed1\)'
    with pytest.raises(benchmark.ComparabilityError, match=expected):
        benchmark.check_comparable(different)


def test_a_benchmark_whose_only_run_failed_links_no_chart(tmp_path):
    rows = benchmark.write_report(tmp_path, [fake_run("SASRec", 1, 0.1, status="failed")], benchmark.PROTOCOLS["full"],
                                  "python -m recbole_st2si.benchmark", "tiny")
    assert rows[0]["status"] == "failed"
    assert ".png" not in (tmp_path / "README.md").read_text() and not list(tmp_path.glob("*.png"))


def test_versions_are_reported_without_git(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(benchmark.subprocess, "run", no_git)
    versions = benchmark.library_versions()
    assert versions["recbole"] == "1.2.1" and "recbole-st2si commit" not in versions


def test_an_interrupted_run_resumes_from_its_best_checkpoint(common, tmp_path):
    argv = [*common, "--models=GRU4Rec", f"--output_dir={tmp_path}", "--keep_checkpoints"]
    runs, saved = tmp_path / "tiny" / "runs", tmp_path / "tiny" / "saved" / "GRU4Rec-seed2020"
    assert benchmark.main(argv) == 0
    first = json.loads((runs / "GRU4Rec-seed2020.json").read_text())
    time_to_epoch_0 = json.loads((saved / "training.json").read_text())["elapsed_s_by_epoch"]["0"]
    (runs / "GRU4Rec-seed2020.json").unlink()  # as if the run had been interrupted after its best epoch
    marker = json.loads((saved / "training.json").read_text())
    assert marker["hardware_by_attempt"] == [first["hardware"]]
    marker["hardware_by_attempt"] = ["the machine that was lent"]  # as if the first attempt trained elsewhere
    (saved / "training.json").write_text(json.dumps(marker))
    assert benchmark.main(argv) == 0
    log = (runs / "GRU4Rec-seed2020.log").read_text()
    first_attempt, resumed_attempt = log.split("resuming from the checkpoint of epoch 0")
    assert "epoch 0 training" in first_attempt and "epoch 0 training" not in resumed_attempt
    resumed = json.loads((runs / "GRU4Rec-seed2020.json").read_text())
    assert resumed["hardware"] == f"the machine that was lent; then {first['hardware']}"
    assert first["resumed_from_epoch"] is None and resumed["resumed_from_epoch"] == 0
    assert resumed["test_result"] == first["test_result"] and resumed["epochs"] == first["epochs"] == 1
    assert resumed["best_valid_result"] == first["best_valid_result"]
    assert resumed["train_time_s"] >= time_to_epoch_0 > 0 and resumed["total_time_s"] >= time_to_epoch_0
    assert "GRU4Rec-seed2020 from its epoch-0 checkpoint" in (tmp_path / "tiny" / "README.md").read_text()


def test_a_changed_request_starts_over_where_an_interrupted_run_left_its_checkpoint(common, tmp_path):
    argv = [*common, "--models=GRU4Rec", f"--output_dir={tmp_path}", "--keep_checkpoints"]
    runs = tmp_path / "tiny" / "runs"
    assert benchmark.main(argv) == 0
    (runs / "GRU4Rec-seed2020.json").unlink()  # interrupted, then asked for with another setting
    assert benchmark.main([*argv, "--GRU4Rec.embedding_size=8"]) == 0
    record = json.loads((runs / "GRU4Rec-seed2020.json").read_text())
    assert record["status"] == "ok" and record["resumed_from_epoch"] is None
    assert record["config"]["embedding_size"] == 8
    assert "starting over: the checkpoint in" in (runs / "GRU4Rec-seed2020.log").read_text()


@pytest.mark.parametrize("text,rows", [
    ("ilp,top2,top2+id", {"ST2SI-ilp": {"train_stage": "ilp", "id_embedding": False},
                          "ST2SI-top2": {"train_stage": "top", "top_layers": 2, "id_embedding": False},
                          "ST2SI-top2+id": {"train_stage": "top", "top_layers": 2, "id_embedding": True}}),
    ("ilp+id", {"ST2SI-ilp+id": {"train_stage": "ilp", "id_embedding": True}}),
])
def test_stage_rows_name_their_settings(text, rows):
    variants = benchmark.plan_variants(["ST2SI"], benchmark.parse_stages(text, ["ST2SI"]), ablation=False)
    assert {variant.name: variant.settings for variant in variants} == rows


def test_a_stage_can_start_from_the_head_of_another():
    stages = benchmark.parse_stages("ilp+id,top2+id@ilp+id", ["ST2SI"])
    variants = benchmark.plan_variants(["ST2SI"], stages, ablation=True)
    warm = {variant.name: variant for variant in variants if variant.starts_from}
    assert warm["ST2SI-top2+id@ilp+id"].settings == {"train_stage": "top", "top_layers": 2, "id_embedding": True}
    assert warm["ST2SI-top2+id@ilp+id"].starts_from == "ST2SI-ilp+id"
    assert warm["ST2SI-top2+id@ilp+id-wo-both"].starts_from == "ST2SI-ilp+id-wo-both"  # the same ablation


def test_a_warm_start_needs_its_source_with_the_same_seed(tmp_path):
    argv = ["--models=ST2SI", "--st2si_stages=ilp,top1@ilp", "--ST2SI-top1@ilp.seeds=5", f"--output_dir={tmp_path}"]
    with pytest.raises(UserInputError, match="ST2SI-top1@ilp-seed5 starts from ST2SI-ilp-seed5, which this plan"):
        benchmark.make_plan(argv)


def test_a_warm_stage_starts_from_its_source_head_and_reruns_with_it(common, tmp_path, capsys):
    """With nothing learnt (rates 1e-12), the warm run's model is its source's: the same scores."""
    frozen = [f"--ST2SI-top1+id@ilp+id.{rate}=1e-12" for rate in ("learning_rate", "ilp_learning_rate")]
    argv = [*common, "--models=ST2SI", "--st2si_stages=ilp+id,top1+id@ilp+id", f"--output_dir={tmp_path}", *frozen]
    assert benchmark.main(argv) == 0
    runs = tmp_path / "tiny" / "runs"
    source = json.loads((runs / "ST2SI-ilp+id-seed2020.json").read_text())
    warm = json.loads((runs / "ST2SI-top1+id@ilp+id-seed2020.json").read_text())
    head = tmp_path / "tiny" / "saved" / "ST2SI-ilp+id-seed2020" / "model-ilp.pth"
    assert sorted(path.name for path in (tmp_path / "tiny" / "saved").rglob("*") if path.is_file()) == [head.name]
    assert warm["request"]["config_dict"]["ilp_checkpoint"] == str(head)
    assert warm["request"]["source_finished_at"] == source["finished_at"]
    assert warm["test_result"]["ndcg@10"] == pytest.approx(source["test_result"]["ndcg@10"], abs=1e-3)
    assert torch.load(head, weights_only=True)["item_embedding"].abs().sum() > 0  # trained, not the zero start

    capsys.readouterr()
    assert benchmark.main(argv) == 0
    assert capsys.readouterr().out.count("finished before, skipped") == 2
    head.unlink()  # a source without its head runs again, and so does the run that starts from it
    assert benchmark.main(argv) == 0
    output = capsys.readouterr().out
    assert "without keeping its head" in output and "skipped" not in output
    rerun = json.loads((runs / "ST2SI-top1+id@ilp+id-seed2020.json").read_text())
    assert rerun["finished_at"] != warm["finished_at"] and head.is_file()


@pytest.mark.parametrize("text", ["ilp2", "top+ids", "fast", "", "full,top-2", "top2@ilp", "ilp,top2@ilp@ilp"])
def test_unknown_stage_rows_are_refused(text):
    with pytest.raises(UserInputError, match="--st2si_stages must be comma-separated stages"):
        benchmark.parse_stages(text, ["ST2SI"])
