"""Serving a saved run: top-k for users and new histories, clear errors, incremental ST2SI updates."""

import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from recbole.data.interaction import Interaction
from transformers import AutoTokenizer

from recbole_st2si.backbone import tiny_random_decoder
from recbole_st2si.errors import UserInputError
from recbole_st2si.model import ST2SI
from recbole_st2si.quick_start import run_recbole_st2si
from recbole_st2si.recommend import load_recommender, main
from recbole_st2si.run_files import RunFiles, load_checkpoint
from recbole_st2si.safe_io import load_checked, save_checked
from recbole_st2si.serving.recommender import EMPTY_HISTORY
from recbole_st2si.serving.sessions import encode_history, extend_histories
from recbole_st2si.utils import create_dataset
from tests.conftest import DATA_DIR, tiny_settings

NARROW_BACKBONE = "narrow"
"""The ``llm_path`` of a run on :func:`narrow_backbone_dir`'s backbone."""

RUNS = {
    "SASRec": ("SASRec", {}),
    "GRU4Rec": ("GRU4Rec", {}),
    "BERT4Rec": ("BERT4Rec", {}),
    "FDSA": ("FDSA", {"selected_features": ["title", "brand"]}),  # a token_seq and a token feature
    "S3Rec": ("S3Rec", {"item_attribute": "brand"}),
    "ST2SI-ilp": ("ST2SI", {"train_stage": "ilp"}),
    "ST2SI-full": ("ST2SI", {}),
    "ST2SI-lora": ("ST2SI", {"train_stage": "lora", "lora_target_modules": ["q_proj", "v_proj"]}),
    # frozen weights that no checkpoint holds and serving draws again from the run's seed
    "ST2SI-tiny-random": ("ST2SI", {"train_stage": "ilp", "llm_path": "tiny-random"}),
    "ST2SI-query-token": ("ST2SI", {"train_stage": "ilp", "query_token": "[Q]", "llm_path": NARROW_BACKBONE}),
}


def train(model, dataset, entries):
    """One run of ``model``; S3Rec's fine-tuning starts from a pre-training run of one epoch, whose
    file is removed afterwards: serving needs only the run's checkpoint and serving file."""
    if model != "S3Rec":
        return run_recbole_st2si(model, dataset, config_dict=entries)
    pretraining = {**entries, "train_stage": "pretrain", "pretrain_epochs": 1, "save_step": 1}
    pretrained = run_recbole_st2si(model, dataset, config_dict=pretraining, saved=False)["trainer"].saved_model_file
    result = run_recbole_st2si(model, dataset, config_dict={**entries, "train_stage": "finetune", "pre_model_path": pretrained})
    Path(pretrained).unlink()
    return result


