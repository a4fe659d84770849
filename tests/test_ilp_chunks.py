"""The ILP's loss and top-k over item chunks (``ilp_chunk_size``) against the plain full-catalogue ones."""

import pytest
import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction

from recbole_st2si.model import ST2SI
from recbole_st2si.model.st2si import QUERY_ITEMS, QUERY_STATES
from recbole_st2si.utils import create_dataset


@pytest.fixture
def chunked_model(make_config):
    """ST2SI on the tiny dataset (41 item ids) with chunks of 7 items: the last chunk is partial."""
    config = make_config(train_stage="ilp", ilp_chunk_size=7)
    torch.manual_seed(0)
    model = ST2SI(config, create_dataset(config))
    with torch.no_grad():
        model.ilp.weight.normal_()
    assert model.n_items % 7 != 0
    return model


def reference_logits(states, weight):
    """Every item's score, padding item 0 excluded, from one full matrix product."""
    logits = states @ weight.T
    logits[:, 0] = float("-inf")
    return logits


def test_chunked_loss_and_gradients_equal_the_full_cross_entropy(chunked_model):
    states = torch.randn(50, chunked_model.ilp.in_features, requires_grad=True)
    targets = torch.randint(1, chunked_model.n_items, (50,))
    chunked = chunked_model.ilp_loss(states, targets)
    chunked.backward()
    grads = states.grad.clone(), chunked_model.ilp.weight.grad.clone()

    weight = chunked_model.ilp.weight.detach().clone().requires_grad_(True)
    reference_states = states.detach().clone().requires_grad_(True)
    reference = F.cross_entropy(reference_logits(reference_states, weight), targets)
    reference.backward()
    assert torch.allclose(chunked, reference, atol=1e-5)
    assert torch.allclose(grads[0], reference_states.grad, atol=1e-6)
    assert torch.allclose(grads[1], weight.grad, atol=1e-6)
    assert grads[1][0].abs().max() == 0  # padding is no candidate: no gradient


def test_cached_feature_loss_is_chunked_and_stays_float32_under_bf16_autocast(chunked_model):
    states = torch.randn(20, chunked_model.ilp.in_features)
    targets = torch.randint(1, chunked_model.n_items, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = Interaction({QUERY_STATES: states, QUERY_ITEMS: torch.zeros_like(targets), "item_id": targets})
        loss = chunked_model.calculate_loss(batch)
    reference = F.cross_entropy(reference_logits(states, chunked_model.ilp.weight.detach()), targets)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, reference, atol=1e-5)


def test_chunked_top_k_equals_top_k_of_the_full_scores(chunked_model):
    states = torch.randn(6, chunked_model.ilp.in_features)
    exclude = torch.tensor([[3, 9, 0], [1, 2, 40], [0, 0, 0], [7, 8, 14], [20, 0, 0], [13, 6, 35]])
    scores, items = chunked_model.top_items(states, k=5, exclude=exclude)

    logits = reference_logits(states, chunked_model.ilp.weight.detach())
    for row, excluded in enumerate(exclude.tolist()):
        logits[row, [item for item in excluded if item]] = float("-inf")
    expected = logits.topk(5, dim=1)
    assert torch.equal(items, expected.indices)
    assert torch.allclose(scores, expected.values, atol=1e-5) and scores.dtype == torch.float32
