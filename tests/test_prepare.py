"""Tests of the Amazon 2018 / Recformer converters (recbole_st2si.data.prepare) on small fixture files
written here in the exact raw formats, round-tripped through RecBole's own atomic-file reader."""

import gzip
import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from recbole_st2si.data import amazon, prepare
from recbole_st2si.errors import UserInputError
from recbole_st2si.utils import create_dataset

from .conftest import DATA_DIR, write_domains

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ["Scientific", "Instruments", "Arts", "Office", "Games", "Pet", "Food", "Cell", "FoodCell"]

# Items as the consumer must rebuild them (title, brand, categories) after cleaning.
EXPECTED_ITEMS = {
    "A1": ('12" Ruler', "Acme", "Industrial & Scientific Rulers"),
    "A2": ('"Quoted" start', "", ""),
    "A3": ("Tab separated & newline", "N/A", "Lab, Safety"),
    "A4": ("Café ünïcode — 日本語, with commas", "None", "Ünï"),
    "A5": ("NA", '"Brand"', "Cat"),
    "A8": ("Line break zero", "", ""),
}
EXPECTED_SEQUENCES = {
    "U1": [("A2", 50), ("A1", 100), ("A3", 100)],
    "U2": [("A4", 10), ("A1", 20)],
    "U3": [("A5", 5), ("A8", 6), ("A2", 7), ("A3", 8)],
    "U4": [("A3", 1)],
}


def _meta_lines():
    """Meta dump lines: strict JSON and Python literals, with every kind of bad line."""
    return [
        json.dumps({"asin": "A1", "title": '12" Ruler', "brand": "Acme",
                    "category": ["Industrial &amp; Scientific", "Rulers"]}).encode(),
        repr({"asin": "A2", "title": '"Quoted" start', "brand": "", "category": []}).encode(),
        json.dumps({"asin": "A3", "title": "Tab\tseparated  &amp;\n newline", "brand": "N/A",
                    "category": ["Lab,", "Safety"]}).encode(),
        repr({"asin": "A4", "title": "Café ünïcode — 日本語, with commas", "brand": "None", "category": ["Ünï"]}).encode(),
        json.dumps({"asin": "A5", "title": "NA", "brand": '"Brand"', "category": "Cat"}).encode(),
        json.dumps({"asin": "A6", "brand": "No title"}).encode(),
        json.dumps({"asin": "A7", "title": " \t "}).encode(),
        json.dumps({"asin": "A1", "title": "Repeated asin"}).encode(),
        json.dumps({"asin": "A8", "title": "Line\r\nbreak\x00zero", "category": None}).encode(),
        b"{not json",
        b'{"asin": "A9", "title": "caf\xe9"}',
        b"",
        json.dumps({"title": "No asin"}).encode(),
    ]


def _review_lines():
    """Review dump lines: ties, a duplicate, reviews of unknown/untitled items and bad lines."""
    def review(user, asin, time):
        return json.dumps({"reviewerID": user, "asin": asin, "unixReviewTime": time, "overall": 5.0}).encode()
    return [
        review("U1", "A1", 100), review("U1", "A2", 50), review("U1", "A1", 100), review("U1", "A3", 100),
        review("U1", "A6", 60), review("U1", "A99", 70), review("U2", "A4", 10),
        repr({"reviewerID": "U2", "asin": "A1", "unixReviewTime": 20}).encode(),
        review("U3", "A5", 5), review("U3", "A8", 6), review("U3", "A2", 7), review("U3", "A3", 8),
        review("U4", "A3", 1), b"\xff\xfe garbage", b"[1, 2]", json.dumps({"reviewerID": "U5", "asin": "A1"}).encode(),
    ]


def _write_lines(path, lines, gz):
    """Write a JSON-lines fixture, gzip-compressed or plain."""
    data = b"\n".join(lines) + b"\n"
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    return str(path)


def _amazon_fixture(tmp_path, gz_reviews=False, gz_meta=True):
    """The raw fixture files; the names follow the Amazon 2018 dumps."""
    reviews = _write_lines(tmp_path / ("Sci_5.json.gz" if gz_reviews else "Sci_5.json"), _review_lines(), gz_reviews)
    meta = _write_lines(tmp_path / ("meta_Sci.json.gz" if gz_meta else "meta_Sci.json"), _meta_lines(), gz_meta)
    return reviews, meta