@pytest.fixture(scope="module")
def narrow_backbone_dir(tiny_backbone_dir, tmp_path_factory):
    """The tiny backbone 16 wide, narrower than its vocabulary: transformers then draws a new token's
    embedding row at random (from the other rows' mean and covariance), not as their mean."""
    folder = tmp_path_factory.mktemp("narrow_backbone")
    shutil.copytree(tiny_backbone_dir, folder, dirs_exist_ok=True)
    torch.manual_seed(2)
    tiny_random_decoder(len(AutoTokenizer.from_pretrained(folder)), hidden=16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def saved_runs(tiny_backbone_dir, narrow_backbone_dir, tmp_path_factory):
    """Each model of :data:`RUNS` trained for one epoch on the tiny dataset: its checkpoint and trained model."""
    folder = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, (model, overrides) in RUNS.items():
        if overrides.get("llm_path") == NARROW_BACKBONE:
            overrides = {**overrides, "llm_path": str(narrow_backbone_dir)}
        entries = tiny_settings(tiny_backbone_dir, folder / name, feature_cache_dir=str(folder / "cache"), **overrides)
        result = train(model, "tiny", entries)
        runs[name] = (result["trainer"].saved_model_file, result["trainer"].model.eval(), result["config"])
    return runs


@pytest.fixture(scope="module")
def other_runs(tiny_backbone_dir, tmp_path_factory):
    """SASRec runs other than ``saved_runs``' own: on the tiny dataset with another seed (the same
    items), and on ``filtered``, a copy of it with a user file, one more item ('41', seen by u1 and
    u2) and two more users: 'lonely', whose only items (seen by nobody else) the item filter drops,
    and 'solo', with a single item."""
    folder = tmp_path_factory.mktemp("other_runs")
    dataset = folder / "data" / "filtered"
    dataset.mkdir(parents=True)
    items = "".join(f"{item}\tspare lamp\tbrand1\n" for item in (41, 98, 99))
    (dataset / "filtered.item").write_text((DATA_DIR / "tiny" / "tiny.item").read_text() + items)
    extra = "u1\t41\t90000\nu2\t41\t90000\nlonely\t98\t5000\nlonely\t99\t5001\nsolo\t3\t5002\n"
    (dataset / "filtered.inter").write_text((DATA_DIR / "tiny" / "tiny.inter").read_text() + extra)
    users = sorted({line.split("\t")[0] for line in (dataset / "filtered.inter").read_text().splitlines()[1:]})
    (dataset / "filtered.user").write_text("user_id:token\tage:float\n" + "".join(f"{user}\t30\n" for user in users))
    same_items = tiny_settings(tiny_backbone_dir, folder / "same-items", seed=8)
    filtered = tiny_settings(tiny_backbone_dir, folder / "filtered", data_path=str(folder / "data"),
                             item_inter_num_interval="[2,inf)")
    return {
        "same item count": train("SASRec", "tiny", same_items)["trainer"].saved_model_file,
        "another dataset": train("SASRec", "filtered", filtered)["trainer"].saved_model_file,
    }


def cli_error(capsys, argv):
    """The one line the command line prints for a mistake, after checking that it exits with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert error.startswith("error: ") and "\n" not in error
    return error


def tiny_histories():
    """Each user's raw item ids in time order, read from the atomic file."""
    with open(DATA_DIR / "tiny" / "tiny.inter") as file:
        rows = sorted(csv.DictReader(file, delimiter="\t"), key=lambda row: float(row["timestamp:float"]))
    histories = {}
    for row in rows:
        histories.setdefault(row["user_id:token"], []).append(row["item_id:token"])
    return histories


def reference_top_k(model, config, histories, k, exclude_history=False):
    """Top-k by the trained model's own full-ranking scores, history items dropped in a plain loop."""
    dataset = create_dataset(config)
    windows = [[int(dataset.token2id(dataset.iid_field, item)) for item in history[-10:]] for history in histories]
    seq = torch.zeros(len(windows), 10, dtype=torch.long)
    for row, window in enumerate(windows):
        seq[row, : len(window)] = torch.tensor(window)
    interaction = Interaction({"item_id_list": seq, "item_length": torch.tensor([len(w) for w in windows])})
    with torch.no_grad():
        scores = model.full_sort_predict(interaction).view(len(windows), -1)
    expected_items, expected_scores = [], []
    for row, history in enumerate(histories):
        ranked = [item for item in scores[row].argsort(descending=True).tolist() if item]
        ranked = [item for item in ranked if not (exclude_history and dataset.id2token(dataset.iid_field, item) in history)]
        expected_items.append([dataset.id2token(dataset.iid_field, item) for item in ranked[:k]])
        expected_scores.append(scores[row, ranked[:k]].tolist())
    return expected_items, expected_scores


@pytest.mark.parametrize("run", list(RUNS))
def test_saved_run_ranks_known_users_and_new_histories_like_the_trained_model(saved_runs, run):
    model_file, trained, config = saved_runs[run]
    recommender = load_recommender(model_file)
    histories = tiny_histories()
    users = ["u1", "u7", "u30"]
    assert [recommender.user_history(user) for user in users] == [histories[user] for user in users]

    new_histories = [["1", "2", "3"], ["17"], [str(item) for item in range(20, 35)][-10:]]
    for exclude in (False, True):
        top = recommender.recommend(new_histories, k=5, exclude_history=exclude)
        expected_items, expected_scores = reference_top_k(trained, config, new_histories, 5, exclude)
        assert top.items == expected_items
        assert top.scores == [pytest.approx(row, abs=1e-4) for row in expected_scores]
        if exclude:
            assert all(not set(items) & set(history) for items, history in zip(top.items, new_histories))

    by_user = recommender.recommend_users(users, k=5)  # the most recent 10 items, as in training
    assert by_user.items == reference_top_k(trained, config, [histories[user] for user in users], 5)[0]


def test_incremental_session_of_a_saved_st2si_matches_a_fresh_recommendation(saved_runs):
    recommender = load_recommender(saved_runs["ST2SI-ilp"][0])
    history = [str(item) for item in range(3, 18)]
    session = recommender.session(history[:2])
    for item in history[2:]:
        session.add(item)
        fresh = recommender.recommend([history[: history.index(item) + 1]], k=5, exclude_history=True, truncate=True)
        incremental = session.recommend(k=5, exclude_history=True)
        assert incremental.items == fresh.items
        assert incremental.scores[0] == pytest.approx(fresh.scores[0], abs=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--user", "nobody"], "unknown user 'nobody'"),
        (["--history", "1,999"], "unknown item id '999'"),
        (["--history", ",".join(str(item) for item in range(1, 12))], "the history has 11 items; this model reads at most 10"),
        (["--user", "u1", "--topk", "41"], "topk must be between 1 and the number of items, 40; got 41"),
    ],
)
def test_bad_requests_are_one_line_errors_with_status_2(saved_runs, capsys, args, message):
    assert message in cli_error(capsys, ["--model_file", str(saved_runs["ST2SI-ilp"][0]), *args])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--user", "u1", "--topk", "0"], "topk must be at least 1; got 0"),
        (["--history", "1,2", "--topk=-3"], "topk must be at least 1; got -3"),
        (["--history", ","], EMPTY_HISTORY),
        (["--history", " , "], EMPTY_HISTORY),
    ],
)
def test_mistakes_of_the_request_itself_are_refused_before_the_model_is_read(tmp_path, capsys, args, message):
    """The model file does not even exist: reading it first would report that instead."""
    start = time.perf_counter()
    assert message in cli_error(capsys, ["--model_file", str(tmp_path / "never-saved.pth"), *args])
    assert time.perf_counter() - start < 2


