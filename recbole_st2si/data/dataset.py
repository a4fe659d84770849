"""A RecBole sequential dataset that also knows every item's text, tokenised once."""

import numpy as np
import torch
from recbole.data.dataset import SequentialDataset
from recbole.utils import FeatureType, set_color

from recbole_st2si.backbone import load_tokenizer
from recbole_st2si.errors import UserInputError

TEXT_TYPES = (FeatureType.TOKEN, FeatureType.TOKEN_SEQ, FeatureType.FLOAT)


def _raw_text(value) -> str:
    """Text of one raw item-feature cell: token_seq cells arrive as arrays of words, missing cells as NaN."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return " ".join(str(word) for word in value)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


class ST2SIDataset(SequentialDataset):
    """:class:`SequentialDataset` plus a per-item token table built from ``text_fields``.

    Each item's text follows the reference implementation: the first field as raw text, every
    further field as ``" {name}: {value}"``, each attribute truncated to ``max_attr_tokens`` tokens.
    Items whose first text field is missing or empty cannot be written as text, so they are
    removed (with their interactions) before splitting, as the paper drops items without a title.

    Attributes:
        item_token_ids (torch.LongTensor): ``[item_num, max_item_tokens]`` token ids, right-padded with 0.
        item_token_len (torch.LongTensor): ``[item_num]`` number of tokens of each item (0 for padding item 0).
        alignment_prompt_len (int): tokens of ``alignment_prompt``.
    """

    def __init__(self, config):
        self.text_fields = list(config["text_fields"] or [])
        if not self.text_fields:
            raise UserInputError("text_fields is empty: name the item fields that make up an item's text")
        super().__init__(config)
        self.item_token_ids, self.item_token_len = self._tokenize_items()

    # ------------------------------------------------------------------ filtering (raw DataFrames)
    def _data_filtering(self):
        self._filter_items_without_text()
        super()._data_filtering()

    def _filter_items_without_text(self):
        """Drop items without text, and interactions with such items or with items absent from ``.item``."""
        self._check_text_fields()
        item_feat, inter_feat = self.item_feat, self.inter_feat
        has_text = item_feat[self.text_fields[0]].map(lambda value: _raw_text(value).strip() != "")
        textless = int((~has_text).sum())
        item_feat = item_feat[has_text]
        known = inter_feat[self.iid_field].isin(set(item_feat[self.iid_field]))
        with_textless_item = int((~known & inter_feat[self.iid_field].isin(set(self.item_feat[self.iid_field]))).sum())
        without_item_row = int((~known).sum()) - with_textless_item
        if textless or not known.all():
            self.logger.warning(
                set_color("ST2SIDataset", "yellow")
                + f": removed {textless} items with an empty '{self.text_fields[0]}' and "
                f"{with_textless_item + without_item_row} interactions ({with_textless_item} with those items, "
                f"{without_item_row} with items that have no row in the .item file)"
            )
        self.item_feat = item_feat
        self.inter_feat = inter_feat[known]
        # RecBole fills a missing float with the column's mean: remember which values were missing
        self.missing_float_text = {
            field: set(item_feat[self.iid_field][item_feat[field].isna()])
            for field in self.text_fields
            if self.field2type[field] == FeatureType.FLOAT
        }

    def _check_text_fields(self):
        if self.item_feat is None:
            raise UserInputError(
                f"dataset '{self.dataset_name}' has no item features loaded; ST2SI needs the item text "
                f"fields {self.text_fields} from {self.dataset_name}.item (check load_col: item: [...])"
            )
        missing = [field for field in self.text_fields if field not in self.item_feat.columns]
        if missing:
            available = [field for field in self.item_feat.columns if field != self.iid_field]
            raise UserInputError(
                f"dataset '{self.dataset_name}' has no item field(s) {missing} (loaded item fields: {available}); "
                "set text_fields to fields of the .item file and list them in load_col: item"
            )
        for field in self.text_fields:
            if self.field2type[field] not in TEXT_TYPES:
                raise UserInputError(f"text field '{field}' has type {self.field2type[field].value}, which is not text")

    # ------------------------------------------------------------------ item texts (remapped ids)
    def item_texts(self) -> list[list[str]]:
        """For every internal item id, its text attributes in ``text_fields`` order (``[]`` for padding 0)."""
        attributes = [[] for _ in range(self.item_num)]
        for position, field in enumerate(self.text_fields):
            for item_id, value in enumerate(self._field_strings(field)):
                value = " ".join(value.split())
                if item_id == 0 or not value:
                    continue
                attributes[item_id].append(value if position == 0 else f" {field}: {value}")
        return attributes

    def _field_strings(self, field) -> list[str]:
        """The field's value for every internal item id, as text ("" where missing, never a filled-in value).

        Token ids arrive as floats: RecBole merges ``.item`` onto all item ids, which puts NaN in
        padding row 0 (and leaves it where pandas skips RecBole's chained ``fillna``). Missing is id 0.
        """
        values = self.item_feat[field]
        field_type = self.field2type[field]
        if field_type == FeatureType.FLOAT:
            raw_items = self.field2id_token[self.iid_field]
            missing = self.missing_float_text[field]
            return ["" if raw_items[item] in missing else f"{value:g}" for item, value in enumerate(values.tolist())]
        vocabulary = self.field2id_token[field]
        if field_type == FeatureType.TOKEN:
            return [str(vocabulary[index]) if index else "" for index in values.fillna(0).astype(np.int64).tolist()]
        return [" ".join(str(vocabulary[index]) for index in row if index) for row in values.tolist()]

    def _tokenize_items(self):
        tokenizer, _ = load_tokenizer(self.config["llm_path"], self.config["query_token"])
        self.alignment_prompt_len = len(tokenizer.encode(self.config["alignment_prompt"], add_special_tokens=False))
        max_tokens = self.config["max_attr_tokens"]
        attributes = self.item_texts()
        flat = [text for item in attributes for text in item]
        encoded = tokenizer(flat, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"] if flat else []
        per_item, cursor = [], 0
        for item in attributes:
            per_item.append([token for piece in encoded[cursor : cursor + len(item)] for token in piece])
            cursor += len(item)
        lengths = torch.tensor([len(tokens) for tokens in per_item], dtype=torch.long)
        table = torch.zeros(self.item_num, max(int(lengths.max()), 1), dtype=torch.long)
        for item_id, tokens in enumerate(per_item):
            table[item_id, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        self.logger.info(
            set_color("ST2SIDataset", "green")
            + f": tokenised {self.item_num - 1} item texts ({', '.join(self.text_fields)}), "
            f"{lengths[1:].float().mean():.1f} tokens on average, at most {int(lengths.max())}"
        )
        return table, lengths
