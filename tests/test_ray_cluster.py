"""Cluster mode: run_hyper.py joins a real Ray head started with ``ray start --head`` on 127.0.0.1."""

import csv
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .test_distributed import free_port

DATA_DIR = Path(__file__).parent / "data"
REPO = Path(__file__).parent.parent
HEAD_START_TIMEOUT = 120  # seconds for `ray start --head` to report the runtime started
TUNING_TIMEOUT = 300
# Ray replaces 127.0.0.1 in an address by the machine's network address, unless it is told (by this
# variable, meant for single-machine platforms) that the node is its own cluster: head and client
# then both stay on the loopback address. The head uses token authentication, as Ray 2.60 does by
# default once a token exists; the client joins with the same token.
CLUSTER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
}


def start_head(port, temp_dir, log_path):
    """``ray start --head --block`` in its own process group; returns once the runtime is up.

    ``--block`` keeps the head's processes children of this one command, so that stopping it stops
    this head alone (``ray stop`` would stop every Ray instance of this machine's user).
    """
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    head = subprocess.Popen(
        command,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **CLUSTER_ENV},
    )
    deadline = time.monotonic() + HEAD_START_TIMEOUT
    while "Ray runtime started" not in log_path.read_text():
        if head.poll() is not None or time.monotonic() > deadline:
            stop_head(head)
            raise AssertionError(f"the Ray head did not start:\n{log_path.read_text()}")
        time.sleep(0.5)
    return head


def stop_head(head):
    """SIGTERM to the head's process group (``ray start --block`` then stops its processes), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
            head.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def test_run_hyper_tunes_on_a_ray_head_it_joins(tmp_path):
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # Ray's socket paths must stay short
    head = start_head(port, temp_dir, tmp_path / "head.log")
    try:
        output_dir = tmp_path / "out"
        run = subprocess.run(
            [
                sys.executable, "run_hyper.py", "--model=SASRec", "--dataset=tiny",
                f"--params_file={REPO / 'hyper' / 'sasrec.hyper'}", "--num_samples=2", "--cpus_per_trial=1",
                "--scheduler=fifo", f"--ray_address=127.0.0.1:{port}", f"--output_dir={output_dir}",
                f"--data_path={DATA_DIR}", "--epochs=1", "--MAX_ITEM_LIST_LENGTH=10",
            ],  # fmt: skip
            cwd=REPO,
            env={**os.environ, **CLUSTER_ENV},
            capture_output=True,
            text=True,
            timeout=TUNING_TIMEOUT,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        workers = list(Path(temp_dir).glob("session_*/logs/python-core-worker-*.log"))
        assert workers, "the trials ran in the head's Ray session, not in a private one"
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)

    with open(output_dir / "results.csv") as file:
        table = list(csv.DictReader(file))
    assert [row["status"] for row in table] == ["completed", "completed"]
    scores = [float(row["valid_ndcg@10"]) for row in table]
    assert scores == sorted(scores, reverse=True) and all(row["test_ndcg@10"] for row in table)
    best = yaml.safe_load((output_dir / "best.yaml").read_text())
    assert best["epochs"] == 1 and best["data_path"] == str(DATA_DIR)
    assert {"learning_rate", "hidden_size", "n_layers"} <= set(best)
    assert best["hidden_size"] == int(table[0]["hidden_size"])  # the best trial's parameters
    assert best["learning_rate"] == float(table[0]["learning_rate"])