def test_a_user_whose_items_were_all_filtered_out_is_one_line(other_runs, capsys):
    model_file = str(other_runs["another dataset"])
    for user in ("lonely", "solo"):
        error = cli_error(capsys, ["--model_file", model_file, "--user", user])
        assert f"user {user!r} has no history in the training data: fewer than two of its items are left" in error
    assert load_recommender(model_file).user_history("u1")[-1] == "41"  # the other users are served


@pytest.mark.parametrize("other", ["another dataset", "same item count"])
def test_a_checkpoint_of_another_run_beside_this_serving_file_is_refused(saved_runs, other_runs, tmp_path, capsys, other):
    files = RunFiles.of(saved_runs["SASRec"][0])
    swapped = RunFiles.of(tmp_path / files.checkpoint.name)
    shutil.copy(files.serving, swapped.serving)
    shutil.copy(other_runs[other], swapped.checkpoint)
    own, foreign = (load_checkpoint(path)["state_dict"] for path in (files.checkpoint, swapped.checkpoint))
    same_shapes = {name: tensor.shape for name, tensor in own.items()} == {n: t.shape for n, t in foreign.items()}
    assert same_shapes == (other == "same item count")  # only the run's identity tells these weights apart
    assert "belong to different runs" in cli_error(capsys, ["--model_file", str(swapped.checkpoint), "--user", "u1"])


def test_a_missing_or_old_serving_file_is_one_line(saved_runs, tmp_path, capsys):
    files = RunFiles.of(saved_runs["SASRec"][0])
    copy = RunFiles.of(tmp_path / files.checkpoint.name)
    shutil.copy(files.checkpoint, copy.checkpoint)
    argv = ["--model_file", str(copy.checkpoint), "--user", "u1"]
    assert f"has no serving file {copy.serving.name} beside it" in cli_error(capsys, argv)
    save_checked({**load_checked(files.serving), "format": 1}, copy.serving)
    assert "has format 1, not 2: written by another version" in cli_error(capsys, argv)


def test_a_model_whose_item_features_the_serving_file_lacks_is_refused_by_name(saved_runs, tmp_path, capsys):
    """As the serving files written before they kept the item features FDSA embeds."""
    files = RunFiles.of(saved_runs["FDSA"][0])
    copy = RunFiles.of(tmp_path / files.checkpoint.name)
    shutil.copy(files.checkpoint, copy.checkpoint)
    info = load_checked(files.serving)
    del info["item_features"]
    save_checked(info, copy.serving)
    error = cli_error(capsys, ["--model_file", str(copy.checkpoint), "--user", "u1"])
    assert error.startswith("error: FDSA needs more of its dataset than item ids") and "cannot be served" in error


