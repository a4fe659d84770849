"""Train and test ST2SI, or any RecBole model, under one leave-one-out full-ranking evaluation.

    python run_recbole_st2si.py --model=ST2SI --dataset=ml-100k
    python run_recbole_st2si.py --model=SASRec --dataset=ml-100k
    python run_recbole_st2si.py --model=ST2SI --dataset=Scientific --data_path=dataset --train_stage=full
    python run_recbole_st2si.py --model=ST2SI --dataset=ml-100k --nproc=2     # DDP: 2 GPUs (gloo on CPU)
    python run_recbole_st2si.py --model=ST2SI --dataset=ml-100k --checkpoint_file=saved/run.pth --resume

Any other ``--key=value`` overrides a RecBole/ST2SI setting (see properties/ and dataset_configs/).
"""

import argparse
import os
import sys

from recbole_st2si.command_line import parse_overrides, split_list
from recbole_st2si.distributed import refuse_external_launcher
from recbole_st2si.errors import UserInputError
from recbole_st2si.quick_start import run_recbole_st2si, run_recbole_st2si_distributed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", default="ST2SI", help="ST2SI or a RecBole model name")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", default=None, help="YAML files, separated by spaces or commas")
    parser.add_argument("--nproc", type=int, default=1, help="DDP processes on this machine (one per GPU)")
    parser.add_argument("--world_size", type=int, default=-1, help="DDP processes on all machines (default: nproc)")
    parser.add_argument("--ip", default="localhost", help="address of the machine running global rank 0")
    parser.add_argument("--port", default="5678", help="free port on that machine")
    parser.add_argument("--offset", type=int, default=0, help="global rank of this machine's first process")
    parser.add_argument("--checkpoint_file", default=None, help="where the best model is saved (default: a new "
                        "timestamped file in checkpoint_dir); with --resume, the interrupted run to continue")
    parser.add_argument("--resume", nargs="?", const="True", default="False", choices=["True", "False", "true", "false"],
                        help="continue the interrupted run of --checkpoint_file from its last saved epoch")
    args, settings = parser.parse_known_args()
    config_files = split_list(args.config_files or "")
    resume = args.resume.lower() == "true"
    try:
        refuse_external_launcher()
        settings = parse_overrides(settings)
        if args.checkpoint_file and not resume and os.path.exists(args.checkpoint_file):
            raise UserInputError(f"{args.checkpoint_file} exists: pass --resume to continue its run, or choose "
                                 "another --checkpoint_file")
        single_process = args.nproc == 1 and args.world_size <= 0
        if args.checkpoint_file and not single_process:
            raise UserInputError("--checkpoint_file and --resume are for single-process runs")
        if single_process:
            result = run_recbole_st2si(args.model, args.dataset, config_files, settings,
                                       checkpoint_file=args.checkpoint_file, resume=resume)
        else:
            result = run_recbole_st2si_distributed(
                args.model, args.dataset, config_files, settings, nproc=args.nproc, world_size=args.world_size,
                ip=args.ip, port=args.port, offset=args.offset,
            )
    except UserInputError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    if result is None:
        return  # another machine holds global rank 0, which prints the results
    print(f"best valid: {dict(result['best_valid_result'] or {})}")
    print(f"test result: {dict(result['test_result'] or {})}")


if __name__ == "__main__":
    main()
