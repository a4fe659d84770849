"""Wall time of ILP tuning with the feature cache versus re-running the frozen backbone every epoch.

    python benchmarks/feature_cache_speedup.py --dataset=ml-100k --epochs=10 --users=100

Both runs train the ILP for ``--epochs`` epochs with validation after each (no early stop), on the
same data, backbone and machine, in this one process; both times include loading the dataset and
the backbone, and the cached run's time includes building the cache from scratch. ``--users`` keeps the first N users so the uncached run fits a CPU budget
(0 = all users). Prints both times, the time per epoch and the ratio.
"""

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from recbole_st2si.backbone import load_tokenizer
from recbole_st2si.quick_start import run_recbole_st2si
from recbole_st2si.config import DATASET_DEFAULTS_DIR
from recbole_st2si.utils import create_config


def subset(dataset, data_path, users, folder):
    """Write the dataset restricted to its first ``users`` users (in file order) into ``folder``."""
    config = create_config("ST2SI", dataset, config_dict={"data_path": data_path} if data_path else None)
    source = Path(config["data_path"])
    name = f"{dataset}-{users}u"
    target = Path(folder) / name
    target.mkdir(parents=True)
    inter = pd.read_csv(source / f"{dataset}.inter", sep="\t", dtype=str)
    kept = inter[inter.iloc[:, 0].isin(inter.iloc[:, 0].drop_duplicates().head(users))]
    kept.to_csv(target / f"{name}.inter", sep="\t", index=False)
    (target / f"{name}.item").write_text((source / f"{dataset}.item").read_text())
    dataset_config = DATASET_DEFAULTS_DIR / f"{dataset}.yaml"
    return name, str(folder), dataset_config if dataset_config.is_file() else None


def timed_run(dataset, settings, config_files):
    start = time.perf_counter()
    result = run_recbole_st2si("ST2SI", dataset, config_file_list=config_files, config_dict=settings, saved=False)
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--llm_path", default="embedded")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--users", type=int, default=100, help="first N users only (0: all)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        dataset, data_path, config_files = args.dataset, args.data_path, None
        if args.users:
            dataset, data_path, dataset_config = subset(args.dataset, args.data_path, args.users, scratch)
            config_files = [str(dataset_config)] if dataset_config else None
        common = {
            "llm_path": args.llm_path, "train_stage": "ilp", "epochs": args.epochs, "stopping_step": args.epochs,
            "eval_step": 1, "show_progress": False, "checkpoint_dir": scratch,
            "feature_cache_dir": str(Path(scratch) / "cache"),
        }
        if data_path:
            common["data_path"] = data_path
        load_tokenizer(args.llm_path, ".")  # loaded once per process: keep it out of the first timing
        timings = {}
        for label, cached in (("cached", True), ("uncached", False)):
            seconds, result = timed_run(dataset, {**common, "feature_cache": cached}, config_files)
            timings[label] = seconds
            print(f"{label:>9}: {seconds:8.1f} s for {args.epochs} epochs ({seconds / args.epochs:.1f} s/epoch), "
                  f"test {dict(result['test_result'])}", flush=True)
    print(f"dataset {dataset}, backbone {args.llm_path}: uncached / cached = {timings['uncached'] / timings['cached']:.1f}x")


if __name__ == "__main__":
    main()
