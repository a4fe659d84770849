"""Serving a saved run: top-k for users and new histories, clear errors, incremental ST2SI updates."""

import csv
import shutil
import subprocess
import sys

import pytest
import torch
from recbole.data.interaction import Interaction
from transformers import AutoTokenizer

from recbole_st2si.backbone import tiny_random_decoder
from recbole_st2si.errors import UserInputError
from recbole_st2si.model import ST2SI
from recbole_st2si.quick_start import run_recbole_st2si
from recbole_st2si.recommend import load_recommender, main
from recbole_st2si.utils import create_dataset
from tests.conftest import DATA_DIR, tiny_settings

RUNS = {
    "SASRec": ("SASRec", {}),
    "GRU4Rec": ("GRU4Rec", {}),
    "ST2SI-ilp": ("ST2SI", {"train_stage": "ilp"}),
    "ST2SI-full": ("ST2SI", {}),
    "ST2SI-lora": ("ST2SI", {"train_stage": "lora", "lora_target_modules": ["q_proj", "v_proj"]}),
}


@pytest.fixture(scope="module")
def saved_runs(tiny_backbone_dir, tmp_path_factory):
    """Each model of :data:`RUNS` trained for one epoch on the tiny dataset: its checkpoint and trained model."""
    folder = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, (model, overrides) in RUNS.items():
        entries = tiny_settings(tiny_backbone_dir, folder / name, feature_cache_dir=str(folder / "cache"), **overrides)
        result = run_recbole_st2si(model, "tiny", config_dict=entries)
        runs[name] = (result["trainer"].saved_model_file, result["trainer"].model.eval(), result["config"])
    return runs


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
        (["--history", ","], "the history is empty"),
        (["--history", ",".join(str(item) for item in range(1, 12))], "the history has 11 items; this model reads at most 10"),
        (["--user", "u1", "--topk", "0"], "topk must be between 1 and the number of items, 40"),
    ],
)
def test_bad_requests_are_one_line_errors_with_status_2(saved_runs, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_file", str(saved_runs["ST2SI-ilp"][0]), *args])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert error.startswith("error: ") and message in error and "\n" not in error


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
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_file", str(saved_runs["ST2SI-ilp"][0]), "--user", "u1", "--llm_path", str(folder)])
    assert exit_info.value.code == 2
    assert "is not the one this model was trained on" in capsys.readouterr().err


def test_cli_prints_item_id_title_and_score(saved_runs):
    titles = dict(line.split("\t")[:2] for line in (DATA_DIR / "tiny" / "tiny.item").read_text().splitlines()[1:])
    output = subprocess.run(
        [sys.executable, "-m", "recbole_st2si.recommend", "--model_file", str(saved_runs["SASRec"][0]),
         "--user", "u1", "--topk", "3", "--exclude_history"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert output[0] == "item_id\ttitle\tscore" and len(output) == 4
    for line in output[1:]:
        item, title, score = line.split("\t")
        assert title == titles[item] and item not in tiny_histories()["u1"]
        float(score)


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
    state = model.encode_history(history[:1])
    steps = []
    for length in range(2, len(history) + 1):
        tokens_run.clear()
        (state,) = model.extend_histories([state], [history[length - 1]])
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
    states = [model.encode_history(history) for history in histories]
    for step, new_items in enumerate(([5, 17, 2, 33], [8, 1, 26, 6])):
        rows_run = []
        hook = model.backbone.get_input_embeddings().register_forward_hook(
            lambda module, args, out: rows_run.append(args[0].shape[0]))
        states = model.extend_histories(states, new_items)
        hook.remove()
        assert rows_run == [1, 3]  # the full window re-encoded alone, the other three together
        for history, item, state in zip(histories, new_items, states):
            history.append(item)
            window = torch.tensor([history[-10:]])
            with torch.no_grad():
                fresh = model(window, torch.tensor([window.shape[1]]))[0]
            assert torch.allclose(state.last_query_state, fresh, atol=1e-4), (step, history)
            assert state.num_tokens == int(model.segment_len[torch.tensor(history[-10:])].sum())
    (alone,) = model.extend_histories(states[1:2], [11])  # a cache left by a batch grows on its own
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