def _stats(printed):
    """The Table 1 statistics printed by the CLI, e.g. {"#users": "4", "density": "41.6667%"}."""
    return dict(re.findall(r"^  (#users|#items|#inters|avg\. n|density) +(\S+)$", printed, re.M))


def _read_tsv(path):
    """Rows of an atomic file, header included."""
    with open(path, encoding="utf-8") as f:
        return [line.split("\t") for line in f.read().split("\n") if line]


def _prepare_amazon(tmp_path, name="Scientific", extra=()):
    """Run the amazon subcommand on the fixture into tmp_path/data/<name>."""
    reviews, meta = _amazon_fixture(tmp_path)
    out = tmp_path / "data" / name
    prepare.main(["amazon", "--reviews", reviews, "--meta", meta, "--out", str(out), "--name", name, *extra])
    return out


def _recbole_dataset(data_path, name, **config):
    """Load written atomic files through RecBole itself, as every model does."""
    from recbole.config import Config
    from recbole.data import create_dataset

    config = Config(
        model="SASRec", dataset=name, config_file_list=[os.path.join(ROOT, "dataset_configs", "Scientific.yaml")],
        config_dict={"data_path": str(data_path), "use_gpu": False, "show_progress": False,
                     "train_neg_sample_args": None, **config},
    )
    return config, create_dataset(config)


def _item_texts(dataset, fields):
    """{asin: texts of the fields} as the consumer rebuilds them: each field's tokens joined with one space."""
    items, texts = dataset.get_item_feature(), {}
    for row in range(1, dataset.item_num):
        asin = dataset.id2token("item_id", items["item_id"][row].item())
        token_ids = [[i for i in items[field][row].tolist() if i != 0] for field in fields]
        texts[asin] = tuple(" ".join(dataset.id2token(field, ids)) for field, ids in zip(fields, token_ids))
    return texts


@pytest.mark.parametrize("gz_reviews,gz_meta", [(False, True), (True, False)])
def test_amazon_writes_cleaned_sorted_files(tmp_path, capsys, gz_reviews, gz_meta):
    reviews, meta = _amazon_fixture(tmp_path, gz_reviews, gz_meta)
    out = tmp_path / "Scientific"
    prepare.main(["amazon", "--reviews", reviews, "--meta", meta, "--out", str(out)])

    inter = _read_tsv(out / "Scientific.inter")
    assert inter[0] == ["user_id:token", "item_id:token", "timestamp:float"]
    assert inter[1:] == [[u, a, str(t)] for u, seq in EXPECTED_SEQUENCES.items() for a, t in seq]
    item = _read_tsv(out / "Scientific.item")
    assert item[0] == ["item_id:token", "title:token_seq", "brand:token_seq", "categories:token_seq"]
    assert {row[0]: tuple(field.strip() for field in row[1:]) for row in item[1:]} == EXPECTED_ITEMS
    assert sorted(os.listdir(out)) == ["Scientific.inter", "Scientific.item"]

    printed = capsys.readouterr().out
    assert _stats(printed) == {"#users": "4", "#items": "6", "#inters": "10", "avg. n": "2.50", "density": "41.6667%"}
    for count, reason in [
        (2, "meta: item without title"), (1, "meta: malformed line"), (1, "meta: line not valid UTF-8"),
        (1, "meta: repeated asin (first kept)"), (1, "meta: missing or unusable asin"),
        (1, "reviews: duplicate (user, item, time)"), (2, "reviews: unknown or untitled item"),
        (1, "reviews: line not valid UTF-8"), (1, "reviews: malformed line"),
        (1, "reviews: missing or unusable reviewerID/asin/unixReviewTime"),
    ]:
        assert f"{count:>10,}  {reason}\n" in printed


def test_amazon_files_round_trip_through_recbole(tmp_path):
    out = _prepare_amazon(tmp_path)
    _, dataset = _recbole_dataset(out.parent, "Scientific")

    assert _item_texts(dataset, ("title", "brand", "categories")) == EXPECTED_ITEMS

    # Rows come back in file order (time order, ties as in the dump; RecBole's own sort is stable).
    inter = dataset.inter_feat
    rows = list(zip(dataset.id2token("user_id", inter["user_id"].tolist()),
                    dataset.id2token("item_id", inter["item_id"].tolist()), inter["timestamp"].tolist()))
    assert rows == [(u, a, float(t)) for u, seq in EXPECTED_SEQUENCES.items() for a, t in seq]


