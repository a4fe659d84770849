"""Training windows: histories rebuilt from RecBole's rows, the tiling of ``all``, the authors' sampler."""

import logging
from collections import Counter
from fractions import Fraction

import pandas as pd
import pytest
import torch
from recbole.utils import init_seed

from recbole_st2si.data.windows import TrainingWindows, UserSequences, tile_windows
from recbole_st2si.settings import CHOICES
from recbole_st2si.utils import create_dataset, data_preparation

from .conftest import DATA_DIR


def loaders(config):
    init_seed(config["seed"], True)
    return data_preparation(config, create_dataset(config))


def test_histories_are_rebuilt_from_the_split_rows(make_config):
    train_data, _, _ = loaders(make_config(MAX_ITEM_LIST_LENGTH=3))  # rows hold 3 items, histories 8 to 14
    dataset, sequences = train_data.dataset, train_data.windows.sequences
    inter = pd.read_csv(DATA_DIR / "tiny" / "tiny.inter", sep="\t", dtype=str)
    inter.columns = [column.split(":")[0] for column in inter.columns]
    inter = inter.sort_values(["user_id", "timestamp"], key=lambda column: column.astype(float)
                              if column.name == "timestamp" else column, kind="stable")
    expected = {user: list(group["item_id"]) for user, group in inter.groupby("user_id")}
    item_tokens = dataset.field2id_token[dataset.iid_field]
    for user, uid in enumerate(sequences.uid.tolist()):
        items = sequences.items[sequences.offsets[user] : sequences.offsets[user + 1]]
        raw_user = dataset.field2id_token[dataset.uid_field][uid]
        assert [item_tokens[item] for item in items.tolist()] == expected[raw_user]
        length = len(expected[raw_user])
        assert sequences.num_train[user] == length - 2
        assert (sequences.valid_position[user], sequences.test_position[user]) == (length - 2, length - 1)


def naive_tiling(lengths_by_user, segment, max_items, max_tokens):
    """Windows ``(user, start, end)`` by walking each history back one item at a time."""
    windows = []
    for user, history in enumerate(lengths_by_user):
        end = len(history) - 1
        while end >= 1:
            start, tokens = end, 0
            while start > 0 and end - (start - 1) <= max_items and tokens + segment[history[start - 1]] < max_tokens:
                start -= 1
                tokens += segment[history[start]]
            windows.append((user, start, end))
            end = start
    return sorted(windows)


def hand_made_sequences(histories, num_train):
    lengths = torch.tensor([len(history) for history in histories])
    return UserSequences(
        items=torch.tensor([item for history in histories for item in history]),
        offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        uid=torch.arange(1, len(histories) + 1),
        num_train=torch.tensor(num_train),
        train_row=torch.zeros(len(histories), dtype=torch.long),
        valid_position=torch.tensor(num_train),
        test_position=lengths - 1,
    )


@pytest.mark.parametrize("max_items, max_tokens", [(50, 1024), (3, 1024), (4, 9), (2, 5)])
def test_all_windows_tile_every_history_within_both_limits(max_items, max_tokens):
    generator = torch.Generator().manual_seed(0)
    histories = [torch.randint(1, 9, (length,), generator=generator).tolist() for length in (1, 2, 5, 9, 17)]
    segment = torch.tensor([0, 2, 3, 4, 2, 3, 4, 2, 4])  # tokens of each item's text and its [Q]
    sequences = hand_made_sequences(histories, [max(len(history) - 2, 1) for history in histories])
    users, starts, ends = tile_windows(sequences, segment, max_items, max_tokens)
    found = sorted(zip(users.tolist(), starts.tolist(), ends.tolist()))
    assert found == naive_tiling(histories, segment.tolist(), max_items, max_tokens)
    targets = Counter((user, position) for user, start, end in found for position in range(start + 1, end + 1))
    assert targets == Counter((user, p) for user, history in enumerate(histories) for p in range(1, len(history)))


