"""Item texts from token and float fields with missing values, atomic files read as written, and list
settings on the command line."""

import pytest

from recbole_st2si.command_line import parse_overrides
from recbole_st2si.utils import create_config, create_dataset

from .test_cli import run_cli

# raw item id -> (title, maker, price); "" is a missing value
ITEMS = {
    "1": ("blue lamp", "acme", "12.5"),
    "2": ("green lamp", "", "3"),
    "3": ("red chair", "zenith", "0.25"),
    "4": ("oak table", "", ""),
    "5": ("tall clock", "acme", "40"),
    "6": ("small kettle", "zenith", "2.5"),
}
EXPECTED_TEXTS = {
    "1": ["blue lamp", " maker: acme", " price: 12.5"],
    "2": ["green lamp", " price: 3"],
    "3": ["red chair", " maker: zenith", " price: 0.25"],
    "4": ["oak table"],  # RecBole would fill the price with the mean
    "5": ["tall clock", " maker: acme", " price: 40"],
    "6": ["small kettle", " maker: zenith", " price: 2.5"],
}


def write_items(folder, name, titles):
    """Dataset ``name``: items with ``titles`` (a dict raw id -> the title's text in the file) and
    three users who each saw four of them."""
    dataset = folder / name
    dataset.mkdir()
    dataset.joinpath(f"{name}.item").write_text(
        "item_id:token\ttitle:token_seq\n" + "".join(f"{item}\t{title}\n" for item, title in titles.items())
    )
    sequences = {"u1": "5 2 6 1", "u2": "4 3 5 2", "u3": "1 6 4 3"}
    dataset.joinpath(f"{name}.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n"
        + "".join(
            f"{user}\t{item}\t{time}\n" for user, items in sequences.items() for time, item in enumerate(items.split())
        )
    )


def write_shop(folder):
    """A dataset whose .item has a token field with missing values and a float field."""
    shop = folder / "shop"
    shop.mkdir()
    shop.joinpath("shop.item").write_text(
        "item_id:token\ttitle:token_seq\tmaker:token\tprice:float\n"
        + "".join(f"{item}\t{title}\t{maker}\t{price}\n" for item, (title, maker, price) in ITEMS.items())
    )
    # items first appear out of order, so internal ids differ from raw ids
    sequences = {"u1": "5 2 6 1", "u2": "4 3 5 2", "u3": "1 6 4 3"}
    shop.joinpath("shop.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n"
        + "".join(
            f"{user}\t{item}\t{time}\n" for user, items in sequences.items() for time, item in enumerate(items.split())
        )
    )


def test_token_field_with_missing_values_and_float_field(make_config, tmp_path):
    write_shop(tmp_path)
    config = make_config(dataset="shop", data_path=str(tmp_path), text_fields=["title", "maker", "price"])
    dataset = create_dataset(config)
    texts = dataset.item_texts()
    item_ids = dataset.field2token_id[dataset.iid_field]
    assert {item: texts[item_ids[item]] for item in ITEMS} == EXPECTED_TEXTS
    assert texts[0] == [] and len(texts) == len(ITEMS) + 1


@pytest.mark.parametrize(
    "argument, expected",
    [
        ("--text_fields=[title,brand]", ["title", "brand"]),
        ("--text_fields=title,brand", ["title", "brand"]),
        ("--text_fields=\"['title', 'brand']\"", ["title", "brand"]),  # quotes kept, as without a shell
        ("--text_fields=['title', 'brand']", ["title", "brand"]),  # as a shell passes the line above
        ("--text_fields=title", ["title"]),
    ],
)
def test_command_line_list_forms(argument, expected, settings):
    config = create_config("ST2SI", "tiny", config_dict={**settings(), **parse_overrides([argument])})
    assert config["text_fields"] == expected


def test_every_list_setting_accepts_bare_names(settings):
    arguments = ["--lora_target_modules=q_proj, v_proj", "--metrics=[Recall,NDCG]", "--topk=5,10"]
    config = create_config("ST2SI", "tiny", config_dict={**settings(), **parse_overrides(arguments)})
    assert config["lora_target_modules"] == ["q_proj", "v_proj"]
    assert config["metrics"] == ["Recall", "NDCG"] and config["topk"] == [5, 10]


# titles that pandas' CSV rules would change: quotes, NA words
TITLES_AS_WRITTEN = {"1": '"Weird Al" polka', "2": 'the "best" lamp', "3": "NA", "4": '"', "5": "None", "6": 'plain "quote'}


def test_atomic_files_are_read_as_written_for_st2si_and_recbole_models(make_config, tmp_path):
    write_items(tmp_path, "quoted", TITLES_AS_WRITTEN)
    st2si = create_dataset(make_config(dataset="quoted", data_path=str(tmp_path), text_fields=["title"]))
    item_ids = st2si.field2token_id[st2si.iid_field]
    assert {item: st2si.item_texts()[item_ids[item]] for item in TITLES_AS_WRITTEN} == {
        item: [title] for item, title in TITLES_AS_WRITTEN.items()
    }
    sasrec = create_dataset(make_config(model="SASRec", dataset="quoted", data_path=str(tmp_path),
                                        load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}))
    words = {word for title in TITLES_AS_WRITTEN.values() for word in title.split()}
    assert set(sasrec.field2id_token["title"]) == {"[PAD]"} | words


def test_a_row_with_more_fields_than_the_header_is_one_line_naming_the_file_and_line(tmp_path):
    write_items(tmp_path, "tabbed", {"1": "blue lamp", "2": "green\tlamp", **{item: "lamp" for item in "3456"}})
    result = run_cli("--model=SASRec", "--dataset=tabbed", f"--data_path={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: {tmp_path}/tabbed/tabbed.item, line 3: 3 fields, but the header has 2: a field holds the field "
        "separator '\\t' (write it as a space)")