def test_k_core_repeats_until_stable():
    sequences = {"u1": [("a", 1), ("b", 2)], "u2": [("a", 1), ("b", 2)], "u3": [("b", 1), ("c", 2)], "u4": [("c", 1), ("d", 2)]}
    assert amazon.k_core(sequences, 2) == {"u1": sequences["u1"], "u2": sequences["u2"]}


def test_recformer_style_filters(tmp_path, capsys):
    lines = [json.dumps({"asin": f"I{i}", "title": f"Item {i}"}).encode() for i in range(5)]
    meta = _write_lines(tmp_path / "meta.json.gz", lines, gz=True)
    reviews = [json.dumps({"reviewerID": f"U{u}", "asin": f"I{(u + j) % 5}", "unixReviewTime": j}).encode()
               for u in range(20) for j in range(u % 6)]
    reviews = _write_lines(tmp_path / "reviews.json", reviews, gz=False)

    def run(name, *options):
        prepare.main(["amazon", "--reviews", reviews, "--meta", meta, "--out", str(tmp_path / name), *options])
        rows = _read_tsv(tmp_path / name / f"{name}.inter")[1:]
        return {user: sum(row[0] == user for row in rows) for user, _, _ in rows}

    assert len(run("All")) == 16  # users with at least one review
    kept = run("Min4", "--min-user-inter", "4")
    assert sorted(kept.values()) == [4] * 3 + [5] * 3 and len(kept) == 6
    sampled = run("Half", "--min-user-inter", "4", "--user-fraction", "0.5", "--seed", "7")
    assert len(sampled) == 3 and set(sampled) <= set(kept)
    assert run("Again", "--min-user-inter", "4", "--user-fraction", "0.5", "--seed", "7") == sampled
    assert _stats(capsys.readouterr().out)["#users"] == "3"
    assert min(run("Core", "--k-core", "3").values()) >= 3


def _recformer_folder(tmp_path):
    """A Recformer-processed folder; returns it and the expected {user id: (train, val, test)} asins."""
    asins = [f"B00{i}" for i in range(1, 8)]
    long_train = [1 + i % 6 for i in range(55)]  # longer than MAX_ITEM_LIST_LENGTH (50), with repeats
    train = {"0": [1, 2, 3], "1": [2, 3], "2": long_train, "3": [3], "4": [4, 5], "5": [6], "6": [1, 2]}
    val = {"0": [4], "1": [1], "2": [6], "3": [2], "4": [], "5": [], "6": [3]}
    test = {"0": [5], "1": [6], "2": [1], "3": [1], "4": [], "5": [], "6": [4]}
    users = ["UA", "UB", "UC", "UD", "UE", "UF"]  # user index 6 is missing from umap
    meta = {"B001": {"title": '"Quoted" start', "brand": "N/A", "category": "Lab &amp; Tools"},
            "B002": {"title": "Two\twords", "brand": "X"}, "B003": {"title": "Three"},
            "B004": {"title": "Four, ünï"}, "B005": {"title": "Five", "category": ["A", "B"]}}
    files = {"train": train, "val": val, "test": test, "smap": {a: i for i, a in enumerate(asins, 1)},
             "umap": {u: i for i, u in enumerate(users)}, "meta_data": meta}
    folder = tmp_path / "recformer_src"
    folder.mkdir()
    for stem, content in files.items():
        (folder / f"{stem}.json").write_text(json.dumps(content), encoding="utf-8")
    expected = {users[int(k)]: tuple([asins[i - 1] for i in split[k]] for split in (train, val, test))
                for k in train if int(k) < len(users)}
    return folder, expected


def _user_targets(loader):
    """{user id: [(history item ids, target item id)]} of a RecBole dataloader's dataset, in row order."""
    dataset, rows = loader._dataset, {}
    inter = dataset.inter_feat
    for row in range(len(inter)):
        user = dataset.id2token("user_id", inter["user_id"][row].item())
        history = dataset.id2token("item_id", inter["item_id_list"][row][: inter["item_length"][row]].tolist())
        rows.setdefault(user, []).append((list(history), dataset.id2token("item_id", inter["item_id"][row].item())))
    return rows


