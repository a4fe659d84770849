"""DDP training of ST2SI, RecBole's way, on CPU: two gloo processes on the tiny dataset."""

import json
import runpy
import socket
import sys
from pathlib import Path

import pytest

from recbole_st2si.data.dataloader import ST2SITrainDataLoader
from recbole_st2si.distributed import distributed_settings, spawn_ranks
from recbole_st2si.errors import UserInputError
from recbole_st2si import quick_start
from recbole_st2si.quick_start import run_rank, run_recbole_st2si, run_recbole_st2si_distributed

from .conftest import write_domains
from .test_cli import parse_test_results

DATA_DIR = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent


def free_port():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def recording_rank(local_rank, record_dir, *run_rank_args):
    """``run_rank``, recording which training samples this rank's loader was handed."""
    seen = []
    collate = ST2SITrainDataLoader.collate_fn

    def recording_collate(loader, index):
        seen.extend(int(i) for i in index)
        Path(record_dir, "sample_size").write_text(str(loader.sample_size))
        return collate(loader, index)

    ST2SITrainDataLoader.collate_fn = recording_collate
    result = run_rank(local_rank, *run_rank_args)
    Path(record_dir, f"rank{local_rank}.json").write_text(json.dumps(seen))
    return result


def test_two_gloo_processes_split_the_samples_and_gather_the_metrics(tmp_path):
    """Each rank trains on its own half of the samples; with learning rates of 1e-12 (0 is refused)
    both ranks keep rank 0's initial weights (DDP broadcasts them) up to steps of about 1e-12, so the
    metrics gathered over the ranks' halves of the users must equal those of one process evaluating
    every user with the same weights."""
    settings = {
        "data_path": str(DATA_DIR),
        "llm_path": "tiny-random",
        "train_stage": "full",
        "learning_rate": 1e-12,
        "ilp_learning_rate": 1e-12,
        "epochs": 1,
        "MAX_ITEM_LIST_LENGTH": 10,
        "show_progress": False,
        "checkpoint_dir": str(tmp_path / "saved"),
    }
    distributed = {**settings, **distributed_settings(nproc=2, port=free_port())}
    result = spawn_ranks(recording_rank, 2, str(tmp_path), "ST2SI", "tiny", None, distributed, True)

    first, second = (set(json.loads((tmp_path / f"rank{rank}.json").read_text())) for rank in (0, 1))
    assert first and second and not first & second
    assert first | second == set(range(int((tmp_path / "sample_size").read_text())))
    single = run_recbole_st2si("ST2SI", "tiny", config_dict=settings)
    rounding = 2e-4  # both round to 4 places, the distributed run after gathering (11/30 -> 0.3666)
    assert result["test_result"] == pytest.approx(dict(single["test_result"]), abs=rounding)
    assert result["best_valid_result"] == pytest.approx(dict(single["best_valid_result"]), abs=rounding)


def test_command_line_nproc_starts_the_distributed_run(monkeypatch, capsys):
    script = runpy.run_path(str(REPO / "run_recbole_st2si.py"))
    calls = []

    def launch(model, dataset, config_files, config_dict, **options):
        calls.append((model, dataset, config_files, config_dict, options))
        return {"best_valid_result": {"ndcg@10": 0.5}, "test_result": {"ndcg@10": 0.25}}

    monkeypatch.setitem(script["main"].__globals__, "run_recbole_st2si_distributed", launch)
    monkeypatch.setattr(sys, "argv", ["run_recbole_st2si.py", "--dataset=tiny", "--nproc=2", "--port=6000", "--epochs=3"])
    script["main"]()
    options = {"nproc": 2, "world_size": -1, "ip": "localhost", "port": "6000", "offset": 0}
    assert calls == [("ST2SI", "tiny", [], {"epochs": "3"}, options)]
    assert parse_test_results(capsys.readouterr().out) == {"ndcg@10": 0.25}  # what the launcher returned


def test_bad_input_fails_before_any_process_starts():
    with pytest.raises(UserInputError, match="unknown model"):
        run_recbole_st2si_distributed("NoSuchModel", "tiny", config_dict={"data_path": str(DATA_DIR)}, nproc=2)


def test_domains_are_merged_once_before_the_ranks_start(tmp_path, tiny_backbone_dir, monkeypatch):
    write_domains(tmp_path, "Alpha", "Beta")
    started = []
    monkeypatch.setattr(quick_start, "spawn_ranks", lambda rank_fn, nproc, *args: started.append(args))
    settings = {"data_path": str(tmp_path), "llm_path": str(tiny_backbone_dir)}
    run_recbole_st2si_distributed("ST2SI", "Alpha,Beta", config_dict=settings, nproc=2)
    assert started[0][1] == "Alpha+Beta" and (tmp_path / "Alpha+Beta" / "Alpha+Beta.inter").is_file()


def test_torchrun_gets_one_line_pointing_to_nproc(monkeypatch, capsys):
    script = runpy.run_path(str(REPO / "run_recbole_st2si.py"))
    monkeypatch.setitem(script["main"].__globals__, "run_recbole_st2si", pytest.fail)  # nothing may train
    for name, value in {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)  # as torchrun --nproc_per_node=2 sets them
    monkeypatch.setattr(sys, "argv", ["run_recbole_st2si.py", "--dataset=tiny", f"--data_path={DATA_DIR}"])
    with pytest.raises(SystemExit) as stop:
        script["main"]()
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "--nproc=2" in error
