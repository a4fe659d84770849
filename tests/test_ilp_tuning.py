"""Efficient ILP tuning (cached [Q] states), pre-training and transfer, LoRA, ILP files."""

import logging
import math
from pathlib import Path

import pytest
import torch
from recbole.data.interaction import Interaction
from recbole.utils import init_seed

from recbole_st2si.errors import UserInputError
from recbole_st2si.data.cached_dataloader import FeatureCache
from recbole_st2si.model import ST2SI
from recbole_st2si.model.st2si import QUERY_STATES
from recbole_st2si.quick_start import run_recbole_st2si
from recbole_st2si.run_files import load_ilp, save_ilp
from recbole_st2si.safe_io import save_checked
from recbole_st2si.trainer import ST2SITrainer
from recbole_st2si.utils import create_dataset, data_preparation

from .conftest import write_domains


def build(config):
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    loaders = data_preparation(config, dataset)
    return ST2SI(config, loaders[0].dataset), loaders


def cached_dataloaders(config, model, train_data, valid_data, test_data):
    """The cached twins of the three loaders, as the trainer builds them."""
    cache = FeatureCache(config, model, train_data)
    return cache.train_loader(train_data), cache.eval_loader(valid_data), cache.eval_loader(test_data)


def ilp_settings(tmp_path, **overrides):
    """A float32 pass and float32 states, so that cached and uncached inputs agree to float32 rounding
    (the default bfloat16 storage is tested against its own reference in test_feature_cache_storage)."""
    entries = dict(train_stage="ilp", train_window="all", MAX_ITEM_LIST_LENGTH=50, feature_cache_dtype="fp32",
                   feature_cache_storage="fp32", feature_cache_dir=str(tmp_path / "cache"))
    entries.update(overrides)
    return entries


def ilp_config(make_config, tmp_path, **overrides):
    return make_config(**ilp_settings(tmp_path, **overrides))


def epoch_losses(model, plain_train, cached_train):
    """The loss of one batch holding every sample of an epoch, without and with the cache."""
    index = list(range(plain_train.sample_size))
    assert cached_train.sample_size == plain_train.sample_size
    with torch.no_grad():
        return model.calculate_loss(plain_train.collate_fn(index)), model.calculate_loss(cached_train.collate_fn(index))


@pytest.mark.parametrize("train_window", ["all", "full"])
@pytest.mark.parametrize("multi_query", [True, False])
def test_cached_features_give_the_uncached_loss_and_scores(make_config, tmp_path, multi_query, train_window):
    """Histories that fit one window: the cache reproduces every training, validation and test input."""
    config = ilp_config(make_config, tmp_path, multi_query=multi_query, train_window=train_window)
    model, (train_data, valid_data, test_data) = build(config)
    cached_train, cached_valid, cached_test = cached_dataloaders(config, model, train_data, valid_data, test_data)
    model.eval()
    with torch.no_grad():
        for index in ([0, 1, 2], list(range(5, 60, 4)), list(range(train_data.sample_size))):
            uncached = model.calculate_loss(train_data.collate_fn(index))
            cached = model.calculate_loss(cached_train.collate_fn(index))
            assert torch.allclose(cached, uncached, atol=1e-5)
        for plain, cached in ((valid_data, cached_valid), (test_data, cached_test)):
            for plain_batch, cached_batch in zip(plain, cached):
                assert torch.allclose(
                    model.full_sort_predict(cached_batch[0]), model.full_sort_predict(plain_batch[0]), atol=1e-4
                )


@pytest.mark.parametrize("multi_query", [True, False])
def test_cached_random_windows_train_on_the_uncached_draws_transitions(make_config, tmp_path, multi_query):
    """A random window starts inside the history, which the cached states (read from the start) do
    not; the transitions, drawn by generators with the same seed, are the same."""
    config = ilp_config(make_config, tmp_path, train_window="random", id_alignment=False, multi_query=multi_query)
    model, (train_data, valid_data, test_data) = build(config)
    cached_train = cached_dataloaders(config, model, train_data, valid_data, test_data)[0]
    index = list(range(train_data.sample_size))
    for _ in range(2):
        plain = train_data.collate_fn(index)
        targets = []
        for row in range(len(plain)):
            seq = plain["item_id_list"][row, : plain["item_length"][row]].tolist() + [int(plain["item_id"][row])]
            targets += seq[1:] if multi_query else seq[-1:]
        assert cached_train.collate_fn(index)["item_id"].tolist() == targets


