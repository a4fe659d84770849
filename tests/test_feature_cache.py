"""The feature cache's storage: 16-bit states in a memory-mapped file, and one build shared by DDP ranks."""

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from recbole_st2si.data.windows import tile_windows
from recbole_st2si.distributed import distributed_settings, spawn_ranks
from recbole_st2si.feature_cache import CacheFiles, StatesLayout, load_or_compute, read_cache, store_states
from recbole_st2si.model import ST2SI
from recbole_st2si.quick_start import run_rank, run_recbole_st2si
from recbole_st2si.safe_io import load_checked

from .conftest import DATA_DIR, without_colours
from .test_cli import ROOT, parse_test_results
from .test_distributed import free_port
from .test_ilp_tuning import build, ilp_config, ilp_settings


def rss_anon_bytes():
    """This process's anonymous resident memory (heap, not file pages), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_stored_states_are_the_float32_pass_rounded_to_bfloat16(make_config, tmp_path):
    """Each window and prompt encoded on its own (batches of one, as the reference runs them): the
    stored states are bitwise the float32 states rounded to bfloat16, two bytes each in the file."""
    config = ilp_config(make_config, tmp_path, feature_cache_storage="bf16", feature_batch_tokens=1)
    model, loaders = build(config)
    sequences = loaders[0].windows.sequences
    features = load_or_compute(config, model, sequences)
    (states_file,) = (tmp_path / "cache").glob("*.states")
    rows = len(features.history) + len(features.alignment)
    assert features.history.dtype == torch.bfloat16 and states_file.stat().st_size == rows * 32 * 2
    model.eval()
    with torch.no_grad():
        for user in range(len(sequences.uid)):  # every tiny history fits one window of 50 items
            history = sequences.items[sequences.offsets[user] : sequences.offsets[user + 1]]
            states, _ = model.query_states(history[None, :-1], torch.tensor([len(history) - 1]))
            cached = features.history[sequences.transition_index(user, torch.arange(1, len(history)))]
            assert torch.equal(cached, states[0].to(torch.bfloat16))
        for item in range(1, model.n_items):
            states, _ = model.query_states(torch.tensor([[model.prompt_item_id, item]]), torch.tensor([2]))
            assert torch.equal(features.alignment[item - 1], states[0, 1].to(torch.bfloat16))


def test_the_cache_is_mapped_from_its_file_when_built_and_when_reused(make_config, tmp_path):
    config = ilp_config(make_config, tmp_path, feature_cache_storage="bf16")
    model, loaders = build(config)
    sequences = loaders[0].windows.sequences
    built = load_or_compute(config, model, sequences)
    (states_file,) = (tmp_path / "cache").glob("*.states")
    assert str(states_file) in Path("/proc/self/maps").read_text()
    del built
    assert str(states_file) not in Path("/proc/self/maps").read_text()
    reused = load_or_compute(config, model, sequences)
    assert str(states_file) in Path("/proc/self/maps").read_text() and reused.history.dtype == torch.bfloat16


def test_reading_every_state_of_a_cache_takes_no_anonymous_memory_of_its_size(tmp_path):
    """138 MB of states (the width of SmolLM2-135M) written and read back through the cache's writer
    and reader: the pages are the file's, so anonymous memory grows by far less than the file."""
    layout = StatesLayout(history=120_000, alignment=10, hidden=576, storage="bf16", trained_layers=0)
    files = CacheFiles.named(tmp_path, "large")
    generator = torch.Generator().manual_seed(0)

    def fill(path):
        for rows in layout.map(path, writable=True).history.split(1024):
            rows.copy_(torch.randn(rows.shape, generator=generator))

    store_states(files, layout, fill)
    before = rss_anon_bytes()
    features = read_cache(files, layout)
    total = sum(float(rows.float().abs().sum()) for rows in features.history.split(1024))
    grown = rss_anon_bytes() - before
    assert total > 0.7 * layout.history * layout.hidden  # E|x| of a normal: 0.8, so every row was read
    assert grown < layout.num_bytes / 4, f"anonymous memory grew by {grown} bytes for a {layout.num_bytes}-byte file"


def test_training_on_bfloat16_states_gives_the_float32_states_metrics(settings, tmp_path):
    """The same float32 pass, its states stored in bfloat16 or float32. The states differ by the
    rounding (relative 2^-9) and the trained ILPs by a little more, which may move a test user's item
    by a place among near-tied scores: no item enters or leaves a top 10 (hit, recall equal); MRR and
    NDCG stay within half a user's move from first to second place (on the tiny data: one user moved
    one place lower down, 0.0028 in MRR@10)."""
    results = {}
    for storage in ("bf16", "fp32"):
        entries = ilp_settings(tmp_path, feature_cache_storage=storage, epochs=60, ilp_learning_rate=0.05,
                               warmup_steps=0, gradient_accumulation_steps=1, stopping_step=60, eval_step=60)
        results[storage] = run_recbole_st2si("ST2SI", "tiny", config_dict=settings(**entries))
    test_users = results["bf16"]["dataset_statistics"]["users"] - 1
    for name in ("best_valid_result", "test_result"):
        bf16, fp32 = results["bf16"][name], results["fp32"][name]
        assert bf16["hit@10"] == fp32["hit@10"] and bf16["recall@10"] == fp32["recall@10"]
        assert bf16 == pytest.approx(fp32, abs=0.5 / test_users)
    assert results["bf16"]["test_result"]["hit@10"] >= 0.6  # it learned (see test_ilp_tuning)
    assert len(list((tmp_path / "cache").glob("*.states"))) == 2  # the storage is part of the key


# --- one build shared by the DDP ranks ------------------------------------------------------------


