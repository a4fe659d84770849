"""Nothing lost, nothing silently wrong: atomic writes, a full disk, damaged checkpoints and caches."""

import errno
import hashlib
import logging
import os
import socket
import subprocess
import uuid

import pytest
import torch

from recbole_st2si import benchmark, feature_cache, run_files, safe_io
from recbole_st2si.errors import UserInputError
from recbole_st2si.feature_cache import load_or_compute
from recbole_st2si.quick_start import run_recbole_st2si
from recbole_st2si.run_files import RunFiles, load_checkpoint, load_ilp, read_serving_file
from recbole_st2si.trainer import SafeCheckpointMixin
from recbole_st2si.safe_io import DamagedFileError, DiskFullError, load_checked, save_checked, write_text

from .test_ilp_tuning import build, ilp_config, ilp_settings


def no_space_after(monkeypatch, limit):
    """Writes through :func:`safe_io.atomic_file` fail with ENOSPC once ``limit`` bytes are written."""
    written = {"bytes": 0}
    original = safe_io._RecordingWriter.write

    def write(self, data):
        written["bytes"] += len(data)
        if written["bytes"] > limit:
            self.error = OSError(errno.ENOSPC, "No space left on device")
            raise self.error
        return original(self, data)

    monkeypatch.setattr(safe_io._RecordingWriter, "write", write)


