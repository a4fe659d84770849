"""Tests of the UniSRec converter (``prepare unisrec``) on small UniSRec-format folders written here:
rows out of order, lists cut to 50 items, so that the histories must be chained; the written files
read back through RecBole's leave-one-out split in time order give the folder's own rows."""

import os
import random

import pytest
from recbole.data import data_preparation

from recbole_st2si.data import prepare, unisrec

from .test_prepare import _exit_code, _recbole_dataset, _stats, _user_targets

LOO = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}
TEXTS = {
    "B0": '"Quoted" title, 3 in. x 5 ft. Industrial & Scientific Tapes Duct Tape. J.V. Converting. ',
    "B1": "Plain item. Industrial & Scientific Lab Glassware. Acme. ",
    "B2": "No category here. . Brand Two. ",
    "B3": "Mr. Heater Connector. Industrial & Scientific Fittings. Mr. Heater. ",
    "B4": "Only a title without fields",
}
EXPECTED_FIELDS = {  # (title, brand, categories), as a reader joins each field's tokens again
    "B0": ('"Quoted" title, 3 in. x 5 ft', "J.V. Converting", "Industrial & Scientific Tapes Duct Tape"),
    "B1": ("Plain item", "Acme", "Industrial & Scientific Lab Glassware"),
    "B2": ("No category here", "Brand Two", ""),
    "B3": ("Mr. Heater Connector", "Mr. Heater", "Industrial & Scientific Fittings"),
    "B4": ("Only a title without fields", "", ""),
}
HISTORIES = {  # user -> item indices in time order; U0 is longer than 51 items and repeats items
    "U0": random.Random(1).choices(range(5), k=60),
    "U1": [1, 2, 3, 2],
    "U2": [4, 0, 4, 1, 2],
}


def write_unisrec(folder, histories=HISTORIES, texts=TEXTS, stem="Sci", shuffle=True, max_items=50):
    """A UniSRec folder for ``histories``: one training row per target from the second item to the third
    last, the validation and test rows, lists cut to ``max_items``, training rows shuffled."""
    folder.mkdir(parents=True, exist_ok=True)
    asins = list(texts)
    users = list(histories)
    rows = {"train": [], "valid": [], "test": []}
    for user, items in histories.items():
        for target in range(1, len(items)):
            split = "test" if target == len(items) - 1 else "valid" if target == len(items) - 2 else "train"
            rows[split].append((users.index(user), items[max(0, target - max_items):target], items[target]))
    if shuffle:
        random.Random(0).shuffle(rows["train"])
    for split, lines in rows.items():
        body = "".join(f"{u}\t{' '.join(map(str, items))}\t{t}\n" for u, items, t in lines)
        (folder / f"{stem}.{split}.inter").write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n" + body)
    (folder / f"{stem}.text").write_text("item_id:token\ttext:token_seq\n" + "".join(f"{a}\t{t}\n" for a, t in texts.items()))
    (folder / f"{stem}.item2index").write_text("".join(f"{a}\t{i}\n" for i, a in enumerate(asins)))
    (folder / f"{stem}.user2index").write_text("".join(f"{u}\t{i}\n" for i, u in enumerate(users)))
    return folder, rows


def _published(rows, split, histories=HISTORIES, asins=tuple(TEXTS)):
    """{user: [(list, target)]} of a split's rows as raw ids."""
    users = list(histories)
    return {users[u]: [([asins[i] for i in items], asins[t])] for u, items, t in rows[split]}


def test_histories_are_chained_and_the_split_comes_back(tmp_path, capsys):
    folder, rows = write_unisrec(tmp_path / "src")
    prepare.main(["unisrec", "--src", str(folder), "--out", str(tmp_path / "data" / "Sci"), "--name", "Sci"])
    assert _stats(capsys.readouterr().out) == {"#users": "3", "#items": "5", "#inters": "69", "avg. n": "23.00",
                                               "density": "460.0000%"}
    inter = (tmp_path / "data" / "Sci" / "Sci.inter").read_text().splitlines()[1:]
    asins = list(TEXTS)
    assert [line.split("\t") for line in inter] == [
        [user, asins[item], str(position)] for user, items in HISTORIES.items() for position, item in enumerate(items)
    ]  # U0's ten oldest items too, which no row's list holds any more

    config, dataset = _recbole_dataset(tmp_path / "data", "Sci", eval_args=LOO)
    train, valid, test = (_user_targets(loader) for loader in data_preparation(config, dataset))
    assert valid == _published(rows, "valid") and test == _published(rows, "test")
    trained = sorted((user, tuple(items), target) for user, pairs in train.items() for items, target in pairs)
    asins, users = list(TEXTS), list(HISTORIES)
    assert trained == sorted((users[u], tuple(asins[i] for i in items), asins[t]) for u, items, t in rows["train"])


def test_text_fields_are_told_apart_by_the_category_path(tmp_path):
    folder, _ = write_unisrec(tmp_path / "src")
    prepare.main(["unisrec", "--src", str(folder), "--out", str(tmp_path / "data" / "Sci")])
    _, dataset = _recbole_dataset(tmp_path / "data", "Sci")
    items = dataset.get_item_feature()
    fields = ("title", "brand", "categories")
    read = {}
    for row in range(1, dataset.item_num):
        asin = dataset.id2token("item_id", items["item_id"][row].item())
        read[asin] = tuple(" ".join(dataset.id2token(f, [i for i in items[f][row].tolist() if i])) for f in fields)
    assert read == EXPECTED_FIELDS


def test_root_category_is_the_prefix_most_paths_share():
    texts = [f"T{i}. Root Cat Sub{i} Leaf. B{i}. " for i in range(5)] + ["X. Other. Y. "]
    assert unisrec.root_category(texts) == "Root Cat"


def test_chain_follows_each_row_to_the_next_and_refuses_a_gap():
    assert unisrec.chain_history([([0], 1), ([1], 2)], ([0, 1, 2], 3), ([0, 1, 2, 3], 4), 50) is None
    assert unisrec.chain_history([([0], 1), ([0, 1], 2)], ([0, 1, 2], 3), ([0, 1, 2, 3], 4), 50) == [0, 1, 2, 3, 4]


def _corrupt(folder, stem, suffix, edit):
    path = folder / f"{stem}.{suffix}"
    path.write_text(edit(path.read_text()))


@pytest.mark.parametrize("damage,message", [
    (lambda f: os.remove(f / "Sci.text"), "missing UniSRec file"),
    (lambda f: _corrupt(f, "Sci", "text", lambda t: t.replace("B3\t", "B9\t")), "item index 3 has no text"),
    (lambda f: _corrupt(f, "Sci", "train.inter", lambda t: t.replace("2\t4 0\t4\n", "2\t4 0\t1\n")),
     "do not chain"),
    (lambda f: _corrupt(f, "Sci", "valid.inter", lambda t: t.rsplit("\n", 2)[0] + "\n"), "validation"),
    (lambda f: _corrupt(f, "Sci", "test.inter", lambda t: t + "0\tx y\t1\n"), "line 5"),
])
def test_bad_folders_fail_in_one_line_without_writing(tmp_path, capsys, damage, message):
    folder, _ = write_unisrec(tmp_path / "src")
    damage(folder)
    out = tmp_path / "data" / "Sci"
    status, err = _exit_code(["unisrec", "--src", str(folder), "--out", str(out)], capsys)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