def test_recformer_split_round_trips_through_recbole_loo(tmp_path, capsys):
    from recbole.data import data_preparation

    folder, expected = _recformer_folder(tmp_path)
    prepare.main(["recformer", "--src", str(folder), "--out", str(tmp_path / "data" / "Rec"), "--name", "Rec"])
    printed = capsys.readouterr().out
    assert _stats(printed) == {"#users": "6", "#items": "6", "#inters": "72", "avg. n": "12.00", "density": "200.0000%"}
    assert "1  recformer: users with 3 items (RecBole's LOO trains on their validation item)" in printed
    assert "2  recformer: users with fewer than 3 items (no valid/test target)" in printed
    assert "1  recformer: user with an index missing from umap/smap" in printed
    assert "1  recformer: item without meta_data entry (written with empty text)" in printed

    loo = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}
    config, dataset = _recbole_dataset(tmp_path / "data", "Rec", eval_args=loo)
    train, valid, test = (_user_targets(loader) for loader in data_preparation(config, dataset))

    for user, (train_items, val_items, test_items) in expected.items():
        sequence = train_items + val_items + test_items
        if len(sequence) >= 4:  # the Recformer split exactly
            assert [target for _, target in test[user]] == test_items
            assert [target for _, target in valid[user]] == val_items
            assert valid[user][0][0] == train_items[-50:]  # the model sees all training items before it
            assert [target for _, target in train[user]] == train_items[1:]
            assert train[user][0][0] == train_items[:1]
        elif len(sequence) == 3:  # RecBole's _split_index_by_leave_one_out: no valid row, val item trains
            assert [target for _, target in test[user]] == test_items
            assert user not in valid
            assert [target for _, target in train[user]] == train_items[1:] + val_items
        elif len(sequence) == 2:  # the only row trains
            assert train[user] == [(train_items[:1], train_items[1])]
            assert user not in valid and user not in test
        else:  # a single item makes no row at all
            assert all(user not in split for split in (train, valid, test))

    assert _item_texts(dataset, ("title",)) == {
        "B001": ('"Quoted" start',), "B002": ("Two words",), "B003": ("Three",), "B004": ("Four, ünï",),
        "B005": ("Five",), "B006": ("",),
    }


def test_merge_keeps_domains_distinct(tmp_path, capsys):
    data = tmp_path / "data"
    for domain, title in (("Food", "Apple"), ("Cell", "Phone")):
        meta = _write_lines(tmp_path / f"meta_{domain}.json", [json.dumps({"asin": "A1", "title": title}).encode(),
                                                             json.dumps({"asin": "A2", "title": "NA"}).encode()], gz=False)
        reviews = _write_lines(tmp_path / f"{domain}_5.json", [
            json.dumps({"reviewerID": "U1", "asin": a, "unixReviewTime": t}).encode() for t, a in enumerate(["A1", "A2"])], gz=False)
        prepare.main(["amazon", "--reviews", reviews, "--meta", meta, "--out", str(data / domain)])
    prepare.main(["merge", "--inputs", str(data / "Food"), str(data / "Cell"), "--out", str(data / "FoodCell")])

    inter = _read_tsv(data / "FoodCell" / "FoodCell.inter")[1:]
    assert inter == [["Food:U1", "Food:A1", "0"], ["Food:U1", "Food:A2", "1"], ["Cell:U1", "Cell:A1", "0"], ["Cell:U1", "Cell:A2", "1"]]
    assert _stats(capsys.readouterr().out) == {"#users": "2", "#items": "4", "#inters": "4", "avg. n": "2.00", "density": "50.0000%"}
    _, dataset = _recbole_dataset(data, "FoodCell")
    assert _item_texts(dataset, ("title",)) == {
        "Food:A1": ("Apple",), "Food:A2": ("NA",), "Cell:A1": ("Phone",), "Cell:A2": ("NA",),
    }