@pytest.mark.parametrize("max_seq_tokens", [1024, 14])
def test_long_histories_use_every_transition_once_with_the_uncached_windows(make_config, tmp_path, max_seq_tokens):
    """Histories of 8 to 14 items in windows of at most 4 items (and, with 14 tokens, of 2 to 3 items):
    the cache trains on exactly the uncached windows' transitions, never on the state of an item the
    token limit dropped, and its test states are the test inputs' states."""
    config = ilp_config(make_config, tmp_path, MAX_ITEM_LIST_LENGTH=4, max_seq_tokens=max_seq_tokens)
    model, (train_data, valid_data, test_data) = build(config)
    cached_train, _, cached_test = cached_dataloaders(config, model, train_data, valid_data, test_data)
    model.eval()
    uncached, cached = epoch_losses(model, train_data, cached_train)
    assert torch.allclose(cached, uncached, atol=1e-5)
    with torch.no_grad():
        for plain_batch, cached_batch in zip(test_data, cached_test):
            assert torch.allclose(model.full_sort_predict(cached_batch[0]), model.full_sort_predict(plain_batch[0]), atol=1e-4)


def test_bf16_cache_stays_close_to_float32(make_config, tmp_path):
    states = {}
    for dtype in ("fp32", "bf16"):
        config = ilp_config(make_config, tmp_path, feature_cache_dtype=dtype)
        model, loaders = build(config)
        states[dtype] = cached_dataloaders(config, model, *loaders)[0].states.history
    cosine = torch.nn.functional.cosine_similarity(states["bf16"], states["fp32"], dim=1)
    assert cosine.min() > 0.999 and not torch.equal(states["bf16"], states["fp32"])
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # the precision is part of the key


def test_cached_features_serve_the_sampled_uni19_evaluation(make_config, tmp_path):
    probe = ilp_config(make_config, tmp_path)
    uni19 = {**probe["eval_args"], "mode": {"valid": "uni19", "test": "uni19"}}
    config = ilp_config(make_config, tmp_path, eval_args=uni19)
    model, loaders = build(config)
    cached_valid, cached_test = cached_dataloaders(config, model, *loaders)[1:]
    model.eval()
    with torch.no_grad():
        for loader in (cached_valid, cached_test):
            for interaction, row_user, positive_u, _ in loader:
                assert len(row_user) == 20 * len(positive_u)  # the target and 19 negatives per user
                plain = Interaction({k: v for k, v in interaction.interaction.items() if k != QUERY_STATES})
                assert torch.allclose(model.predict(interaction), model.predict(plain), atol=1e-4)


