"""Tune ST2SI, or any RecBole model, on Ray Tune with a RecBole hyper file.

    python run_hyper.py --model=ST2SI --dataset=ml-100k --params_file=hyper/st2si.hyper --num_samples=8
    python run_hyper.py --model=SASRec --dataset=ml-100k --params_file=hyper/sasrec.hyper --search=grid
    python run_hyper.py --model=ST2SI --dataset=ml-100k --params_file=hyper/st2si.hyper --ray_address=auto

Any other ``--key=value`` is a setting shared by every trial (``--epochs=10``). Writes
OUTPUT_DIR/results.csv, OUTPUT_DIR/README.md and OUTPUT_DIR/best.yaml; see docs/tuning.md.
"""

import argparse
import shlex
import sys

from recbole_st2si.errors import UserInputError
from recbole_st2si.command_line import parse_overrides, split_list
from recbole_st2si.tuning import TuningFailed, run_tuning


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model", "-m", default="ST2SI", help="ST2SI or a RecBole model name")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name")
    parser.add_argument("--params_file", required=True, help="RecBole hyper file: `name type values` per line")
    parser.add_argument("--config_files", default=None, help="YAML files for every trial (space/comma separated)")
    parser.add_argument("--num_samples", type=int, default=None, help="trials (random: 10), runs per combination (grid: 1)")
    parser.add_argument("--search", choices=["random", "grid"], default="random", help="grid: every choice combination")
    parser.add_argument("--scheduler", choices=["asha", "fifo"], default="asha", help="asha stops poor trials early")
    parser.add_argument("--grace_period", type=int, default=1, help="epochs before ASHA may stop a trial")
    parser.add_argument("--cpus_per_trial", type=float, default=1)
    parser.add_argument("--gpus_per_trial", type=float, default=None, help="default: 1 if the cluster has GPUs, else 0")
    parser.add_argument("--num_cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--ray_address", default=None, help="join a running Ray cluster: auto or host:port")
    parser.add_argument("--output_dir", default="tuning", help="folder for the results table and best.yaml")
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep each trial's best checkpoint")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, settings = build_parser().parse_known_args(argv)
    try:
        rows = run_tuning(
            args.model,
            args.dataset,
            args.params_file,
            split_list(args.config_files or ""),
            parse_overrides(settings),
            num_samples=args.num_samples,
            search=args.search,
            scheduler=args.scheduler,
            grace_period=args.grace_period,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            num_cpus=args.num_cpus,
            ray_address=args.ray_address,
            output_dir=args.output_dir,
            keep_checkpoints=args.keep_checkpoints,
            command=shlex.join(["python", "run_hyper.py", *argv]),
        )
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TuningFailed as error:
        sys.exit(f"error: {error}")
    print(f"{len(rows)} trials, best first: {args.output_dir}/README.md, {args.output_dir}/results.csv")
    print(f"best configuration: {args.output_dir}/best.yaml")


if __name__ == "__main__":
    main()
