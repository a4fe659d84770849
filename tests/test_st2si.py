"""ST2SI's data path, token assembly, loss and predictions on the tiny dataset and tiny backbone."""

import pytest
import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction
from recbole.utils import init_seed

from recbole_st2si.backbone import load_tokenizer
from recbole_st2si.errors import UserInputError
from recbole_st2si.model import ST2SI
from recbole_st2si.quick_start import run_recbole_st2si
from recbole_st2si.trainer import ST2SITrainer
from recbole_st2si.utils import create_dataset, data_preparation

from .conftest import DATA_DIR


def build(config):
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = ST2SI(config, train_data.dataset)
    return model, train_data, valid_data, test_data


def item_tokens(dataset, item):
    return dataset.item_token_ids[item, : dataset.item_token_len[item]].tolist()


def raw_ids(dataset, items):
    return [int(token) for token in dataset.field2id_token[dataset.iid_field][items.numpy()]]


def test_assembly_interleaves_item_texts_and_queries(make_config):
    model, train_data, _, _ = build(make_config())
    dataset, q = train_data.dataset, model.query_token_id
    a, b, c = 1, 2, 3
    seq = torch.tensor([[a, b, c, 0], [b, 0, 0, 0]])
    input_ids, attention_mask, position_ids, query_pos, kept = model.assemble_inputs(seq, torch.tensor([3, 1]))

    first = item_tokens(dataset, a) + [q] + item_tokens(dataset, b) + [q] + item_tokens(dataset, c) + [q]
    second = item_tokens(dataset, b) + [q]
    assert input_ids.shape == (2, len(first))
    assert input_ids[0].tolist() == first
    assert input_ids[1, attention_mask[1].bool()].tolist() == second
    # right padding: under the causal mask no query row is left without a visible key (NaN on CUDA)
    assert attention_mask[1].tolist() == [1] * len(second) + [0] * (len(first) - len(second))
    assert position_ids[1, attention_mask[1].bool()].tolist() == list(range(len(second)))
    assert (input_ids[0, query_pos[0, :3]] == q).all() and input_ids[1, query_pos[1, 0]] == q
    assert kept.tolist() == [[True, True, True, False], [True, False, False, False]]


def test_assembly_keeps_recent_items_while_their_tokens_stay_below_max_seq_tokens(make_config):
    model, train_data, _, _ = build(make_config())
    dataset, q = train_data.dataset, model.query_token_id
    seq = torch.tensor([[1, 2, 3]])
    last_two = len(item_tokens(dataset, 2)) + len(item_tokens(dataset, 3)) + 2  # texts and their [Q]
    model.max_seq_tokens = last_two + 1
    input_ids, _, _, _, kept = model.assemble_inputs(seq, torch.tensor([3]))
    assert kept.tolist() == [[False, True, True]]
    assert input_ids[0].tolist() == item_tokens(dataset, 2) + [q] + item_tokens(dataset, 3) + [q]
    model.max_seq_tokens = last_two  # the authors' rule: the count must stay strictly below the limit
    input_ids, _, _, _, kept = model.assemble_inputs(seq, torch.tensor([3]))
    assert kept.tolist() == [[False, False, True]]
    assert input_ids[0].tolist() == item_tokens(dataset, 3) + [q]


def test_query_targets_are_the_next_items():
    seq = torch.tensor([[5, 6, 7, 0], [9, 0, 0, 0]])
    targets = ST2SI.query_targets(None, seq, torch.tensor([3, 1]), torch.tensor([8, 4]))
    assert targets[0, :3].tolist() == [6, 7, 8]
    assert targets[1, 0].item() == 4


def test_loader_full_window_gives_each_user_sequence_once_plus_alignment(make_config):
    config = make_config(train_window="full", id_alignment=True)
    _, train_data, _, _ = build(config)
    dataset = train_data.dataset
    assert train_data.sample_size == dataset.user_num - 1 + dataset.item_num - 1
    batch = train_data.collate_fn(list(range(train_data.sample_size)))
    seq, seq_len, target = batch["item_id_list"], batch["item_length"], batch["item_id"]
    users = train_data.num_user_samples
    for row in range(users):  # every user: a chain of consecutive items, target = successor of the last
        chain = raw_ids(dataset, seq[row, : seq_len[row]]) + raw_ids(dataset, target[row : row + 1])
        assert all(nxt == cur % 40 + 1 for cur, nxt in zip(chain, chain[1:]))
    alignment = slice(users, None)
    assert (seq[alignment, 0] == dataset.item_num).all()  # the prompt slot
    assert sorted(seq[alignment, 1].tolist()) == list(range(1, dataset.item_num))
    assert torch.equal(seq[alignment, 1], target[alignment]) and (seq_len[alignment] == 2).all()