def test_cache_is_reused_only_for_identical_backbone_and_inputs(make_config, tmp_path):
    config = ilp_config(make_config, tmp_path)
    model, loaders = build(config)
    first = cached_dataloaders(config, model, *loaders)[0].states
    files = sorted((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1
    again = cached_dataloaders(config, model, *loaders)[0].states
    assert torch.equal(first.history, again.history) and sorted((tmp_path / "cache").glob("*.pt")) == files

    shorter_text = ilp_config(make_config, tmp_path, max_attr_tokens=1)
    cached_dataloaders(shorter_text, *build_pair(shorter_text))
    other, loaders = build(config)
    with torch.no_grad():
        other.backbone.layers[0].mlp.up_proj.weight.add_(0.01)  # another backbone, same inputs
    cached_dataloaders(config, other, *loaders)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def test_runs_with_and_without_id_alignment_share_the_cache(make_config, tmp_path):
    with_alignment = ilp_config(make_config, tmp_path)
    model, loaders = build(with_alignment)
    aligned = cached_dataloaders(with_alignment, model, *loaders)[0]
    without = ilp_config(make_config, tmp_path, id_alignment=False)
    model, loaders = build(without)
    plain_train, cached_train = loaders[0], cached_dataloaders(without, model, *loaders)[0]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert cached_train.sample_size == plain_train.sample_size == aligned.sample_size - (plain_train.dataset.item_num - 1)
    model.eval()
    uncached, cached = epoch_losses(model, plain_train, cached_train)
    assert torch.allclose(cached, uncached, atol=1e-5)


def test_without_multi_query_random_windows_train_one_random_transition_per_sample(make_config, tmp_path):
    config = ilp_config(make_config, tmp_path, multi_query=False, train_window="random", id_alignment=False)
    model, loaders = build(config)
    cached_train = cached_dataloaders(config, model, *loaders)[0]
    features, sequences = cached_train.states, cached_train.windows.sequences
    features.history = torch.arange(len(features.history), dtype=torch.float)[:, None]  # states name their row
    features.alignment = features.alignment[:, :1]
    users = cached_train.windows.users
    first = sequences.transition_index(users, torch.ones_like(users))
    last = sequences.transition_index(users, sequences.num_train[users] - 1)  # the last training target
    index = list(range(cached_train.sample_size))
    draws = [cached_train.collate_fn(index)[QUERY_STATES].long().flatten() for _ in range(2)]
    for rows in draws:
        assert len(rows) == len(users) and ((first <= rows) & (rows <= last)).all()  # one training transition each
    assert not torch.equal(draws[0], draws[1]) and (draws[0] < last).any()  # not always the last


def build_pair(config):
    model, loaders = build(config)
    return (model, *loaders)


def tiny_test_cases():
    """Each tiny user's history before its test item, and that item, by the rule that wrote the data
    (tests/data/make_tiny.py): user ``u`` walks ``8 + u % 7`` items from ``(7u) % 40 + 1`` on, wrapping after 40."""
    cases = []
    for user in range(1, 31):
        chain = [(user * 7 + step) % 40 + 1 for step in range(8 + user % 7)]
        cases.append((chain[:-1], chain[-1]))
    return cases


def metrics_at_10_by_hand(model, dataset):
    """Recall, NDCG, MRR and Hit at 10 of the model's own scores (uncached pass) for every tiny user's
    known test item: one target per user, its rank 1 + the number of items scored above it."""
    inner = {item: int(dataset.token2id(dataset.iid_field, str(item))) for item in range(1, 41)}
    totals = dict.fromkeys(("recall@10", "ndcg@10", "mrr@10", "hit@10"), 0.0)
    cases = tiny_test_cases()
    model.eval()
    with torch.no_grad():
        for history, target in cases:
            batch = Interaction({model.ITEM_SEQ: torch.tensor([[inner[item] for item in history]]),
                                 model.ITEM_SEQ_LEN: torch.tensor([len(history)])})
            scores = model.full_sort_predict(batch)[0]
            rank = 1 + int((scores > scores[inner[target]]).sum())
            if rank <= 10:
                totals["recall@10"] += 1
                totals["hit@10"] += 1
                totals["ndcg@10"] += 1 / math.log2(rank + 1)
                totals["mrr@10"] += 1 / rank
    return {name: total / len(cases) for name, total in totals.items()}


def test_ilp_tuning_learns_the_known_transitions(settings, tmp_path):
    """On chains of items the next item is a function of the last item's text: a frozen random
    backbone plus a trained ILP must rank it far above chance (Hit@10 of a random ranking: 10/40).
    The run's metrics, computed on cached states, are those of the trained model's own scores."""
    entries = ilp_settings(tmp_path, epochs=60, ilp_learning_rate=0.05, warmup_steps=0,
                           gradient_accumulation_steps=1, stopping_step=60, eval_step=60)
    result = run_recbole_st2si("ST2SI", "tiny", config_dict=settings(**entries))
    by_hand = metrics_at_10_by_hand(result["trainer"].model, create_dataset(result["config"]))
    assert result["test_result"] == pytest.approx(by_hand, abs=1e-4)  # RecBole rounds to 4 places
    assert by_hand["hit@10"] >= 0.6


def test_pretrain_then_transfer_with_a_fresh_ilp(make_config, settings, tmp_path):
    backbone_dir = tmp_path / "backbone"
    pretrain = settings(train_stage="pretrain", pretrained_backbone_dir=str(backbone_dir), epochs=1)
    run_recbole_st2si("ST2SI", "tiny", config_dict=pretrain)
    assert (backbone_dir / "model.safetensors").is_file()

    target = ilp_config(make_config, tmp_path, pretrained_backbone=str(backbone_dir))
    model, _ = build(target)
    pretrained = build(make_config(llm_path=str(backbone_dir)))[0]
    for name, weight in pretrained.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], weight)
    assert target["ilp_learning_rate"] == pytest.approx(1e-4)  # the authors' ILP rate after pre-training