def recording_encoded_windows(record_file):
    """Make ST2SI's frozen pass record every sequence it encodes (its items), into ``record_file``
    when the process's run ends."""
    encoded = []
    frozen_states = ST2SI.frozen_states

    def recording(model, item_seq, item_seq_len, decoder=None):
        encoded.extend(row[:length] for row, length in zip(item_seq.tolist(), item_seq_len.tolist()))
        return frozen_states(model, item_seq, item_seq_len, decoder)

    ST2SI.frozen_states = recording
    return lambda: Path(record_file).write_text(json.dumps(encoded))


def recording_rank(local_rank, record_dir, *run_rank_args):
    """``run_rank``, recording the sequences this rank ran through the backbone."""
    save = recording_encoded_windows(Path(record_dir, f"rank{local_rank}.json"))
    result = run_rank(local_rank, *run_rank_args)
    save()
    return result


def test_two_gloo_processes_build_the_cache_of_one_process_each_encoding_its_share(settings, make_config, tmp_path):
    entries = ilp_settings(tmp_path, feature_cache_dir=str(tmp_path / "ddp"), feature_cache_dtype="auto",
                           feature_cache_storage="bf16", feature_batch_tokens=100)
    distributed = {**settings(**entries), **distributed_settings(nproc=2, port=free_port())}
    result = spawn_ranks(recording_rank, 2, str(tmp_path), "ST2SI", "tiny", None, distributed, True)
    encoded = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    config = make_config(**{**entries, "feature_cache_dir": str(tmp_path / "single")})
    model, loaders = build(config)
    sequences = loaders[0].windows.sequences
    load_or_compute(config, model, sequences)
    (ddp_states,) = (tmp_path / "ddp").glob("*.states")
    single_states = tmp_path / "single" / ddp_states.name
    assert ddp_states.read_bytes() == single_states.read_bytes()
    assert load_checked(ddp_states.with_suffix(".pt")) == load_checked(single_states.with_suffix(".pt"))

    users, starts, ends = tile_windows(sequences, model.segment_len, model.max_seq_length, model.max_seq_tokens)
    windows = [sequences.items[sequences.offsets[u] + s : sequences.offsets[u] + e].tolist()
               for u, s, e in zip(users.tolist(), starts.tolist(), ends.tolist())]
    prompts = [[model.prompt_item_id, item] for item in range(1, model.n_items)]
    assert Counter(map(tuple, encoded[0] + encoded[1])) == Counter(map(tuple, windows + prompts)), "each once"
    # rank r encodes batches r, r + 2, ... of 4 sequences, of the windows and then of the prompts
    assert abs(len(encoded[0]) - len(encoded[1])) <= 2 * 4 and min(map(len, encoded)) > 0

    again = spawn_ranks(recording_rank, 2, str(tmp_path), "ST2SI", "tiny", None, distributed, True)
    assert [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)] == [[], []], "reused"
    assert again["test_result"] == result["test_result"]


def test_two_runs_started_together_on_one_cache_folder_build_it_once(tiny_backbone_dir, tmp_path):
    """Two independent processes race for the same cache: the file lock lets one encode while the
    other waits and then reads its file, so both train and test on the same states."""
    cache = tmp_path / "cache"
    command = [sys.executable, str(ROOT / "run_recbole_st2si.py"), "--model=ST2SI", "--dataset=tiny",
               f"--data_path={DATA_DIR}", f"--llm_path={tiny_backbone_dir}", "--train_stage=ilp",
               f"--feature_cache_dir={cache}", "--epochs=1", "--show_progress=False"]
    runs = []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        with open(folder / "output.log", "w") as output:  # a file, not a pipe that a waiting run could fill
            process = subprocess.Popen([*command, f"--checkpoint_dir={folder}"], cwd=folder, stdout=output,
                                       stderr=subprocess.STDOUT, text=True)
        runs.append((process, folder / "output.log"))
    logs = []
    for process, log in runs:
        assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
        logs.append(without_colours(log.read_text()))
    built = ["feature cache: encoding" in log for log in logs]
    reused = ["feature cache: reusing" in log for log in logs]
    assert sorted(built) == [False, True] and reused == [not flag for flag in built]
    assert parse_test_results(logs[0]) == parse_test_results(logs[1])
    assert len(list(cache.glob("*.states"))) == 1 and len(list(cache.glob("*.pt"))) == 1


HOLD_THE_LOCK = """
import sys
from recbole_st2si.feature_cache import CacheFiles, holding
files = CacheFiles.named(sys.argv[1], sys.argv[2])
with open(files.lock, "a+") as lock, holding(lock, files):
    print("holding", flush=True)
    sys.stdin.read()
"""


def test_a_run_waiting_for_another_process_on_the_cache_says_once_whom_it_waits_for(make_config, tmp_path, caplog):
    config = ilp_config(make_config, tmp_path)
    model, loaders = build(config)
    sequences = loaders[0].windows.sequences
    load_or_compute(config, model, sequences)
    (states_file,) = (tmp_path / "cache").glob("*.states")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(states_file.parent), states_file.stem],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        waiting = f"feature cache: process {holder.pid} on {socket.gethostname()} is building or checking {states_file}; waiting for it"
        with caplog.at_level(logging.INFO):
            reader = threading.Thread(target=load_or_compute, args=(config, model, sequences))
            reader.start()
            deadline = time.monotonic() + 60
            while waiting not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            assert reader.is_alive(), "it waits while the other process holds the lock"
            holder.stdin.close()
            holder.wait(timeout=60)
            reader.join(timeout=60)
        assert not reader.is_alive() and caplog.text.count(waiting) == 1
        assert f"reusing {states_file}" in caplog.text
    finally:
        holder.kill()
        holder.wait()
