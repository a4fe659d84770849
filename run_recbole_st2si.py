"""Train and test ST2SI, or any RecBole model, under one leave-one-out full-ranking evaluation.

    python run_recbole_st2si.py --model=ST2SI --dataset=ml-100k
    python run_recbole_st2si.py --model=SASRec --dataset=ml-100k
    python run_recbole_st2si.py --model=ST2SI --dataset=Scientific --data_path=dataset --train_stage=full

Any other ``--key=value`` overrides a RecBole/ST2SI setting (see properties/*.yaml).
"""

import argparse
import sys

from recbole_st2si.errors import UserInputError
from recbole_st2si.quick_start import run_recbole_st2si


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", default="ST2SI", help="ST2SI or a RecBole model name")
    parser.add_argument("--dataset", "-d", default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", default=None, help="YAML files, separated by spaces or commas")
    args, _ = parser.parse_known_args()
    config_files = args.config_files.replace(",", " ").split() if args.config_files else None
    try:
        result = run_recbole_st2si(args.model, args.dataset, config_file_list=config_files)
    except UserInputError as error:
        sys.exit(f"error: {error}")
    print(f"best valid: {dict(result['best_valid_result'] or {})}")
    print(f"test result: {dict(result['test_result'] or {})}")


if __name__ == "__main__":
    main()