def test_pretraining_saves_the_backbone_beside_its_checkpoint_by_default(make_config, settings, tmp_path):
    """Without ``pretrained_backbone_dir`` the backbone goes to ``<checkpoint>-backbone``, and
    ``pretrained_backbone`` loads it into a new run's model in place of ``llm_path``'s weights."""
    pretrain = settings(train_stage="pretrain", epochs=1, learning_rate=1e-3, warmup_steps=0)
    result = run_recbole_st2si("ST2SI", "tiny", config_dict=pretrain, checkpoint_file=tmp_path / "source.pth")
    pretrained = result["trainer"].model.backbone.state_dict()
    loaded = build(ilp_config(make_config, tmp_path, pretrained_backbone=str(tmp_path / "source-backbone")))[0]
    initial = build(ilp_config(make_config, tmp_path))[0]
    assert loaded.backbone.state_dict().keys() == pretrained.keys()
    for name, weight in pretrained.items():
        assert torch.equal(loaded.backbone.state_dict()[name], weight), name
    assert not all(torch.equal(initial.backbone.state_dict()[name], weight) for name, weight in pretrained.items())


def test_pretrained_backbone_of_another_architecture_is_refused(make_config, tmp_path):
    backbone_dir = tmp_path / "other"
    model, _ = build(make_config(llm_path="tiny-random"))
    model.backbone.save_pretrained(backbone_dir)
    with pytest.raises(UserInputError, match="does not match the architecture"):
        build(make_config(pretrained_backbone=str(backbone_dir)))


def test_ilp_file_round_trip_and_refusal_for_other_items(make_config, tmp_path):
    model, _ = build(make_config())
    with torch.no_grad():
        model.item_embedding.weight.normal_()  # as trained: it starts at zero
    path = tmp_path / "ilp.pth"
    save_ilp(model, path)
    reloaded, _ = build(make_config(seed=8))
    assert not torch.equal(reloaded.ilp.weight, model.ilp.weight)
    ST2SITrainer(make_config(ilp_checkpoint=str(path), seed=8), reloaded)  # a run starts from the file
    assert torch.equal(reloaded.ilp.weight, model.ilp.weight)
    assert torch.equal(reloaded.item_embedding.weight, model.item_embedding.weight)

    with pytest.raises(UserInputError, match="holds an item embedding: load it with id_embedding: True"):
        load_ilp(build(make_config(id_embedding=False))[0], path)
    text_only, _ = build(make_config(id_embedding=False))
    save_ilp(text_only, path)
    load_ilp(reloaded, path)  # the paper's head: the item embedding stays as it was
    assert torch.equal(reloaded.ilp.weight, text_only.ilp.weight)
    assert torch.equal(reloaded.item_embedding.weight, model.item_embedding.weight)

    save_checked({"weight": model.ilp.weight[:-1], "items": model.item_tokens[:-1]}, path)
    with pytest.raises(UserInputError, match="scores other items"):
        load_ilp(reloaded, path)


HEAD = {"ilp.weight", "item_embedding.weight"}  # the ILP and, by default (id_embedding), the item embeddings


def test_lora_trains_adapters_and_head_only(make_config):
    model, (train_data, _, _) = build(make_config(train_stage="lora", lora_r=2))
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert HEAD <= set(trainable) and any("lora_" in name for name in trainable)
    assert all(name in HEAD or "lora_" in name for name in trainable)
    loss = model.calculate_loss(train_data.collate_fn([0, 1, 2]))
    loss.backward()
    assert all(parameter.grad is not None for name, parameter in model.named_parameters() if "lora_B" in name)


