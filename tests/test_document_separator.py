"""The `document_separator` key: which token (if any) is packed after each document, refused when it is not one
token of the tokenizer, and part of the dataset fingerprint."""

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from kagglekd import data
from kagglekd.config import DistillConfig
from kagglekd.errors import ConfigError

TEXTS = [f"Document {i}: the module returns a list of values and raises an error." * 3 for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer_dir):
    return AutoTokenizer.from_pretrained(demo_tokenizer_dir)


def unused_token(tokenizer) -> tuple[str, int]:
    """A vocabulary token that the texts never produce, so every occurrence in the blocks is a separator."""
    used = {i for text in TEXTS for i in tokenizer(text, add_special_tokens=False)["input_ids"]}
    token_id = next(i for i in range(len(tokenizer) - 1, 0, -1) if i not in used and i != tokenizer.eos_token_id)
    return tokenizer.convert_ids_to_tokens(token_id), token_id


def pack(tokenizer, separator: str) -> tuple[data.Blocks, torch.Tensor]:
    texts = datasets.Dataset.from_dict({"text": TEXTS})
    blocks = data.build_blocks(texts, tokenizer, max_length=15, eval_fraction=0.2, document_separator=separator)
    return blocks, torch.cat([blocks.train.flatten(), blocks.eval.flatten()])


def test_default_separator_is_the_eos_token(tokenizer):
    blocks, tokens = pack(tokenizer, "eos")
    assert DistillConfig().document_separator == "eos"
    assert (tokens == tokenizer.eos_token_id).sum() > 0
    assert blocks.info["document_separator"] == tokenizer.eos_token


def test_a_chosen_token_replaces_eos_and_none_packs_without_one(tokenizer):
    token, token_id = unused_token(tokenizer)
    blocks, tokens = pack(tokenizer, token)
    eos = tokenizer.eos_token_id
    # as many separators as the eos default packs, at the same positions: only the id differs
    _, default = pack(tokenizer, "eos")
    assert torch.equal(tokens == token_id, default == eos) and (tokens == token_id).any()
    assert not (tokens == eos).any() and blocks.info["document_separator"] == token

    blocks, tokens = pack(tokenizer, "none")
    assert not (tokens == eos).any() and not (tokens == token_id).any()
    assert blocks.info["document_separator"] is None
    # without separators only the documents' own tokens are packed (each split drops under one block of 16)
    own = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    assert 0 <= own - tokens.numel() < 2 * 16


def test_a_separator_that_is_not_one_token_names_the_key(tokenizer):
    with pytest.raises(ConfigError, match="document_separator") as err:
        pack(tokenizer, "<|im_end|> and more words")
    assert err.value.field == "document_separator"


def test_the_separator_is_part_of_the_dataset_fingerprint(tokenizer):
    token, _ = unused_token(tokenizer)
    common = dict(source="stdlib-docs", tokenizer=tokenizer, max_length=15, eval_fraction=0.2, seed=0)
    default = data.dataset_fingerprint(**common)
    assert data.dataset_fingerprint(**common, document_separator="eos") == default
    others = {data.dataset_fingerprint(**common, document_separator=value) for value in (token, "none")}
    assert len(others) == 2 and default not in others
