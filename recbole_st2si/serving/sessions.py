"""Growing histories of ST2SI, encoded incrementally for serving.

A session keeps the backbone's key/values of its history, so that a new item runs only its own
tokens and ``[Q]`` on them: :func:`encode_history` starts one, :func:`extend_histories` grows many
in one backbone pass. The model is an argument, not the owner: training never keeps key/values.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class HistoryState:
    """An encoded history kept for incremental recommendation: the items in the backbone's window,
    the backbone's key/values over their tokens, and the last ``[Q]`` state (what the ILP scores)."""

    items: list
    num_tokens: int
    cache: object
    last_query_state: torch.Tensor


class PaddedHistoriesLayer(DynamicLayer):
    """One decoder layer's key/values of several histories in one batch: each history's cached
    tokens, left-padded with zeros to the longest (``past_width``; the attention mask hides the
    padding), then room for ``new_width`` new tokens, which the forward pass writes in place instead
    of concatenating the whole cache again. Left padding keeps each history's tokens contiguous, so
    afterwards every history's cache is a view of the batch, not a copy."""

    def __init__(self, layers, past_width, new_width):
        super().__init__()
        first = layers[0].keys
        shape = (len(layers), first.shape[1], past_width + new_width, first.shape[3])
        self.keys, self.values = first.new_empty(shape), first.new_empty(shape)
        for row, layer in enumerate(layers):
            start = past_width - layer.keys.shape[2]
            for padded, cached in ((self.keys, layer.keys), (self.values, layer.values)):
                padded[row, :, :start] = 0  # masked, but never NaN: 0 x NaN would leak into the output
                padded[row, :, start:past_width] = cached[0]
        self.past_width, self.device, self.is_initialized = past_width, first.device, True

    def get_seq_length(self):
        return self.past_width

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys[:, :, self.past_width :] = key_states
        self.values[:, :, self.past_width :] = value_states
        return self.keys, self.values

    def history(self, row, past, new):
        """Row ``row``'s own layer cache afterwards, its ``past`` cached and ``new`` new tokens: a view."""
        layer = DynamicLayer()
        tokens = slice(self.past_width - past, self.past_width + new)
        layer.lazy_initialization(self.keys, self.values)
        layer.keys, layer.values = self.keys[row : row + 1, :, tokens], self.values[row : row + 1, :, tokens]
        return layer


@torch.no_grad()
def encode_history(model, items):
    """Encode one history (internal item ids, oldest first) with ST2SI ``model`` and keep the
    backbone's key/values.

    The window is the one :meth:`~recbole_st2si.model.st2si.ST2SI.assemble_inputs` takes: the most
    recent ``MAX_ITEM_LIST_LENGTH`` items, then the most recent of those whose tokens stay below
    ``max_seq_tokens``.
    """
    window = torch.tensor([list(items)[-model.max_seq_length :]], dtype=torch.long, device=model.device)
    length = torch.tensor([window.shape[1]], device=model.device)
    input_ids, _, position_ids, query_pos, kept = model.assemble_inputs(window, length)
    output = model.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=True)
    return HistoryState(
        items=window[kept].tolist(),
        num_tokens=input_ids.shape[1],
        cache=output.cache,
        last_query_state=output.last_hidden_state[0, query_pos[0, -1]],
    )


@torch.no_grad()
def extend_histories(model, states, items):
    """Each of ``states`` with one more item, ``items[i]`` after ``states[i]``: in one backbone pass
    for all, each history runs only its new item's tokens and ``[Q]`` on its own cached key/values
    (left-padded to the longest and masked). A history whose window would drop its oldest item (the item
    or token limit) is encoded afresh instead, since every position and key then changes. Each
    new state's key/values are a view of the pass's batch (one copy of the history's, no more)."""
    device = model.device
    new_lengths = model.segment_len[torch.as_tensor(items, device=device)].tolist()
    extended = [None] * len(states)
    growing = []
    for index, (state, item, new_length) in enumerate(zip(states, items, new_lengths)):
        if len(state.items) + 1 > model.max_seq_length or state.num_tokens + new_length >= model.max_seq_tokens:
            extended[index] = encode_history(model, state.items + [item])
        else:
            growing.append(index)
    if not growing:
        return extended
    past = torch.tensor([states[index].num_tokens for index in growing], device=device)
    new = torch.tensor([new_lengths[index] for index in growing], device=device)
    past_width, new_width = int(past.max()), int(new.max())
    cache = Cache(layers=[
        PaddedHistoriesLayer([states[index].cache.layers[layer] for index in growing], past_width, new_width)
        for layer in range(len(states[growing[0]].cache.layers))
    ])
    new_items = torch.tensor([items[index] for index in growing], device=device)
    output = model.backbone(
        input_ids=model.segment_tokens[new_items, :new_width],
        attention_mask=torch.cat([
            torch.arange(past_width, device=device) >= past_width - past[:, None],
            torch.arange(new_width, device=device) < new[:, None],
        ], 1).long(),
        position_ids=past[:, None] + torch.arange(new_width, device=device),
        cache=cache,
        use_cache=True,
    )
    for row, index in enumerate(growing):
        cache = Cache(layers=[layer.history(row, int(past[row]), int(new[row])) for layer in output.cache.layers])
        extended[index] = HistoryState(
            states[index].items + [items[index]], int(past[row] + new[row]), cache,
            output.last_hidden_state[row, new[row] - 1],
        )
    return extended