def test_loader_random_windows_are_contiguous_sub_sequences(make_config):
    _, train_data, _, _ = build(make_config(train_window="random", id_alignment=False))
    dataset = train_data.dataset
    lengths = set()
    for _ in range(3):
        batch = train_data.collate_fn(list(range(train_data.sample_size)))
        for row in range(len(batch)):
            length = int(batch["item_length"][row])
            chain = raw_ids(dataset, batch["item_id_list"][row, :length]) + raw_ids(dataset, batch["item_id"][row : row + 1])
            assert length >= 1 and all(nxt == cur % 40 + 1 for cur, nxt in zip(chain, chain[1:]))
            lengths.add(length)
    assert len(lengths) > 3  # windows really vary


def naive_loss(model, dataset, batch, prompt):
    """Per-sample, unpadded reference computation of the multi-query cross-entropy."""
    q = model.query_token_id
    logits, targets = [], []
    for row in range(len(batch)):
        seq = batch["item_id_list"][row, : batch["item_length"][row]].tolist()
        nxt = seq[1:] + [int(batch["item_id"][row])]
        tokens, positions, row_targets = [], [], []
        for item, target in zip(seq, nxt):
            if item == model.prompt_item_id:
                tokens += prompt
                continue
            tokens += item_tokens(dataset, item) + [q]
            positions.append(len(tokens) - 1)
            row_targets.append(target)
        hidden = model.backbone(input_ids=torch.tensor([tokens])).last_hidden_state[0]
        logits.append(model.item_logits(hidden[positions]))
        targets += row_targets
    return F.cross_entropy(torch.cat(logits), torch.tensor(targets))


def test_vectorised_loss_equals_naive_per_sample_loss(make_config):
    config = make_config(train_window="random", id_alignment=True)
    model, train_data, _, _ = build(config)
    model.eval()
    tokenizer, _ = load_tokenizer(config["llm_path"], config["query_token"])
    prompt = tokenizer.encode(config["alignment_prompt"], add_special_tokens=False)
    batch = train_data.collate_fn(list(range(0, train_data.sample_size, 3)))
    with torch.no_grad():
        assert torch.allclose(model.calculate_loss(batch), naive_loss(model, train_data.dataset, batch, prompt), atol=1e-5)


def test_without_multi_query_only_the_last_query_counts(make_config):
    model, train_data, _, _ = build(make_config(multi_query=False, id_alignment=False, train_window="full"))
    model.eval()
    batch = train_data.collate_fn([0, 1])
    with torch.no_grad():
        last_state = model(batch["item_id_list"], batch["item_length"])
        expected = F.cross_entropy(model.item_logits(last_state), batch["item_id"])
        assert torch.allclose(model.calculate_loss(batch), expected, atol=1e-6)


