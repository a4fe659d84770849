"""How a saved model ranks items, one backend per kind of model, chosen once when a run is loaded.

Every backend answers the same four calls on internal item ids: the top-k after padded histories
(:meth:`top_k`), and a session's state that :meth:`start` makes, :meth:`extend` grows and
:meth:`top_k_of_sessions` ranks.
"""

import torch
from recbole.data.interaction import Interaction

from recbole_st2si.model.st2si import ST2SI, mask_items
from recbole_st2si.serving.sessions import encode_history, extend_histories

BACKBONE_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def padded(rows, device):
    """Rows of item ids as one ``[B, L]`` table, left-aligned and zero-padded, as RecBole's item lists."""
    table = torch.zeros((len(rows), max(map(len, rows))), dtype=torch.long)
    for row, ids in enumerate(rows):
        table[row, : len(ids)] = torch.tensor(ids)
    return table.to(device)


class IdModelBackend:
    """RecBole's ID models (SASRec, GRU4Rec, BERT4Rec, FDSA, S3Rec, ...): every ranking reads the
    history again and scores every item through the model's ``full_sort_predict``; a session keeps
    only its window of item ids."""

    def __init__(self, model):
        self.model = model

    def top_k(self, windows, k, exclude=None):
        """The ``k`` best items after each row of ``windows`` and their scores, ``[B, k]`` each;
        ``exclude`` (``[B, L]`` item ids, 0 = none) are never ranked."""
        interaction = Interaction({self.model.ITEM_SEQ: windows, self.model.ITEM_SEQ_LEN: (windows > 0).sum(1)})
        scores = self.model.full_sort_predict(interaction).float().view(len(windows), -1)
        scores[:, 0] = float("-inf")
        if exclude is not None:
            scores = mask_items(scores, exclude)
        top = scores.topk(k, dim=1)
        return top.values, top.indices

    def start(self, ids):
        return ids[-self.model.max_seq_length :]

    def extend(self, states, ids):
        return [self.start(state + [item]) for state, item in zip(states, ids)]

    def top_k_of_sessions(self, states, k, exclude=None):
        return self.top_k(padded(states, self.model.device), k, exclude)


class ST2SIBackend:
    """ST2SI: the backbone reads the histories, the ILP scores their last ``[Q]`` states over item
    chunks of ``ilp_chunk_size``; a session keeps its backbone key/values (see
    :mod:`recbole_st2si.serving.sessions`), so growing it runs only the new item's tokens. Its
    backbone runs in ``precision``; the ILP scores stay float32."""

    def __init__(self, model, precision="fp32"):
        self.model = model
        model.backbone.to(BACKBONE_PRECISIONS[precision])

    def top_k(self, windows, k, exclude=None):
        return self.model.top_items(self.model(windows, (windows > 0).sum(1)), k, exclude)

    def start(self, ids):
        return encode_history(self.model, ids)

    def extend(self, states, ids):
        return extend_histories(self.model, states, ids)

    def top_k_of_sessions(self, states, k, exclude=None):
        last_items = torch.tensor([state.items[-1] for state in states], device=self.model.device)
        query_states = torch.stack([state.last_query_state for state in states])
        return self.model.top_items(self.model.with_item_ids(query_states, last_items), k, exclude)


def backend_for(model, precision):
    """The backend that serves ``model``; ``precision`` is that of ST2SI's backbone (ID models are
    small and stay float32)."""
    if isinstance(model, ST2SI):
        return ST2SIBackend(model, precision)
    return IdModelBackend(model)