def test_a_history_longer_than_the_model_reads_is_cut_only_on_request(saved_runs, capsys):
    model_file = str(saved_runs["SASRec"][0])
    history = [str(item) for item in range(1, 15)]
    main(["--model_file", model_file, "--history", ",".join(history), "--truncate", "--topk", "3"])
    truncated = capsys.readouterr().out
    main(["--model_file", model_file, "--history", ",".join(history[-10:]), "--topk", "3"])
    assert truncated == capsys.readouterr().out


def test_a_backbone_with_other_weights_is_refused(saved_runs, tiny_backbone_dir, tmp_path, capsys):
    folder = tmp_path / "other"
    shutil.copytree(tiny_backbone_dir, folder)
    torch.manual_seed(1)
    tiny_random_decoder(len(AutoTokenizer.from_pretrained(folder)), hidden=32).save_pretrained(folder)
    error = cli_error(capsys, ["--model_file", str(saved_runs["ST2SI-ilp"][0]), "--user", "u1", "--llm_path", str(folder)])
    assert "is not the one this model was trained on" in error


@pytest.mark.parametrize("run", ["ST2SI-tiny-random", "ST2SI-query-token"])
def test_a_fresh_process_serves_frozen_random_weights_with_the_trained_scores(saved_runs, run):
    """The command line, in a process of its own, draws the weights the checkpoint does not hold
    (a random backbone, the new ``[Q]`` token's embedding row) again from the run's seed."""
    model_file, trained, config = saved_runs[run]
    history = ["3", "9", "27", "14"]
    lines = subprocess.run(
        [sys.executable, "-m", "recbole_st2si.recommend", "--model_file", str(model_file),
         "--history", ",".join(history), "--topk", "5"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()[1:]
    expected_items, expected_scores = reference_top_k(trained, config, [history], 5)
    assert [line.split("\t")[0] for line in lines] == expected_items[0]
    assert [float(line.split("\t")[2]) for line in lines] == pytest.approx(expected_scores[0], abs=1e-4)


def test_the_readme_python_example_runs_on_a_saved_run(saved_runs):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = readme.split("## Recommending from a saved run")[1].split("```python\n")[1].split("```")[0]
    example = example.replace("saved/<run>.pth", str(saved_runs["ST2SI-ilp"][0]))
    for movie_lens_item, tiny_item in (("50", "5"), ("172", "17"), ("133", "13")):  # its ids are ml-100k's
        example = example.replace(f'"{movie_lens_item}"', f'"{tiny_item}"')
    namespace = {}
    exec(example, namespace)
    assert [len(items) for items in namespace["top"].items] == [10, 10]


def test_cli_prints_item_id_title_and_score(saved_runs):
    titles = dict(line.split("\t")[:2] for line in (DATA_DIR / "tiny" / "tiny.item").read_text().splitlines()[1:])
    output = subprocess.run(
        [sys.executable, "-m", "recbole_st2si.recommend", "--model_file", str(saved_runs["SASRec"][0]),
         "--user", "u1", "--topk", "3", "--exclude_history"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert output[0] == "item_id\ttitle\tscore" and len(output) == 4
    _, trained, config = saved_runs["SASRec"]
    (expected_items,), (expected_scores,) = reference_top_k(trained, config, [tiny_histories()["u1"]], 3, True)
    rows = [line.split("\t") for line in output[1:]]
    assert [item for item, _, _ in rows] == expected_items
    assert [title for _, title, _ in rows] == [titles[item] for item in expected_items]
    assert [float(score) for _, _, score in rows] == pytest.approx(expected_scores, abs=1e-4)


@pytest.mark.parametrize("max_seq_tokens", [1024, 24])
def test_extending_a_history_runs_only_the_new_item_and_equals_a_fresh_encoding(make_config, max_seq_tokens):
    """Item by item up to 16 items, past MAX_ITEM_LIST_LENGTH (10) and, with 24, past max_seq_tokens:
    the state after each step is the one the whole history's ordinary padded encoding gives."""
    config = make_config(train_stage="ilp", max_seq_tokens=max_seq_tokens)
    torch.manual_seed(0)
    model = ST2SI(config, create_dataset(config)).eval()
    tokens_run = []
    model.backbone.get_input_embeddings().register_forward_hook(lambda module, args, out: tokens_run.append(args[0].shape[1]))
    history = [(item % 40) + 1 for item in range(5, 21)]
    state = encode_history(model, history[:1])
    steps = []
    for length in range(2, len(history) + 1):
        tokens_run.clear()
        (state,) = extend_histories(model, [state], [history[length - 1]])
        window = torch.tensor([history[:length][-10:]])
        with torch.no_grad():
            fresh = model(window, torch.tensor([window.shape[1]]))[0]
        assert torch.allclose(state.last_query_state, fresh, atol=1e-4)
        assert torch.allclose(model.item_logits(state.last_query_state[None]), model.item_logits(fresh[None]), atol=1e-4)
        steps.append(tokens_run[0] == int(model.segment_len[history[length - 1]]))
    if max_seq_tokens == 1024:  # one new item at a time up to 10 items, then the window slides
        assert steps == [True] * 9 + [False] * 6
    else:  # the token limit slides the window earlier
        assert any(steps) and not all(steps[:9])


def test_histories_extended_together_equal_their_fresh_encodings(make_config):
    """Histories of different token counts grow in one padded pass, one of them past the item limit
    (re-encoded): each new state equals the ordinary encoding of its whole history, and each kept
    cache still extends correctly afterwards."""
    config = make_config(train_stage="ilp")
    torch.manual_seed(0)
    model = ST2SI(config, create_dataset(config)).eval()
    histories = [[3, 9], [12, 4, 30, 7, 21], [(item % 40) + 1 for item in range(10)], [40]]
    states = [encode_history(model, history) for history in histories]
    for step, new_items in enumerate(([5, 17, 2, 33], [8, 1, 26, 6])):
        rows_run = []
        hook = model.backbone.get_input_embeddings().register_forward_hook(
            lambda module, args, out: rows_run.append(args[0].shape[0]))
        states = extend_histories(model, states, new_items)
        hook.remove()
        assert rows_run == [1, 3]  # the full window re-encoded alone, the other three together
        for history, item, state in zip(histories, new_items, states):
            history.append(item)
            window = torch.tensor([history[-10:]])
            with torch.no_grad():
                fresh = model(window, torch.tensor([window.shape[1]]))[0]
            assert torch.allclose(state.last_query_state, fresh, atol=1e-4), (step, history)
            assert state.num_tokens == int(model.segment_len[torch.tensor(history[-10:])].sum())
    (alone,) = extend_histories(model, states[1:2], [11])  # a cache left by a batch grows on its own
    window = torch.tensor([histories[1] + [11]])
    with torch.no_grad():
        assert torch.allclose(alone.last_query_state, model(window, torch.tensor([window.shape[1]]))[0], atol=1e-4)


def test_sessions_grown_and_ranked_together_match_fresh_recommendations(saved_runs):
    for run in ("ST2SI-ilp", "SASRec"):
        recommender = load_recommender(saved_runs[run][0])
        histories = [["3", "4"], ["10", "11", "12", "13", "14", "15", "16"], ["40"]]
        sessions = [recommender.session(history) for history in histories]
        recommender.add(sessions, ["5", "20", "2"])
        together = recommender.recommend_sessions(sessions, k=5, exclude_history=True)
        fresh = recommender.recommend([history + [item] for history, item in zip(histories, ["5", "20", "2"])],
                                      k=5, exclude_history=True)
        assert together.items == fresh.items
        for got, expected in zip(together.scores, fresh.scores):
            assert got == pytest.approx(expected, abs=1e-4)
        with pytest.raises(UserInputError, match="unknown item id '999'"):
            recommender.add(sessions[:1], ["999"])
        with pytest.raises(UserInputError, match="one new item per session: got 1 items for 2 sessions"):
            recommender.add(sessions[:2], ["1"])


def test_a_bf16_backbone_gives_float32_scores_close_to_float32(saved_runs):
    model_file = saved_runs["ST2SI-full"][0]
    history = [["1", "2", "3", "4"]]
    exact = load_recommender(model_file).recommend(history, k=40)
    fast = load_recommender(model_file, precision="bf16")
    assert next(fast.model.backbone.parameters()).dtype == torch.bfloat16
    top = fast.recommend(history, k=40)
    scores = dict(zip(top.items[0], top.scores[0]))
    assert [scores[item] for item in exact.items[0]] == pytest.approx(exact.scores[0], abs=0.05)
