"""RecBole 1.2.1 on numpy 2 (recbole_st2si/compat.py): its full-ranking metrics as under numpy 1."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recbole.evaluator import Evaluator
from recbole.evaluator.collector import DataStruct

from recbole_st2si.utils import create_config

DATA_DIR = Path(__file__).parent / "data"
SCORES = [
    [0.9, 0.1, 0.8, 0.3, 0.5, 0.2],
    [0.2, 0.7, 0.1, 0.9, 0.4, 0.6],
    [0.3, 0.2, 0.6, 0.1, 0.8, 0.5],
]
POSITIVES = [{2, 3}, {0}, {4, 1, 5}]
TOPK = [1, 3, 5]
METRICS = ["Recall", "MRR", "NDCG", "Hit", "Precision", "MAP"]
# RecBole 1.2.1's Evaluator on SCORES and POSITIVES with numpy 1.26.4 (before the numpy 2 upgrade).
NUMPY1_VALUES = {
    "recall@1": 0.1111111111, "recall@3": 0.3888888889, "recall@5": 1.0,
    "mrr@1": 0.3333333333, "mrr@3": 0.5, "mrr@5": 0.5666666667,
    "ndcg@1": 0.3333333333, "ndcg@3": 0.3635902988, "ndcg@5": 0.6410778729,
    "hit@1": 0.3333333333, "hit@3": 0.6666666667, "hit@5": 1.0,
    "precision@1": 0.3333333333, "precision@3": 0.3333333333, "precision@5": 0.4,
    "map@1": 0.3333333333, "map@3": 0.2685185185, "map@5": 0.4851851852,
}


def naive_metrics(scores, positives, k):
    """Each metric at ``k`` by its textbook definition, averaged over the users."""
    totals = dict.fromkeys(["recall", "mrr", "ndcg", "hit", "precision", "map"], 0.0)
    for row, relevant in zip(scores, positives):
        ranking = sorted(range(len(row)), key=lambda item: -row[item])[:k]
        hits = [item in relevant for item in ranking]
        totals["recall"] += sum(hits) / len(relevant)
        totals["hit"] += float(any(hits))
        totals["precision"] += sum(hits) / k
        totals["mrr"] += next((1 / (rank + 1) for rank, hit in enumerate(hits) if hit), 0.0)
        dcg = sum(1 / math.log2(rank + 2) for rank, hit in enumerate(hits) if hit)
        ideal = sum(1 / math.log2(rank + 2) for rank in range(min(k, len(relevant))))
        totals["ndcg"] += dcg / ideal
        precisions = [sum(hits[: rank + 1]) / (rank + 1) for rank, hit in enumerate(hits) if hit]
        totals["map"] += sum(precisions) / min(k, len(relevant))
    return {f"{name}@{k}": total / len(scores) for name, total in totals.items()}


def recbole_metrics():
    """RecBole's own Evaluator on the full-ranking matrix, as its Collector hands it over."""
    settings = {"data_path": str(DATA_DIR), "metrics": METRICS, "topk": TOPK, "metric_decimal_place": 10}
    config = create_config("SASRec", "tiny", config_dict=settings)
    scores = torch.tensor(SCORES)
    top_items = torch.topk(scores, max(TOPK), dim=1).indices
    is_positive = torch.tensor([[int(item) in relevant for item in row] for row, relevant in zip(top_items, POSITIVES)])
    positive_counts = torch.tensor([[len(relevant)] for relevant in POSITIVES])
    data = DataStruct()
    data.update_tensor("rec.topk", torch.cat([is_positive.int(), positive_counts], dim=1))
    return Evaluator(config).evaluate(data)


def test_full_ranking_metrics_equal_the_textbook_values_and_numpy1s(monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    result = recbole_metrics()
    expected = {name: value for k in TOPK for name, value in naive_metrics(SCORES, POSITIVES, k).items()}
    assert result == pytest.approx(expected, abs=1e-9)
    assert result == pytest.approx(NUMPY1_VALUES, abs=1e-9)


def test_importing_the_package_is_enough_for_recboles_config():
    """A fresh interpreter that imports only ``recbole_st2si`` builds RecBole's own Config and
    dataset, which alias numpy's removed names; the aliases are numpy 1's types."""
    code = (
        "import sys; sys.argv = sys.argv[:1]\n"
        "import recbole_st2si\n"
        "import numpy as np\n"
        "from recbole.config import Config\n"
        "from recbole.data import create_dataset\n"
        f"settings = {{'data_path': {str(DATA_DIR)!r}, 'show_progress': False, 'train_neg_sample_args': None}}\n"
        "config = Config('SASRec', 'tiny', config_dict=settings)\n"
        "print(create_dataset(config).inter_num)\n"
        "print(np.float_ is np.float64, np.complex_ is np.complex128, np.unicode_ is np.str_)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    inter_rows = len((DATA_DIR / "tiny" / "tiny.inter").read_text().splitlines()) - 1
    assert run.stdout.split("\n")[-3:] == [str(inter_rows), "True True True", ""]


def test_missing_recbole_is_explained():
    """After a plain ``pip install .`` (setup.cfg cannot list RecBole): how to install it."""
    code = "import sys; sys.modules['recbole'] = None; import recbole_st2si"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert run.returncode != 0 and "pip install --no-deps recbole==1.2.1" in run.stderr