def test_item_scores_are_float32_under_bf16_autocast(make_config):
    model, _, _, _ = build(make_config())
    states = torch.randn(64, model.ilp.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.item_logits(states)
    expected = states.double() @ model.ilp.weight.double().T
    assert scores.dtype == torch.float32
    assert torch.allclose(scores[:, 1:].double(), expected[:, 1:], atol=1e-5)


def item_titles():
    """Raw item id -> title, read from the dataset file."""
    lines = (DATA_DIR / "tiny" / "tiny.item").read_text().splitlines()[1:]
    return {int(line.split("\t")[0]): line.split("\t")[1] for line in lines}


def naive_last_query_state(model, tokenizer, titles, query_token):
    """The backbone's last hidden state over ``title1 [Q] title2 [Q] ...``, the text built by string
    concatenation and tokenised in one piece (the tiny tokenizer splits on whitespace)."""
    text = "".join(f"{title} {query_token} " for title in titles)
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    return model.backbone(input_ids=torch.tensor([tokens])).last_hidden_state[0, -1].double()


def test_multi_query_loss_by_hand_on_a_three_item_sequence(make_config):
    """``a [Q] b [Q]`` with target ``c``: the first query predicts b, the second c, and the loss is
    the mean of the two negative log-softmax values over the real items (not the padding item 0)."""
    config = make_config(id_alignment=False)
    model, train_data, _, _ = build(config)
    model.eval()
    dataset, titles = train_data.dataset, item_titles()
    tokenizer, _ = load_tokenizer(config["llm_path"], config["query_token"])
    a, b, c = (dataset.field2token_id[dataset.iid_field][str(raw)] for raw in (1, 2, 3))
    batch = Interaction({
        "item_id_list": torch.tensor([[a, b] + [0] * 8]), "item_length": torch.tensor([2]), "item_id": torch.tensor([c]),
    })
    with torch.no_grad():
        weight = model.ilp.weight.double()
        losses = []
        for prefix, target in (([titles[1]], b), ([titles[1], titles[2]], c)):
            logits = weight @ naive_last_query_state(model, tokenizer, prefix, config["query_token"])
            real = logits[1:]  # item 0 is padding
            losses.append(torch.log(torch.exp(real - real.max()).sum()) + real.max() - logits[target])
        expected = (losses[0] + losses[1]) / 2
        assert model.calculate_loss(batch).item() == pytest.approx(expected.item(), abs=1e-5)


def test_full_sort_predict_equals_a_naive_per_user_loop(make_config):
    config = make_config()
    model, train_data, _, test_data = build(config)
    model.eval()
    dataset, titles = train_data.dataset, item_titles()
    tokenizer, _ = load_tokenizer(config["llm_path"], config["query_token"])
    weight = model.ilp.weight.double()
    with torch.no_grad():
        for interaction, *_ in test_data:
            scores = model.full_sort_predict(interaction)
            assert scores.shape == (len(interaction), dataset.item_num) and torch.isinf(scores[:, 0]).all()
            for row in range(len(interaction)):
                history = raw_ids(dataset, interaction["item_id_list"][row, : interaction["item_length"][row]])
                state = naive_last_query_state(model, tokenizer, [titles[item] for item in history], config["query_token"])
                assert torch.allclose(scores[row, 1:].double(), (weight @ state)[1:], atol=1e-4)


def test_sampled_evaluation_encodes_each_history_once(make_config):
    """``uni19`` repeats each user's history for the target and 19 negatives: the backbone reads
    it once, and every candidate gets the score a separate run of its row would give."""
    probe = make_config()
    uni19 = {**probe["eval_args"], "mode": {"valid": "uni19", "test": "uni19"}}
    model, _, _, test_data = build(make_config(eval_args=uni19))
    model.eval()
    encoded_rows = []
    model.backbone.register_forward_hook(lambda module, args, kwargs, output: encoded_rows.append(len(kwargs["input_ids"])),
                                         with_kwargs=True)
    interaction, row_user, positive_u, _ = next(iter(test_data))
    with torch.no_grad():
        scores = model.predict(interaction)
        assert encoded_rows == [len(positive_u)] and len(interaction) == 20 * len(positive_u)
        for row in range(0, len(interaction), 7):
            alone = Interaction({key: interaction[key][row : row + 1] for key in interaction.columns})
            assert torch.allclose(scores[row], model.predict(alone)[0], atol=1e-5)


def test_training_generalises_to_held_out_users(make_config):
    """Users walk chains of items (the next item is the successor of the last): trained on the
    first half of the users, the model must rank the test item of the other users in its top 10
    far more often than chance (10 of 40 items) and than before training."""
    model, train_data, _, test_data = build(make_config(train_window="full", id_alignment=False))
    windows = train_data.windows
    sample_users = windows.sequences.uid[windows.users].tolist()
    learners = sample_users[: len(sample_users) // 2]
    held_out = set(sample_users) - set(learners)

    def held_out_hit_at_10():
        model.eval()
        hits = []
        with torch.no_grad():
            for interaction, *_ in test_data:
                rows = [row for row, user in enumerate(interaction["user_id"].tolist()) if user in held_out]
                scores = model.full_sort_predict(interaction)[rows]
                top10 = scores.topk(10, dim=1).indices
                hits += (top10 == interaction["item_id"][rows, None]).any(1).tolist()
        assert len(hits) == len(held_out)
        return sum(hits) / len(hits)

    before = held_out_hit_at_10()
    batch = train_data.collate_fn(list(range(len(learners))))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        model.train()
        loss = model.calculate_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_hit_at_10()
    assert after >= 0.6 and after > before + 0.2, (before, after)


def test_backbone_gradients_stay_finite_where_attention_kernels_give_nan_for_blind_rows(make_config, monkeypatch):
    """CUDA's fused attention kernels return NaN for a query row that may attend to no key (CPU
    returns zeros); such NaNs, even where no loss reads them, turn the weight gradients into NaN."""
    sdpa = F.scaled_dot_product_attention

    def cuda_like_sdpa(query, key, value, attn_mask=None, **kwargs):
        output = sdpa(query, key, value, attn_mask=attn_mask, **kwargs)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            blind = ~attn_mask.any(-1, keepdim=True)  # [B, 1, Q, 1]
            output = output.masked_fill(blind, float("nan"))
        return output

    monkeypatch.setattr(F, "scaled_dot_product_attention", cuda_like_sdpa)
    model, train_data, _, _ = build(make_config(train_window="full"))
    batch = train_data.collate_fn(list(range(train_data.sample_size)))  # histories of many lengths
    assert len(set(batch["item_length"].tolist())) > 1
    model.calculate_loss(batch).backward()
    gradients = [parameter.grad for parameter in model.backbone.parameters()]
    assert all(gradient is not None and torch.isfinite(gradient).all() for gradient in gradients)


@pytest.mark.parametrize("id_embedding,head", [(False, {"ilp.weight"}), (True, {"ilp.weight", "item_embedding.weight"})])
def test_ilp_stage_trains_only_the_head(make_config, id_embedding, head):
    model, _, _, _ = build(make_config(train_stage="ilp", id_embedding=id_embedding))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == head
    model.train()
    assert not model.backbone.training


def first_step_gradient(config):
    """One epoch of ST2SI's trainer (ILP only, one batch per step): the ILP's initial weight, the
    first batch, and the gradient the optimizer's first step is handed."""
    model, train_data, _, _ = build(config)
    trainer = ST2SITrainer(config, model)
    initial = model.ilp.weight.detach().clone()
    batches, gradients = [], []
    calculate_loss = model.calculate_loss

    def recording_loss(interaction):
        batches.append(interaction)
        return calculate_loss(interaction)

    model.calculate_loss = recording_loss
    trainer.optimizer.register_step_pre_hook(lambda *_: gradients.append(model.ilp.weight.grad.clone()))
    trainer.fit(train_data, saved=False)
    del model.calculate_loss  # the class's again
    return model, initial, batches[0], gradients[0]


def unclipped_gradient(model, weight, batch):
    """The ILP's gradient of the batch's loss at ``weight``, computed apart from the trainer."""
    model.ilp.weight.data.copy_(weight)
    model.zero_grad()
    model.calculate_loss(batch).backward()
    return model.ilp.weight.grad.clone()


@pytest.mark.parametrize("max_norm", [1e-3, None])
def test_the_optimizer_steps_on_the_gradient_clipped_to_max_norm(make_config, max_norm):
    """``clip_grad_norm: {max_norm: m}`` scales a gradient of norm n > m by m / (n + 1e-6), as
    ``torch.nn.utils.clip_grad_norm_`` defines it; without the setting the gradient is left as it is."""
    clipping = {"clip_grad_norm": {"max_norm": max_norm}} if max_norm else {}
    config = make_config(train_stage="ilp", feature_cache=False, gradient_accumulation_steps=1, warmup_steps=0,
                         **clipping)
    model, initial, batch, stepped = first_step_gradient(config)
    gradient = unclipped_gradient(model, initial, batch)
    norm = float(gradient.norm())
    assert norm > 100 * 1e-3  # so that clipping to 1e-3 changes it
    expected = gradient * (max_norm / (norm + 1e-6)) if max_norm else gradient
    assert torch.allclose(stepped, expected, rtol=1e-5, atol=1e-12)


def test_a_resumed_run_continues_the_learning_rate_schedule(settings, tmp_path):
    """Epoch 0, interrupted, then resumed for two more epochs: the cosine schedule runs its whole
    course once (ending at learning rate 0) instead of starting over with a warm-up."""
    checkpoint = tmp_path / "run.pth"
    first = run_recbole_st2si("ST2SI", "tiny", config_dict=settings(warmup_steps=1), checkpoint_file=checkpoint)
    steps_per_epoch = first["trainer"].scheduler.last_epoch
    resumed = run_recbole_st2si(
        "ST2SI", "tiny", config_dict=settings(warmup_steps=1, epochs=3), checkpoint_file=checkpoint, resume=True
    )
    trainer = resumed["trainer"]
    assert trainer.start_epoch == 1 and sorted(trainer.train_loss_dict) == [1, 2]
    assert trainer.scheduler.last_epoch == 3 * steps_per_epoch
    assert all(group["lr"] == pytest.approx(0.0, abs=1e-12) for group in trainer.optimizer.param_groups)


def test_resuming_without_a_checkpoint_is_a_clear_error(settings, tmp_path):
    with pytest.raises(UserInputError, match="needs the checkpoint of an interrupted run: --checkpoint_file"):
        run_recbole_st2si("ST2SI", "tiny", config_dict=settings(), resume=True)
    missing = tmp_path / "none.pth"
    with pytest.raises(UserInputError, match=f"--resume: {missing} does not exist, nor its training state beside it"):
        run_recbole_st2si("ST2SI", "tiny", config_dict=settings(), checkpoint_file=missing, resume=True)
