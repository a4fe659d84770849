"""Inference cost of saved models (the paper's Table 7): latency per user, throughput, peak memory.

    python benchmarks/inference.py --model_files saved/ST2SI-<date>.pth saved/SASRec-<date>.pth

For every model (each in its own process, so that its peak memory is its own) and the users with
at least ``--history_length + 1`` items:

* fresh, batch 1: the top-10 after the user's most recent ``--history_length`` items, encoded from scratch;
* incremental, batch 1: the same history reached by adding its last item to a session that holds the
  items before it (ST2SI runs only the new item's tokens on the kept key/values; other models encode
  the history again);
* batched: top-10 for ``--batch_size`` users at once, in users per second, fresh and incremental
  (every session of the batch adds its last item in one pass: ST2SI runs all the new items' tokens
  together, each on its own kept key/values).

Peak memory is the process's peak resident memory on CPU (weights included), the peak allocated
memory on a GPU. Prints a Markdown table, and writes it with the raw figures to ``--out``.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recbole_st2si.recommend import load_recommender


def timed(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def measure(model_file, users, history_length, batch_size, device, precision, k=10):
    """Every figure of one model, measured in this process."""
    start = time.perf_counter()
    recommender = load_recommender(model_file, device=device, precision=precision)
    load_s = time.perf_counter() - start
    histories = [h for h in (recommender.user_history(user) for user in recommender.users) if len(h) > history_length]
    histories = [history[-history_length:] for history in histories[:users]]
    for history in histories[:2]:  # warm-up
        recommender.recommend([history], k)

    fresh = [timed(lambda: recommender.recommend([history], k)) for history in histories]

    incremental = []
    for history in histories:
        session = recommender.session(history[:-1])
        incremental.append(timed(lambda: (session.add(history[-1]), session.recommend(k))))

    batches = [histories[start : start + batch_size] for start in range(0, len(histories), batch_size)]
    batched_s = sum(timed(lambda: recommender.recommend(batch, k)) for batch in batches)
    batched_incremental_s = 0.0
    for batch in batches:
        sessions = [recommender.session(history[:-1]) for history in batch]
        last_items = [history[-1] for history in batch]
        batched_incremental_s += timed(lambda: (recommender.add(sessions, last_items), recommender.recommend_sessions(sessions, k)))
    return {
        "model_file": str(model_file),
        "model": recommender.model.__class__.__name__,
        "train_stage": getattr(recommender.model, "train_stage", None),
        "precision": precision if hasattr(recommender.model, "backbone") else "fp32",
        "parameters": sum(parameter.numel() for parameter in recommender.model.parameters()),
        "users": len(histories),
        "history_length": history_length,
        "load_s": load_s,
        "fresh_ms": [1000 * seconds for seconds in fresh],
        "incremental_ms": [1000 * seconds for seconds in incremental],
        "batch_size": batch_size,
        "batched_users_per_s": len(histories) / batched_s,
        "batched_incremental_users_per_s": len(histories) / batched_incremental_s,
        "peak_memory_gib": peak_memory_gib(torch.device(device)),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
    }


def table(results):
    lines = [
        "| model | parameters | fresh, batch 1: p50 / p95 (ms) | incremental +1 item, batch 1: p50 / p95 (ms) "
        "| incremental speed-up, batch 1 (p50) | batched fresh (users/s) | batched incremental (users/s) "
        "| incremental speed-up, batched | peak memory (GiB) | load (s) | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        fresh, incremental = np.array(result["fresh_ms"]), np.array(result["incremental_ms"])
        name = result["model"] + (f" `{result['train_stage']}`, {result['precision']}" if result["train_stage"] else "")
        lines.append(
            f"| {name} | {result['parameters']:,} | {np.median(fresh):.1f} / {np.percentile(fresh, 95):.1f} "
            f"| {np.median(incremental):.1f} / {np.percentile(incremental, 95):.1f} "
            f"| {np.median(fresh) / np.median(incremental):.1f}x "
            f"| {result['batched_users_per_s']:.1f} (batch {result['batch_size']}) "
            f"| {result['batched_incremental_users_per_s']:.1f} "
            f"| {result['batched_incremental_users_per_s'] / result['batched_users_per_s']:.1f}x | {result['peak_memory_gib']:.2f} "
            f"| {result['load_s']:.1f} | {result['device']} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_files", nargs="+", required=True,
                        help="checkpoints saved by run_recbole_st2si.py; FILE:bf16 runs ST2SI's backbone in bf16")
    parser.add_argument("--users", type=int, default=100, help="users measured per model")
    parser.add_argument("--history_length", type=int, default=50, help="items per history (ml-100k's window is 50)")
    parser.add_argument("--batch_size", type=int, default=32, help="users per batch for the throughput")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the table and the raw figures here (.md; .json beside it)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_file, _, precision = args.model_files[0].partition(":")
        result = measure(model_file, args.users, args.history_length, args.batch_size, args.device, precision or "fp32")
        print(json.dumps(result))
        return
    results = []
    for model_file in args.model_files:
        command = [sys.executable, __file__, "--worker", "--model_files", model_file, "--users", str(args.users),
                   "--history_length", str(args.history_length), "--batch_size", str(args.batch_size),
                   "--device", args.device]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    markdown = table(results)
    print(markdown)
    if args.out:
        Path(args.out).write_text(markdown + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