def test_several_domains_are_merged_for_pretraining(make_config, tmp_path):
    write_domains(tmp_path, "Alpha", "Beta")
    config = make_config(dataset="Alpha,Beta", data_path=str(tmp_path))
    assert config["dataset"] == "Alpha+Beta"
    dataset = create_dataset(config)
    assert dataset.item_num - 1 == 80 and dataset.user_num - 1 == 60  # ids kept apart per domain


def test_frozen_ilp_rate_comes_from_the_config_and_a_trained_backbone_shares_its_rate(make_config):
    assert make_config(train_stage="ilp")["ilp_learning_rate"] == pytest.approx(3e-4)  # the authors' default
    assert make_config(train_stage="ilp", frozen_ilp_learning_rate=2e-3)["ilp_learning_rate"] == pytest.approx(2e-3)
    full = make_config(train_stage="full", frozen_ilp_learning_rate=2e-3, learning_rate=7e-5)
    assert full["ilp_learning_rate"] == pytest.approx(7e-5)


def test_lora_checkpoint_reloads_to_the_same_scores(settings, tmp_path):
    """A LoRA run's checkpoint holds the adapters and the head (ILP, item embeddings) only; loaded into a fresh model (same
    backbone file) it gives the trained model's scores, which differ from the untrained model's."""
    config_dict = settings(train_stage="lora", lora_r=2, learning_rate=1e-2, warmup_steps=0, gradient_accumulation_steps=1)
    result = run_recbole_st2si("ST2SI", "tiny", config_dict=config_dict, checkpoint_file=tmp_path / "lora.pth")
    trained = result["trainer"]
    saved = torch.load(tmp_path / "lora.pth", weights_only=True)["state_dict"]
    assert HEAD <= set(saved) and all("lora_" in name or name in HEAD for name in saved)

    config = result["config"]
    fresh, (_, _, test_data) = build(config)
    batch = next(iter(test_data))[0]
    with torch.no_grad():
        untrained = fresh.eval().full_sort_predict(batch)
        ST2SITrainer(config, fresh).load_checkpoint(tmp_path / "lora.pth")
        expected = trained.model.eval().full_sort_predict(batch)
        assert torch.allclose(fresh.eval().full_sort_predict(batch), expected, atol=1e-5)
        assert not torch.allclose(untrained, expected, atol=1e-3)


def test_ilp_run_trains_on_the_cache_and_saves_the_best_ilp(settings, tmp_path):
    """The trainer builds the cache from the training loader, trains and tests the ILP on cached
    states, and saves the best ILP: the file equals the ILP of the reloaded best checkpoint."""
    result = run_recbole_st2si("ST2SI", "tiny", config_dict=settings(**ilp_settings(tmp_path, epochs=2)))
    trainer = result["trainer"]
    assert trainer.feature_cache is not None and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    checkpoint = Path(trainer.saved_model_file)
    ilp = torch.load(checkpoint.with_name(f"{checkpoint.stem}-ilp.pth"), weights_only=True)
    best = torch.load(trainer.saved_model_file, weights_only=True)["state_dict"]
    assert torch.equal(ilp["weight"], best["ilp.weight"])


@pytest.mark.parametrize("stage_settings, line", [
    (dict(train_stage="ilp", frozen_ilp_learning_rate=1e-3),
     "learning rates: ILP 0.001, backbone frozen (100 warm-up steps, then cosine decay)"),
    (dict(train_stage="full"), "learning rates: ILP 5e-05, backbone 5e-05 (100 warm-up steps, then cosine decay)"),
    (dict(train_stage="top", top_layers=1, ilp_learning_rate=2e-3, warmup_steps=0),
     "learning rates: ILP 0.002, the backbone's top layers 5e-05 (0 warm-up steps, then cosine decay)"),
])
def test_the_log_names_the_learning_rates_that_train(make_config, stage_settings, line, caplog):
    config = make_config(**{"learning_rate": 5e-5, "warmup_steps": 100, **stage_settings})
    with caplog.at_level(logging.INFO):
        ST2SITrainer(config, build(config)[0])
    assert line in caplog.text
