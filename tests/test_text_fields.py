"""Item texts from token and float fields with missing values, and list settings on the command line."""

import pytest

from recbole_st2si.command_line import parse_overrides
from recbole_st2si.utils import create_config, create_dataset

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