def test_a_full_disk_is_one_line_naming_the_file_and_size_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    save_checked({"weight": torch.ones(1000)}, path)
    previous = path.read_bytes()
    no_space_after(monkeypatch, limit=2000)
    with pytest.raises(DiskFullError) as caught:
        save_checked({"weight": torch.zeros(10_000)}, path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "disk full" in message
    assert "40.0 kB" in message and "No space left on device" in message  # 10,000 float32 values
    assert path.read_bytes() == previous
    assert sorted(file.name for file in tmp_path.iterdir()) == ["model.pth"], "no temporary file stays"


def test_a_failed_text_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    write_text(path, "old\n")

    class Broken(Exception):
        pass

    with pytest.raises(Broken):
        with safe_io.atomic_file(path, text=True) as file:
            file.write("new, half")
            raise Broken
    assert path.read_text() == "old\n" and [file.name for file in tmp_path.iterdir()] == ["results.csv"]


def test_a_file_written_through_its_path_replaces_the_target_only_once_complete(tmp_path):
    """A memory map writes the temporary file by its path; the target keeps its old contents until
    the block ends, and an error leaves it and no temporary file."""
    path = tmp_path / "states.bin"
    path.write_bytes(b"old")
    with safe_io.atomic_path(path, size=8) as temporary:
        safe_io.reserve_space(temporary, 8)
        torch.from_file(str(temporary), shared=True, size=8, dtype=torch.uint8).copy_(torch.arange(8))
        assert path.read_bytes() == b"old" and temporary.parent == tmp_path
    assert path.read_bytes() == bytes(range(8))
    assert safe_io.file_sha256(path) == hashlib.sha256(bytes(range(8))).hexdigest()
    with pytest.raises(ZeroDivisionError):
        with safe_io.atomic_path(path) as temporary:
            temporary.write_bytes(b"half")
            1 / 0
    assert path.read_bytes() == bytes(range(8)) and [file.name for file in tmp_path.iterdir()] == ["states.bin"]


@pytest.mark.parametrize("num_bytes, text", [
    (999, "999 bytes"),
    (1000, "1.0 kB"),
    (40_000, "40.0 kB"),
    (116_051_328, "116.1 MB"),  # ml-100k's bfloat16 cache: (99,057 + 1,682) rows x 576 values x 2 bytes
    (4_608_000_000, "4.6 GB"),  # a million-item ILP in float32: 1,000,000 x 576 x 2 x 4 bytes
])
def test_sizes_are_printed_in_decimal_units(num_bytes, text):
    assert safe_io.human_size(num_bytes) == text


def ended_process_id():
    """The id of a process of this host that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_writer_sweeps_the_temporaries_of_killed_writers_and_nothing_else(tmp_path):
    host = socket.gethostname()
    killed = tmp_path / f".ml-100k-abc.states.{host}.{ended_process_id()}.k1ll3d.tmp"
    killed.write_bytes(bytes(1000))
    killed_folder = tmp_path / f".run-backbone.{host}.{ended_process_id()}.f0ld3r.tmp"
    killed_folder.mkdir()
    (killed_folder / "model.safetensors").write_bytes(b"half")
    running = tmp_path / f".ml-100k-def.states.{host}.{os.getppid()}.l1v3.tmp"  # this test's parent process
    other_host = tmp_path / f".ml-100k-ghi.states.{host}-elsewhere.{ended_process_id()}.0th3r.tmp"
    for path in (running, other_host):
        path.write_bytes(b"in progress")
    write_text(tmp_path / "results.csv", "a,b\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([running.name, other_host.name, "results.csv"])


def test_a_temporary_file_is_named_after_its_writer(tmp_path):
    with safe_io.atomic_path(tmp_path / "model.pth") as temporary:
        assert temporary.name.startswith(f".model.pth.{socket.gethostname()}.{os.getpid()}.")
        assert temporary.name.endswith(".tmp")
    with safe_io.atomic_folder(tmp_path / "backbone") as temporary:
        assert temporary.name.startswith(f".backbone.{socket.gethostname()}.{os.getpid()}.")


def test_written_files_get_the_usual_mode_not_a_temporary_files_private_one(tmp_path):
    write_text(tmp_path / "README.md", "table\n")
    (tmp_path / "plain.md").write_text("table\n")
    assert (tmp_path / "README.md").stat().st_mode == (tmp_path / "plain.md").stat().st_mode


def test_a_real_full_disk(tmp_path):
    """A 1 MB tmpfs (needs root to mount; skipped elsewhere)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        path = mount_point / "model.pth"
        save_checked({"weight": torch.ones(1000)}, path)
        previous = path.read_bytes()
        with pytest.raises(DiskFullError, match="No space left on device"):
            save_checked({"weight": torch.zeros(1_000_000)}, path)
        assert path.read_bytes() == previous and [file.name for file in mount_point.iterdir()] == ["model.pth"]
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def random_bytes(path):
    path.write_bytes(torch.randint(0, 256, (path.stat().st_size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes())


def zero_tensor_bytes(path, tensor):
    """Overwrite a tensor's stored bytes with zeros, leaving the file's structure intact."""
    data = path.read_bytes()
    stored = tensor.numpy().tobytes()
    assert data.count(stored) == 1
    path.write_bytes(data.replace(stored, bytes(len(stored))))


def test_damaged_files_are_refused_with_the_reason(tmp_path):
    weight = torch.randn(64, 8)
    cases = {"cut": cut_in_half, "random": random_bytes, "zeroed": lambda path: zero_tensor_bytes(path, weight)}
    reasons = {}
    for name, damage in cases.items():
        path = tmp_path / f"{name}.pth"
        save_checked({"weight": weight, "epoch": 3}, path)
        assert torch.equal(load_checked(path)["weight"], weight)
        damage(path)
        with pytest.raises(DamagedFileError) as caught:
            load_checked(path, remedy="delete it")
        assert str(path) in str(caught.value) and str(caught.value).endswith(": delete it")
        reasons[name] = caught.value.reason
    assert reasons["zeroed"] == "its contents do not match their checksum"
    assert reasons["cut"].startswith("cannot be read") and "weights_only" not in reasons["random"]


def test_a_pickled_object_is_refused_without_pytorchs_weights_only_advice(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.ones(2), "payload": uuid.uuid4()}, path)
    with pytest.raises(DamagedFileError) as caught:
        load_checked(path)
    assert "other than tensors and numbers" in str(caught.value) and "weights_only" not in str(caught.value)


# --- checkpoints -----------------------------------------------------------------------------


def test_resuming_from_a_damaged_checkpoint_names_the_file_and_the_choice(settings, tmp_path):
    checkpoint = tmp_path / "run.pth"
    run_recbole_st2si("SASRec", "tiny", config_dict=settings(hidden_size=8, inner_size=16, n_layers=1, n_heads=1),
                      checkpoint_file=checkpoint)
    cut_in_half(checkpoint)
    with pytest.raises(UserInputError) as caught:
        run_recbole_st2si("SASRec", "tiny", config_dict=settings(epochs=2), checkpoint_file=checkpoint, resume=True)
    message = str(caught.value)
    assert "\n" not in message and str(checkpoint) in message
    assert "start over with another --checkpoint_file, or delete it" in message


def test_an_ilp_file_holding_a_pickled_object_is_refused_in_one_line(make_config, tmp_path):
    path = tmp_path / "ilp.pth"
    torch.save({"weight": torch.ones(2), "items": uuid.uuid4()}, path)
    with pytest.raises(UserInputError, match=r"ilp_checkpoint .*ilp.pth: cannot read it \(it holds objects other than"):
        load_ilp(build(make_config())[0], path)


def test_each_st2si_run_saves_its_ilp_beside_its_own_checkpoint(settings, tmp_path):
    first, second = tmp_path / "first.pth", tmp_path / "second.pth"
    run_recbole_st2si("ST2SI", "tiny", config_dict=settings(), checkpoint_file=first)
    before = (tmp_path / "first-ilp.pth").read_bytes()
    run_recbole_st2si("ST2SI", "tiny", config_dict=settings(seed=8), checkpoint_file=second)
    assert (tmp_path / "second-ilp.pth").is_file() and (tmp_path / "first-ilp.pth").read_bytes() == before
    assert not list(tmp_path.rglob("ST2SI-tiny-ilp.pth")), "no ILP file shared by every run on a dataset"


def sasrec_settings(settings, **overrides):
    return settings(hidden_size=8, inner_size=16, n_layers=1, n_heads=1, **overrides)


def test_two_runs_started_in_the_same_second_keep_their_own_files(settings, tmp_path, monkeypatch):
    monkeypatch.setattr(run_files, "get_local_time", lambda: "Dec-06-2026_20-33-10")
    runs = [run_recbole_st2si("ST2SI", "tiny", config_dict=settings(seed=seed))["trainer"] for seed in (7, 8)]
    files = [RunFiles.of(trainer.saved_model_file) for trainer in runs]
    assert files[0] != files[1] and {file.checkpoint.parent for file in files} == {tmp_path / "saved"}
    for trainer, file in zip(runs, files):
        checkpoint = load_checkpoint(file.checkpoint)
        assert checkpoint["run_id"] == trainer.run_id and file.ilp.is_file()
        assert read_serving_file(file, checkpoint)["run_id"] == trainer.run_id
    assert len(list((tmp_path / "saved").glob("ST2SI-Dec-06-2026_20-33-10-*.serving.pth"))) == 2


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_serving_file(settings, tmp_path, monkeypatch):
    def train_epoch(self, *args, **kwargs):  # as a full disk, bad data or a kill would stop it
        raise RuntimeError("no space left while reading a batch")

    monkeypatch.setattr(SafeCheckpointMixin, "_train_epoch", train_epoch)
    with pytest.raises(RuntimeError, match="no space left"):
        run_recbole_st2si("SASRec", "tiny", config_dict=sasrec_settings(settings))
    assert list((tmp_path / "saved").iterdir()) == []


def test_a_checkpoint_file_another_run_created_meanwhile_is_refused_in_one_line(settings, tmp_path, monkeypatch):
    checkpoint = tmp_path / "run.pth"

    def train_epoch(self, *args, **kwargs):
        checkpoint.write_bytes(b"another run's checkpoint")
        return 0.5  # the epoch's loss

    monkeypatch.setattr(SafeCheckpointMixin, "_train_epoch", train_epoch)
    with pytest.raises(UserInputError) as caught:
        run_recbole_st2si("SASRec", "tiny", config_dict=sasrec_settings(settings), checkpoint_file=checkpoint)
    assert str(caught.value) == f"{checkpoint} exists: another run wrote it; it is left as it is"
    assert checkpoint.read_bytes() == b"another run's checkpoint" and not RunFiles.of(checkpoint).serving.exists()


# --- feature caches --------------------------------------------------------------------------


@pytest.fixture
def cache_run(make_config, tmp_path):
    """A config, model and sequences whose feature cache has been built once: ``(config, model, sequences,
    states, files)``, ``states`` a copy of the cached transitions (the cache itself maps its file)."""
    config = ilp_config(make_config, tmp_path)
    model, loaders = build(config)
    sequences = loaders[0].windows.sequences
    states = load_or_compute(config, model, sequences).history.clone()
    (record,) = (tmp_path / "cache").glob("*.pt")
    return config, model, sequences, states, feature_cache.CacheFiles.named(record.parent, record.stem)


def flip_byte(path, offset):
    with open(path, "r+b") as file:
        file.seek(offset)
        value = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([value ^ 0xFF]))


@pytest.mark.parametrize("damage", ["record cut", "record missing", "states cut", "states byte flipped"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(cache_run, damage, caplog):
    config, model, sequences, states, files = cache_run
    damaged = files.record if damage == "record cut" else files.states  # the warning names the file it distrusts
    if damage == "record missing":
        files.record.unlink()
    elif damage.endswith("cut"):
        cut_in_half(damaged)
    else:
        test_row = int(sequences.transition_index(torch.tensor([0]), sequences.test_position[:1]))
        flip_byte(damaged, test_row * states.shape[1] * states.element_size())
    with caplog.at_level(logging.WARNING):
        rebuilt = load_or_compute(config, model, sequences)
    assert "it is rebuilt" in caplog.text and str(damaged) in caplog.text
    assert torch.equal(rebuilt.history, states)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert torch.equal(load_or_compute(config, model, sequences).history, states), "the rebuilt cache is stored"
    assert not caplog.text


def test_a_run_on_a_damaged_cache_gives_the_clean_runs_metrics(settings, tmp_path):
    def run(cache_dir):
        entries = ilp_settings(tmp_path, feature_cache_dir=str(cache_dir), feature_cache_storage="bf16", epochs=2)
        return run_recbole_st2si("ST2SI", "tiny", config_dict=settings(**entries))["test_result"]

    clean = run(tmp_path / "clean")
    (states,) = (tmp_path / "clean").glob("*.states")
    flip_byte(states, states.stat().st_size // 2)
    assert run(tmp_path / "clean") == clean


def test_a_full_disk_while_caching_is_one_line_and_leaves_no_temporary(make_config, tmp_path, monkeypatch):
    config = ilp_config(make_config, tmp_path)
    model, loaders = build(config)

    def no_space(descriptor, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safe_io.os, "posix_fallocate", no_space)
    with pytest.raises(DiskFullError) as caught:
        load_or_compute(config, model, loaders[0].windows.sequences)
    message = str(caught.value)
    assert "\n" not in message and ".states" in message and "No space left on device" in message
    assert [file.suffix for file in (tmp_path / "cache").iterdir()] == [".lock"]


def test_a_read_only_cache_folder_is_used_when_it_holds_the_cache(cache_run, monkeypatch):
    config, model, sequences, states, files = cache_run

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wa+x"):
            raise OSError(errno.EROFS, "Read-only file system")
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(feature_cache, "open", read_only_open, raising=False)
    assert torch.equal(load_or_compute(config, model, sequences).history, states)
    files.record.unlink()
    files.states.unlink()
    with pytest.raises(UserInputError, match="cannot be written \\(Read-only file system\\) and holds no cache"):
        load_or_compute(config, model, sequences)


# --- the benchmark ---------------------------------------------------------------------------


def test_the_benchmark_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise DiskFullError(f"disk full: could not write {tmp_path}/runs/x.json (2.0 kB): No space left on device")

    monkeypatch.setattr(benchmark, "run_all", full_disk)
    status = benchmark.main(["--dataset=tiny", "--models=SASRec", f"--output_dir={tmp_path}"])
    assert status == 2
    assert capsys.readouterr().err.strip().startswith("error: disk full: could not write")
