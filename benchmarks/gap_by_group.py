"""Where two trained models differ: test NDCG@10 by user history length and by target popularity.

    python benchmarks/gap_by_group.py saved/ST2SI-....pth saved/SASRec-....pth --output=results/Scientific-gap

Each checkpoint (any run of ``run_recbole_st2si.py`` or the benchmark with ``--keep_checkpoints``)
is loaded with its own configuration and scored on its test users by the same full-sort evaluation
as in training (ST2SI reads the feature cache when its run used one). For every test user it keeps
the rank of the held-out item among all items; NDCG@10 of a user is ``1 / log2(rank + 2)`` when the
rank is below 10. Users are then grouped by the length of the history the model sees and by how often
the held-out item is a training target (its popularity), and each group's mean is printed and, with
``--output``, written to ``results.csv`` and ``README.md``. The overall mean is printed beside
RecBole's test NDCG@10 of the same evaluation, as a check of the grouping.
"""

import argparse
import math
from pathlib import Path

import pandas as pd
import torch
from recbole.utils import init_seed

from recbole_st2si.data.cached_dataloader import FeatureCache
from recbole_st2si.run_files import RunFiles, load_checkpoint, load_weights
from recbole_st2si.safe_io import load_checked
from recbole_st2si.trainer import get_trainer
from recbole_st2si.utils import create_config, create_dataset, data_preparation, get_model

HISTORY_BINS = [0, 2, 4, 7, 12, 20, math.inf]  # (low, high] history lengths
POPULARITY_BINS = [-1, 0, 5, 20, 50, math.inf]  # (low, high] times the target is a training target


def bin_labels(bins):
    """``(low, high]`` of whole numbers as ``low+1-high``, ``low+1+`` when open, ``high`` when one value."""
    return [f"{low + 1}+" if high == math.inf else str(high) if high == low + 1 else f"{low + 1}-{high}"
            for low, high in zip(bins, bins[1:])]


def saved_config(files):
    """The run's configuration, from the settings its serving file recorded (those that differ from
    the defaults of its model and dataset; the serving format's other contents are not needed)."""
    saved = load_checked(files.serving)["config"]
    settings = {"data_path": str(Path(saved["data_path"]).parent)}
    defaults = create_config(saved["model"], saved["dataset"], config_dict=settings).final_config_dict
    settings.update({name: value for name, value in saved.items() if name in defaults and defaults[name] != value})
    return create_config(saved["model"], saved["dataset"], config_dict=settings)


def test_ranks(checkpoint_path):
    """The model's name, RecBole's test NDCG@10, and one row per test user: history length, target
    item, the target's training popularity, and the target's rank among all items (0 = first)."""
    files = RunFiles.of(checkpoint_path)
    checkpoint = load_checkpoint(files.checkpoint)
    config = saved_config(files)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    load_weights(model, checkpoint, checkpoint_path)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if getattr(trainer, "uses_feature_cache", False):
        trainer.feature_cache = FeatureCache(config, model, train_data)
    item_field, length_field = config["ITEM_ID_FIELD"], config["ITEM_LIST_LENGTH_FIELD"]
    popularity = torch.bincount(train_data.dataset.inter_feat[item_field], minlength=dataset.item_num)

    rows = []
    score_batch = trainer._full_sort_batch_eval

    def recording(batched_data):
        interaction, scores, positive_u, positive_i = score_batch(batched_data)
        target_scores = scores[positive_u, positive_i].float()
        ranks = (scores[positive_u].float() > target_scores[:, None]).sum(1)
        rows.append(pd.DataFrame({"history_length": interaction[length_field][positive_u].cpu().numpy(),
                                  "target": positive_i.cpu().numpy(),
                                  "popularity": popularity[positive_i.cpu()].numpy(),
                                  "rank": ranks.cpu().numpy()}))
        return interaction, scores, positive_u, positive_i

    trainer._full_sort_batch_eval = recording
    result = trainer.evaluate(test_data, load_best_model=False)
    return config["model"], float(result["ndcg@10"]), pd.concat(rows, ignore_index=True)


def ndcg_at_10(ranks):
    return ((ranks < 10) / (ranks + 2).map(math.log2)).mean()


def by_group(users, column, bins):
    groups = pd.cut(users[column], bins, labels=bin_labels(bins))
    return users.groupby(groups, observed=True)["rank"].agg(users="size", ndcg10=ndcg_at_10)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files of trained runs on one dataset")
    parser.add_argument("--output", default=None, help="folder for results.csv and README.md")
    args = parser.parse_args()

    tables, checks = [], []
    for path in args.checkpoints:
        name, recbole_ndcg, users = test_ranks(path)
        name = f"{name} ({Path(path).name})"
        checks.append(f"{name}: NDCG@10 from the ranks {ndcg_at_10(users['rank']):.4f}, RecBole's {recbole_ndcg:.4f}")
        for column, bins in (("history_length", HISTORY_BINS), ("popularity", POPULARITY_BINS)):
            table = by_group(users, column, bins).reset_index().rename(columns={column: "group"})
            tables.append(table.assign(model=name, grouped_by=column, group=table["group"].astype(str)))
    results = pd.concat(tables, ignore_index=True)
    wide = results.pivot_table(index=["grouped_by", "group", "users"], columns="model", values="ndcg10", sort=False)
    print("\n".join(checks))
    print(wide.round(4).to_string())
    if args.output:
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        results.to_csv(output / "results.csv", index=False)
        (output / "README.md").write_text(
            "# Test NDCG@10 by group\n\n`python benchmarks/gap_by_group.py " + " ".join(args.checkpoints)
            + f" --output={args.output}`\n\nHistory length: items the model sees before the held-out one. "
            "Popularity: times the held-out item is a training target.\n\n"
            + "\n".join(f"- {check}" for check in checks) + "\n\n" + wide.round(4).reset_index().to_markdown(index=False)
            + "\n")


if __name__ == "__main__":
    main()
