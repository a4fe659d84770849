"""Shared fixtures: the checked-in tiny dataset and a tiny backbone built in-process."""

import os
import re

# Tests never reach a model hub: without this a Hugging Face id that is not cached is retried
# against the network with back-off (minutes where connections hang instead of failing). Set
# before transformers is imported, here and in the runs the tests start as subprocesses.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from recbole_st2si.backbone import tiny_random_decoder
from recbole_st2si.utils import create_config

DATA_DIR = Path(__file__).parent / "data"
PROMPT_WORDS = "Please give the index of following item :".split()


def without_colours(log_text):
    """A log as it reads: RecBole colours some words of its lines with terminal escape codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", log_text)


def _vocabulary():
    words = set(PROMPT_WORDS) | {"."}
    for line in (DATA_DIR / "tiny" / "tiny.item").read_text().splitlines()[1:]:
        _, title, brand = line.split("\t")
        words |= set(title.split()) | {brand}
    return ["[PAD]", "[UNK]"] + sorted(words)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    """A word-level tokenizer and a 2-layer Llama decoder (hidden 32), saved like any HF model."""
    folder = tmp_path_factory.mktemp("tiny_backbone")
    vocab = {word: index for index, word in enumerate(_vocabulary())}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    torch.manual_seed(0)
    tiny_random_decoder(len(vocab), hidden=32).save_pretrained(folder)
    return folder


def tiny_settings(backbone_dir, checkpoint_dir, **overrides):
    """Config entries for ST2SI on the tiny dataset and a tiny backbone, trained in float32 so that
    results compare exactly with references (bf16 autocast on a CPU is tested on its own)."""
    entries = {
        "mixed_precision": "no",
        "data_path": str(DATA_DIR),
        "llm_path": str(backbone_dir),
        "train_stage": "full",
        "show_progress": False,
        "checkpoint_dir": str(checkpoint_dir),
        "MAX_ITEM_LIST_LENGTH": 10,
        "epochs": 1,
        "seed": 7,
    }
    entries.update(overrides)
    return entries


@pytest.fixture
def settings(tiny_backbone_dir, tmp_path):
    """``settings(**overrides)``: :func:`tiny_settings` with checkpoints under the test's folder."""

    def build(**overrides):
        return tiny_settings(tiny_backbone_dir, tmp_path / "saved", **overrides)

    return build


@pytest.fixture
def make_config(settings):
    """``make_config(model="ST2SI", dataset="tiny", **overrides)``: a RecBole config from :func:`settings`."""

    def build(model="ST2SI", dataset="tiny", **overrides):
        return create_config(model, dataset, config_dict=settings(**overrides))

    return build


def write_domains(folder, *names):
    """Prepared domains under ``folder``, each a copy of the tiny dataset (its ids collide on purpose)."""
    source = DATA_DIR / "tiny"
    item_lines = (source / "tiny.item").read_text().splitlines()
    for name in names:
        domain = folder / name
        domain.mkdir()
        domain.joinpath(f"{name}.item").write_text(
            "item_id:token\ttitle:token_seq\tbrand:token_seq\tcategories:token_seq\n"
            + "".join(f"{line}\t\n" for line in item_lines[1:])
        )
        domain.joinpath(f"{name}.inter").write_text((source / "tiny.inter").read_text())