def test_all_windows_use_every_training_transition_once(make_config):
    train_data, _, _ = loaders(make_config(train_window="all", MAX_ITEM_LIST_LENGTH=4, id_alignment=False))
    windows, sequences = train_data.windows, train_data.windows.sequences
    users, starts, targets = windows.windows(torch.arange(len(windows)), None)
    used = Counter((user, p) for user, start, target in zip(users.tolist(), starts.tolist(), targets.tolist())
                   for p in range(start + 1, target + 1))
    expected = Counter((user, p) for user in range(len(sequences.uid)) for p in range(1, int(sequences.num_train[user])))
    assert used == expected and max(used.values()) == 1
    batch = train_data.collate_fn(list(range(train_data.sample_size)))  # each window: its history's items
    for row, (user, start, target) in enumerate(zip(users.tolist(), starts.tolist(), targets.tolist())):
        history = sequences.items[sequences.offsets[user] :].tolist()
        assert batch["item_id_list"][row, : batch["item_length"][row]].tolist() == history[start:target]
        assert batch["item_id"][row] == history[target]


@pytest.mark.parametrize("max_items", [50, 2])
def test_random_windows_follow_the_authors_distribution(max_items):
    """n = 4 training items: start s uniform over 0..2, then target t uniform over s+1..3; the most
    recent ``max_items`` items before t are kept."""
    sequences = hand_made_sequences([[5, 6, 7, 8, 9, 10]], [4])
    windows = TrainingWindows("random", sequences, torch.ones(11, dtype=torch.long), max_items, 1024)
    exact = Counter()
    for s in range(3):
        for t in range(s + 1, 4):
            exact[(max(s, t - max_items), t)] += Fraction(1, 3) * Fraction(1, 3 - s)
    draws = 40000
    generator = torch.Generator().manual_seed(1)
    _, starts, targets = windows.windows(torch.zeros(draws, dtype=torch.long), generator)
    counts = Counter(zip(starts.tolist(), targets.tolist()))
    assert set(counts) == set(exact)
    for window, probability in exact.items():
        assert abs(counts[window] / draws - float(probability)) < 0.01


def test_each_train_window_the_settings_allow_has_windows_of_its_own():
    """check_settings alone checks the word (tests/test_settings.py): each word it lets through is a
    mode here. n = 4 training items of 6, at most 2 items per window; ``random`` draws 100 times."""
    sequences = hand_made_sequences([[5, 6, 7, 8, 9, 10]], [4])
    expected = {"all": {(0, 1), (1, 3)}, "full": {(1, 3)}, "random": {(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)}}
    assert sorted(CHOICES["ST2SI"]["train_window"]) == sorted(expected)
    for mode in expected:
        windows = TrainingWindows(mode, sequences, torch.ones(11, dtype=torch.long), 2, 1024)
        index = torch.zeros(100, dtype=torch.long) if mode == "random" else torch.arange(len(windows))
        _, starts, targets = windows.windows(index, torch.Generator().manual_seed(0))
        assert set(zip(starts.tolist(), targets.tolist())) == expected[mode], mode


@pytest.mark.parametrize("train_window, share", [("all", lambda n: n - 1), ("full", lambda n: min(n - 1, 4))])
def test_the_log_says_how_many_training_transitions_an_epoch_uses(make_config, caplog, train_window, share):
    inter = pd.read_csv(DATA_DIR / "tiny" / "tiny.inter", sep="\t", dtype=str)
    train_items = inter.iloc[:, 0].value_counts() - 2  # leave-one-out: two items held out per user
    total, used = int((train_items - 1).sum()), sum(share(n) for n in train_items)
    with caplog.at_level(logging.INFO):
        loaders(make_config(train_window=train_window, MAX_ITEM_LIST_LENGTH=4))
    assert f"an epoch trains on {used} of the {total} training transitions ({100 * used / total:.1f}%)" in caplog.text
