"""``train_stage: top``: the last decoder layers and the ILP train on the frozen layers' token states,
cached once; against the same model run uncached (the whole backbone on the same windows)."""

import pytest
import torch
from transformers import GPT2Config, GPT2Model

from recbole_st2si.errors import UserInputError
from recbole_st2si.model.st2si import QUERY_STATES, TOKEN_STATES
from recbole_st2si.quick_start import run_recbole_st2si
from recbole_st2si.recommend import load_recommender

from .test_ilp_tuning import build, cached_dataloaders, ilp_settings


def top_config(make_config, tmp_path, **overrides):
    return make_config(**ilp_settings(tmp_path, **{"train_stage": "top", "top_layers": 1, **overrides}))


def with_random_item_embedding(model):
    """A learned item embedding that is not zero, as after training: so that it shows in every score."""
    if model.item_embedding is not None:
        with torch.no_grad():
            model.item_embedding.weight[1:] = torch.randn_like(model.item_embedding.weight[1:])
    return model


@pytest.mark.parametrize("stage,top_layers", [("top", 1), ("ilp", 0)])
@pytest.mark.parametrize("max_seq_tokens", [1024, 24])  # one window per history, or several
@pytest.mark.parametrize("multi_query,id_embedding", [(True, False), (False, False), (True, True)])
def test_cached_states_give_the_uncached_loss_and_gradients(make_config, tmp_path, multi_query, id_embedding, max_seq_tokens,
                                                            stage, top_layers):
    config = top_config(make_config, tmp_path, multi_query=multi_query, max_seq_tokens=max_seq_tokens,
                        id_embedding=id_embedding, train_stage=stage, top_layers=top_layers)
    model, (train_data, valid_data, test_data) = build(config)
    with_random_item_embedding(model)
    cached_train = cached_dataloaders(config, model, train_data, valid_data, test_data)[0]
    assert cached_train.sample_size == train_data.sample_size
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for index in ([0, 1, 2], list(range(5, 60, 4)), list(range(train_data.sample_size))):
        grads = []
        for batch in (train_data.collate_fn(index), cached_train.collate_fn(index)):
            model.zero_grad()
            loss = model.calculate_loss(batch)
            loss.backward()
            grads.append((loss.detach(), [parameter.grad.clone() for parameter in trained]))
        (uncached, uncached_grads), (cached, cached_grads) = grads
        assert torch.allclose(cached, uncached, atol=1e-5)
        for cached_grad, uncached_grad in zip(cached_grads, uncached_grads):
            assert torch.allclose(cached_grad, uncached_grad, atol=1e-5)
    assert (TOKEN_STATES if top_layers else QUERY_STATES) in cached_train.collate_fn([0])


@pytest.mark.parametrize("stage,top_layers", [("top", 1), ("ilp", 0)])
@pytest.mark.parametrize("id_embedding", [False, True])
def test_cached_states_score_the_held_out_items_as_uncached(make_config, tmp_path, id_embedding, stage, top_layers):
    config = top_config(make_config, tmp_path, id_embedding=id_embedding, train_stage=stage, top_layers=top_layers)
    model, (train_data, valid_data, test_data) = build(config)
    with_random_item_embedding(model)
    _, cached_valid, cached_test = cached_dataloaders(config, model, train_data, valid_data, test_data)
    model.eval()
    for plain, cached in ((valid_data, cached_valid), (test_data, cached_test)):
        scores = [scores_by_user(model, loader) for loader in (plain, cached)]
        assert scores[0].keys() == scores[1].keys() and len(scores[0]) == len(plain.dataset)
        for user, uncached in scores[0].items():
            assert torch.allclose(scores[1][user], uncached, atol=1e-4)


@torch.no_grad()
def scores_by_user(model, loader):
    """{user: full-ranking scores} over an evaluation loader, whatever order its rows come in."""
    scores = {}
    for interaction, *_ in loader:
        scores.update(zip(interaction[model.USER_ID].tolist(), model.full_sort_predict(interaction)))
    return scores


def test_evaluation_batches_hold_rows_of_similar_length(make_config, tmp_path):
    config = top_config(make_config, tmp_path, max_seq_tokens=60)
    model, loaders = build(config)
    cached_test = cached_dataloaders(config, model, *loaders)[2]
    counts = [batch[0]["token_count"].tolist() for batch in cached_test]
    assert [count for batch in counts for count in batch] == sorted(count for batch in counts for count in batch)