def _bad_domains(tmp_path):
    """Domains Alpha and Beta, a second Alpha elsewhere, one with a wrong header, one not in UTF-8."""
    write_domains(tmp_path, "Alpha", "Beta", "Header", "Latin")
    (tmp_path / "elsewhere").mkdir()
    write_domains(tmp_path / "elsewhere", "Alpha")
    (tmp_path / "Header" / "Header.inter").write_text("user_id:token\titem_id:token\nu1\t1\n")
    header, before = "item_id:token\ttitle:token_seq\tbrand:token_seq\tcategories:token_seq\n", "1\tcaf"
    (tmp_path / "Latin" / "Latin.item").write_bytes(f"{header}{before}\xe9\t\t\n".encode("latin-1"))
    return [
        (["Alpha", "Gamma"], f"input file not found: {tmp_path / 'Gamma' / 'Gamma.inter'}"),
        (["Alpha", "elsewhere/Alpha"], "two inputs are named Alpha: domain names must differ"),
        (["Alpha", "Header"], f"{tmp_path / 'Header' / 'Header.inter'}: header is not user_id:token item_id:token "
                              "timestamp:float (prepare it with this tool first)"),
        (["Latin", "Beta"], f"{tmp_path / 'Latin' / 'Latin.item'}: not UTF-8 text (invalid continuation byte at "
                            f"byte {len(header + before)})"),
    ]


def test_merge_domains_is_a_library_call(tmp_path):
    write_domains(tmp_path, "Alpha", "Beta")
    paths = prepare.merge_domains([tmp_path / "Alpha", tmp_path / "Beta"], tmp_path / "Both")
    assert paths == [str(tmp_path / "Both" / "Both.inter"), str(tmp_path / "Both" / "Both.item")]
    tiny = _read_tsv(DATA_DIR / "tiny" / "tiny.inter")[1:]
    assert _read_tsv(paths[0])[1:] == [[f"{domain}:{user}", f"{domain}:{item}", time]
                                       for domain in ("Alpha", "Beta") for user, item, time in tiny]


def test_merge_domains_refuses_a_bad_domain_in_one_line_and_writes_nothing(tmp_path, capsys):
    for names, message in _bad_domains(tmp_path):
        folders = [tmp_path / name for name in names]
        with pytest.raises(UserInputError) as caught:
            prepare.merge_domains(folders, tmp_path / "Merged")
        assert str(caught.value) == message and not (tmp_path / "Merged").exists()
        status, err = _exit_code(["merge", "--inputs", *map(str, folders), "--out", str(tmp_path / "Merged")], capsys)
        assert status == 2 and err == f"{prepare.PROG} merge: error: {message}\n"
        assert not (tmp_path / "Merged").exists()


def test_a_bad_domain_of_a_multi_domain_dataset_is_a_user_error(make_config, tmp_path):
    """``--dataset=A,B`` merges through the same call: a one-line error, no exit from inside the library."""
    for names, message in _bad_domains(tmp_path):
        if "/" in names[1] or names[1] == "Gamma":  # a path is no dataset name; a missing one is named first
            continue
        with pytest.raises(UserInputError) as caught:
            make_config(dataset=",".join(names), data_path=str(tmp_path))
        assert str(caught.value) == message
    with pytest.raises(UserInputError, match="^two inputs are named Alpha: domain names must differ$"):
        make_config(dataset="Alpha,Alpha", data_path=str(tmp_path))
    with pytest.raises(UserInputError, match="^dataset 'Gamma' not found: no "):
        make_config(dataset="Alpha,Gamma", data_path=str(tmp_path))


def _exit_code(argv, capsys):
    """Run main expecting a clean failure; returns (status, stderr)."""
    with pytest.raises(SystemExit) as exc:
        prepare.main(argv)
    return exc.value.code, capsys.readouterr().err


def test_bad_inputs_fail_cleanly_without_writing(tmp_path, capsys):
    reviews, meta = _amazon_fixture(tmp_path)
    out = tmp_path / "Out"
    status, err = _exit_code(["amazon", "--reviews", str(tmp_path / "nope.json.gz"), "--meta", meta, "--out", str(out)], capsys)
    assert status == 2 and "input file not found" in err and not out.exists()

    empty = _write_lines(tmp_path / "empty.json.gz", [], gz=True)
    status, err = _exit_code(["amazon", "--reviews", empty, "--meta", meta, "--out", str(out)], capsys)
    assert status == 2 and "no interactions left" in err and not out.exists()

    prepare.main(["amazon", "--reviews", reviews, "--meta", meta, "--out", str(out)])
    before = (out / "Out.inter").read_bytes()
    status, _ = _exit_code(["amazon", "--reviews", reviews, "--meta", empty, "--out", str(out)], capsys)
    assert status == 2 and (out / "Out.inter").read_bytes() == before and sorted(os.listdir(out)) == ["Out.inter", "Out.item"]

    status, err = _exit_code(["recformer", "--src", str(tmp_path), "--out", str(out)], capsys)
    assert status == 2 and "missing Recformer file" in err
    status, err = _exit_code(["amazon", "--reviews", reviews, "--meta", meta, "--out", str(out), "--user-fraction", "0"], capsys)
    assert status == 2 and "must be in (0, 1]" in err


