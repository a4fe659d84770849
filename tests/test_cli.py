"""The command line end to end, backbone loading, and what users see for bad input."""

import ast
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recbole_st2si.backbone import hidden_size, load_backbone, load_tokenizer
from recbole_st2si.errors import UserInputError
from recbole_st2si.utils import create_dataset

from .conftest import DATA_DIR

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd):
    command = [sys.executable, str(ROOT / "run_recbole_st2si.py"), *args, "--show_progress=False"]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def parse_test_results(output):
    match = re.search(r"^test result: (\{.*\})$", output, re.MULTILINE)
    assert match, output[-2000:]
    return ast.literal_eval(match.group(1))  # a dict of floats printed by the CLI


# Test metrics of one seeded epoch on the tiny dataset (seed 2020, RecBole's default), as the code
# before dispatch by name and the trainer-held feature cache printed them, rounded to 4 places (float32:
# bf16 autocast, the default on CPUs that have it, rounds otherwise).
@pytest.mark.parametrize(
    "model, extra, expected",
    [
        ("ST2SI", ["--llm_path=tiny-random", "--train_stage=full", "--mixed_precision=no"],
         {"recall@10": 0.3333, "ndcg@10": 0.124, "mrr@10": 0.0638, "hit@10": 0.3333}),
        ("SASRec", [], {"recall@10": 0.4333, "ndcg@10": 0.1587, "mrr@10": 0.0792, "hit@10": 0.4333}),
    ],
)
def test_cli_trains_and_tests_on_the_tiny_dataset(model, extra, expected, tmp_path):
    result = run_cli(
        f"--model={model}", "--dataset=tiny", f"--data_path={DATA_DIR}", "--epochs=1",
        f"--checkpoint_dir={tmp_path}", *extra, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert parse_test_results(result.stdout) == pytest.approx(expected, abs=1e-4)
    assert list(tmp_path.glob(f"{model}-*.pth")), "the best checkpoint is written and reloaded for the test"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset=no-such-data"], "dataset 'no-such-data' not found"),
        (["--dataset=tiny", "--llm_path=/no/such/model"], "could not load the tokenizer"),
        (["--dataset=tiny", "--text_fields=['colour']"], "has no item field(s) ['colour']"),
        (["--model=NoSuchModel", "--dataset=tiny"], "unknown model 'NoSuchModel'"),
        (["--dataset=tiny", "epochs=2"], "unrecognized argument 'epochs=2'"),
        (["--dataset=tiny", "--learning_rate=-1", "--epochs=0"], "error: epochs must be an integer >= 1, got 0\n"
                                                                 "error: learning_rate must be a number > 0, got -1"),
        (["--dataset=tiny", "--learnig_rate=1e-3"], "unknown setting learnig_rate (from the command line or "
                                                    "config_dict); did you mean learning_rate"),
        (["--dataset=tiny", "--resume=True", "--checkpoint_file=none.pth"], "--resume: none.pth does not exist"),
        (["--dataset=tiny", "--resume=True"], "resume needs the checkpoint of an interrupted run: --checkpoint_file"),
        (["--dataset=Food,Cell", "--train_stage=pretrain"], "dataset 'Food' not found"),
        (["--dataset=tiny", "--learner=sgd"], "error: learner is not used by ST2SI (it trains with AdamW): remove it\n"),
    ],
)
def test_cli_reports_user_errors_in_one_line(args, message, tmp_path):
    result = run_cli(f"--data_path={DATA_DIR}", *args, cwd=tmp_path)
    assert result.returncode != 0
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert "prepare merge" not in result.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: 2\nmetrics: [Recall, NDCG\ntopk: 10\n",
         "error: config file bad.yaml, line 3, column 5: expected ',' or ']', but got ':'\n"),
        ("- epochs: 2\n- topk: 10\n",
         "error: config file bad.yaml holds a list, not settings: write one `name: value` per line\n"),
    ],
)
def test_a_config_file_that_is_not_yaml_settings_is_one_line_naming_it(text, message, tmp_path):
    (tmp_path / "bad.yaml").write_text(text)
    result = run_cli(f"--data_path={DATA_DIR}", "--dataset=tiny", "--config_files=bad.yaml", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, message)


def test_backbone_from_a_local_directory(tiny_backbone_dir):
    tokenizer, query_id = load_tokenizer(str(tiny_backbone_dir), ".")
    assert tokenizer.convert_ids_to_tokens(query_id) == "."  # in-vocabulary: used as it is
    model = load_backbone(str(tiny_backbone_dir), tokenizer)
    assert hidden_size(model) == 32 and model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_new_query_token_is_added_and_embeddings_resized(tiny_backbone_dir):
    tokenizer, query_id = load_tokenizer(str(tiny_backbone_dir), "[Q]")
    plain, _ = load_tokenizer(str(tiny_backbone_dir), ".")
    assert len(tokenizer) == len(plain) + 1 and query_id == len(plain)
    assert tokenizer.encode("red [Q]", add_special_tokens=False)[-1] == query_id
    assert load_backbone(str(tiny_backbone_dir), tokenizer).get_input_embeddings().num_embeddings == len(tokenizer)


def test_unknown_llm_path_names_what_was_tried():
    with pytest.raises(UserInputError, match="no/such-model-xyz"):
        load_tokenizer("no/such-model-xyz", ".")
    with pytest.raises(UserInputError, match="no such GGUF file"):
        load_tokenizer("/tmp/missing.gguf", ".")


@pytest.mark.slow
def test_embedded_backbone_loads_offline_and_reads_text():
    tokenizer, query_id = load_tokenizer("embedded", ".")
    model = load_backbone("embedded", tokenizer)
    assert hidden_size(model) == 576 and tokenizer.decode([query_id]) == "."
    ids = torch.tensor([tokenizer.encode("Toy Story.", add_special_tokens=False)])
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
    assert hidden.shape == (1, ids.shape[1], 576) and torch.isfinite(hidden).all()


def write_dataset(folder, item_lines, inter_lines):
    folder.mkdir(parents=True)
    (folder / f"{folder.name}.item").write_text("\n".join(item_lines) + "\n")
    (folder / f"{folder.name}.inter").write_text("\n".join(inter_lines) + "\n")


def test_items_without_title_are_removed_with_a_count(make_config, tmp_path, caplog):
    source = DATA_DIR / "tiny"
    items = (source / "tiny.item").read_text().splitlines()
    items[5] = "5\t\tbrand1"  # item 5: empty title
    inters = (source / "tiny.inter").read_text().splitlines() + ["u1\t99\t1100"]  # item 99: no .item row
    write_dataset(tmp_path / "holes", items, inters)
    with caplog.at_level(logging.WARNING):
        dataset = create_dataset(make_config(dataset="holes", data_path=str(tmp_path)))
    assert "5" not in dataset.field2id_token["item_id"] and "99" not in dataset.field2id_token["item_id"]
    removed_with_5 = sum(1 for line in inters[1:] if line.split("\t")[1] == "5")
    assert dataset.inter_num == len(inters) - 1 - removed_with_5 - 1
    assert f"removed 1 items with an empty 'title' and {removed_with_5 + 1} interactions" in caplog.text