def test_only_the_top_layers_norm_and_head_train(make_config, tmp_path):
    model, _ = build(top_config(make_config, tmp_path))
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trained == {"ilp.weight", "item_embedding.weight", "backbone.norm.weight"} | {
        f"backbone.layers.1.{name}" for name, _ in model.backbone.layers[1].named_parameters()}


def test_top_without_trained_layers_is_ilp(make_config, tmp_path):
    ilp_model, ilp_loaders = build(make_config(**ilp_settings(tmp_path)))
    top_model, top_loaders = build(top_config(make_config, tmp_path, top_layers=0))
    ilp_train = cached_dataloaders(make_config(**ilp_settings(tmp_path)), ilp_model, *ilp_loaders)[0]
    top_train = cached_dataloaders(top_config(make_config, tmp_path, top_layers=0), top_model, *top_loaders)[0]
    batch = top_train.collate_fn(list(range(top_train.sample_size)))
    assert QUERY_STATES in batch and len(list((tmp_path / "cache").glob("*.states"))) == 1  # one cache for both
    with torch.no_grad():
        assert torch.equal(top_model.calculate_loss(batch),
                           ilp_model.calculate_loss(ilp_train.collate_fn(list(range(ilp_train.sample_size)))))


def test_a_top_run_checkpoints_what_trained_and_serves_its_scores(settings, tmp_path):
    result = run_recbole_st2si("ST2SI", "tiny", config_dict=settings(
        **ilp_settings(tmp_path, train_stage="top", top_layers=1, epochs=2)))
    trainer = result["trainer"]
    saved = torch.load(trainer.saved_model_file, weights_only=True)["state_dict"]
    assert set(saved) == {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
    assert any(name.startswith("backbone.layers.1.") for name in saved) and "backbone.layers.0.mlp.up_proj.weight" not in saved

    recommender = load_recommender(trainer.saved_model_file)
    history = recommender.user_history("u3")[-10:]
    served = recommender.recommend([history], k=5)
    model = trainer.model.eval()
    ids = torch.tensor([[recommender.item_ids[item] for item in history]])
    with torch.no_grad():
        expected = model.full_sort_predict({model.ITEM_SEQ: ids, model.ITEM_SEQ_LEN: torch.tensor([len(history)])})
    top = expected.topk(5)
    assert served.items[0] == [recommender.items[item] for item in top.indices[0].tolist()]
    assert served.scores[0] == pytest.approx(top.values[0].tolist(), abs=1e-4)


@pytest.mark.parametrize("overrides,message", [
    ({"top_layers": 2}, "top_layers=2 must be below the backbone's 2 layers"),
    ({"train_window": "random"}, "train_stage top trains on the cached windows of train_window all"),
])
def test_top_settings_that_cannot_work_are_one_line(make_config, tmp_path, overrides, message):
    with pytest.raises(UserInputError, match=message) as caught:
        config = top_config(make_config, tmp_path, **overrides)
        model, loaders = build(config)
        cached_dataloaders(config, model, *loaders)
    assert "\n" not in str(caught.value)


def test_top_refuses_a_decoder_whose_layers_cannot_run_alone(make_config, tmp_path, tiny_backbone_dir):
    folder = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=200)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_backbone_dir / name).exists():
            (folder / name).write_bytes((tiny_backbone_dir / name).read_bytes())
    with pytest.raises(UserInputError, match="train_stage top runs the top layers on their own, which this backbone \\(gpt2\\)"):
        build(top_config(make_config, tmp_path, llm_path=str(folder)))


def test_a_session_with_item_embeddings_ranks_as_a_fresh_history(settings, tmp_path):
    result = run_recbole_st2si("ST2SI", "tiny", config_dict=settings(
        **ilp_settings(tmp_path, train_stage="top", top_layers=1, id_embedding=True, epochs=1)))
    recommender = load_recommender(result["trainer"].saved_model_file)
    with_random_item_embedding(recommender.model)
    history = recommender.user_history("u3")[-6:]
    session = recommender.session(history[:-1])
    session.add(history[-1])
    grown, fresh = session.recommend(k=5), recommender.recommend([history], k=5)
    assert grown.items == fresh.items and grown.scores[0] == pytest.approx(fresh.scores[0], abs=1e-4)
    with torch.no_grad():
        recommender.model.item_embedding.weight.zero_()
    assert recommender.recommend([history], k=5).scores[0] != pytest.approx(fresh.scores[0], abs=1e-4)