def test_truncated_gzip_is_counted_not_fatal(tmp_path, capsys):
    reviews, meta = _amazon_fixture(tmp_path, gz_reviews=True)
    data = open(reviews, "rb").read()
    with open(reviews, "wb") as f:
        f.write(data[: len(data) - 30])
    prepare.main(["amazon", "--reviews", reviews, "--meta", meta, "--out", str(tmp_path / "Cut")])
    assert "1  reviews: file truncated or corrupt (rest of file skipped)" in capsys.readouterr().out


def test_module_entry_point_reports_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "recbole_st2si.data.prepare", "amazon", "--reviews", str(tmp_path / "r.json.gz"),
         "--meta", str(tmp_path / "m.json.gz"), "--out", str(tmp_path / "X")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "input file not found" in result.stderr and "Traceback" not in result.stderr


def test_every_dataset_config_is_checked_below():
    configs = sorted(name[: -len(".yaml")] for name in os.listdir(os.path.join(ROOT, "dataset_configs")))
    assert configs == sorted([*DATASETS, "ml-100k"])


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_config_applies_to_a_dataset_of_its_name(name, make_config, tmp_path):
    """The package's dataset config is applied by the dataset's name alone, after the models' own
    defaults: its columns are loaded, its text field, the title, becomes each item's text, FDSA and
    S3Rec get the Amazon features instead of their MovieLens ``class``; the shared protocol stays."""
    write_domains(tmp_path, name)
    config = make_config(dataset=name, data_path=str(tmp_path))
    assert config["load_col"] == {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title", "brand", "categories"]}
    assert config["text_fields"] == ["title"]
    assert make_config(model="FDSA", dataset=name, data_path=str(tmp_path))["selected_features"] == ["brand", "categories"]
    assert make_config(model="S3Rec", dataset=name, data_path=str(tmp_path))["item_attribute"] == "categories"
    assert config["metrics"] == ["Recall", "NDCG", "MRR", "Hit"] and config["topk"] == [10]
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"} and config["eval_args"]["order"] == "TO"
    dataset = create_dataset(config)
    assert set(dataset.item_feat.columns) == {"item_id", "title", "brand", "categories"}
    lines = (DATA_DIR / "tiny" / "tiny.item").read_text().splitlines()[1:]
    titles = {line.split("\t")[0]: line.split("\t")[1] for line in lines}
    texts = dataset.item_texts()
    assert {token: texts[dataset.field2token_id["item_id"][token]] for token in titles} == {
        token: [title] for token, title in titles.items()
    }


def test_ml_100k_config_applies_to_recboles_bundled_ml_100k(make_config):
    """MovieLens columns: the movie title is the text, the genres FDSA's feature and S3Rec's attribute,
    and the tuned rate of the frozen-backbone ILP."""
    config = make_config(dataset="ml-100k", train_stage="ilp")  # RecBole reads its own copy, whatever data_path says
    assert config["load_col"] == {"inter": ["user_id", "item_id", "rating", "timestamp"],
                                  "item": ["item_id", "movie_title", "release_year", "class"]}
    assert config["text_fields"] == ["movie_title"] and config["ilp_learning_rate"] == pytest.approx(1e-3)
    assert config["selected_features"] == ["class"] and config["item_attribute"] == "class"  # not ST2SI defaults
    dataset = create_dataset(config)
    items = pd.read_csv(os.path.join(config["data_path"], "ml-100k.item"), sep="\t", dtype=str, keep_default_na=False)
    titles = dict(zip(items["item_id:token"], items["movie_title:token_seq"]))
    texts = dataset.item_texts()
    assert {token: texts[dataset.field2token_id["item_id"][token]] for token in titles} == {
        token: [title] for token, title in titles.items()
    }
