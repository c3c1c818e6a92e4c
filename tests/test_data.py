"""Tests of kagglekd.data and kagglekd.corpus: stdlib corpus, demo tokenizers, loading, packing, alignment, errors."""

import json
import shutil

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from kagglekd import corpus, data
from kagglekd.errors import ConfigError, DataError

ROUND_TRIP_TEXT = "Café naïve — 日本語のテキスト 🙂🚀\tTabs\tand  double  spaces\nx = 3.14159; é\r\n"


@pytest.fixture(autouse=True)
def _session_cache(monkeypatch, kagglekd_cache):
    monkeypatch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer_dir):
    return AutoTokenizer.from_pretrained(demo_tokenizer_dir)


@pytest.fixture(scope="module")
def stdlib_texts(kagglekd_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))
        return data.load_texts("stdlib-docs")


class DocTokenizer:
    """A stand-in tokenizer: document ``"<i> <n>"`` becomes ``n`` tokens ``1000 * i + k``.

    Every token names its document (``id // 1000``) and position, so packing can be checked exactly.
    """

    eos_token_id = 7

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        ids = []
        for text in texts:
            doc, length = (int(part) for part in text.split())
            ids.append([1000 * doc + k for k in range(length)])
        return {"input_ids": ids}

    def __len__(self):
        return 1_000_000


def doc_dataset(lengths):
    return datasets.Dataset.from_dict({"text": [f"{i + 1} {n}" for i, n in enumerate(lengths)]})


# ----------------------------------------------------------------------------- cache + corpus


def test_cache_root_follows_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLEKD_CACHE", str(tmp_path / "kk"))
    assert corpus.cache_root() == tmp_path / "kk" and (tmp_path / "kk").is_dir()
    monkeypatch.delenv("KAGGLEKD_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert corpus.cache_root() == tmp_path / "home" / ".cache" / "kagglekd"
    assert corpus.cache_root().is_dir()


def test_stdlib_corpus_is_deterministic_real_prose_and_clean(tmp_path):
    cached = corpus.stdlib_corpus()
    rebuilt = corpus.stdlib_corpus(cache_dir=tmp_path)
    assert rebuilt.parent == tmp_path
    assert cached.read_bytes() == rebuilt.read_bytes()

    records = [json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines()]
    modules = [r["module"] for r in records]
    assert len(modules) >= 150 and modules == sorted(set(modules))
    assert {"os", "json", "collections", "re", "pathlib"} <= set(modules)
    assert not {"antigravity", "this", "idlelib", "tkinter", "turtle"} & set(modules)
    text = "".join(r["text"] for r in records)
    assert 3_000_000 < len(text) < 8_000_000
    assert "Return" in text and "class " in text and "def " in text
    json_doc = next(r["text"] for r in records if r["module"] == "json")
    assert "JSON" in json_doc and "dumps(" in json_doc
    # nothing of the machine leaks in: no environment dump, no memory addresses, no interpreter path
    assert "environ({'" not in text and " at 0x" not in text
    assert str(corpus.cache_root()) not in text


def test_stdlib_corpus_second_call_is_cached():
    first = corpus.stdlib_corpus()
    stamp = first.stat().st_mtime_ns
    assert corpus.stdlib_corpus() == first and first.stat().st_mtime_ns == stamp
    assert not list(first.parent.glob(".*.tmp"))  # the atomic write left no temp file behind


# ----------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("pre_tokenizer", corpus.PRE_TOKENIZERS)
def test_demo_tokenizers_load_and_round_trip(pre_tokenizer):
    directory = corpus.demo_tokenizer(4096, pre_tokenizer=pre_tokenizer)
    assert directory.parent == corpus.cache_root() / "tokenizers" and pre_tokenizer in directory.name
    tok = AutoTokenizer.from_pretrained(directory)
    assert len(tok) == 4096
    assert tok.eos_token == tok.bos_token == tok.pad_token == corpus.EOS_TOKEN and tok.eos_token_id == 0
    ids = tok(ROUND_TRIP_TEXT)["input_ids"]
    assert tok.eos_token_id not in ids  # no special tokens added on encode
    assert tok.decode(ids) == ROUND_TRIP_TEXT
    assert tok.decode(ids, skip_special_tokens=True) == ROUND_TRIP_TEXT
    if pre_tokenizer.endswith("digits"):  # every digit is a token of its own
        pieces = tok.convert_ids_to_tokens(tok("in 2024 and 366", add_special_tokens=False)["input_ids"])
        assert [p.lstrip("Ġ▁") for p in pieces if p.lstrip("Ġ▁").isdigit()] == list("2024366")
    # common English compresses well: fewer tokens than characters
    prose = "Return a new list containing all items from the iterable in ascending order."
    assert len(tok(prose)["input_ids"]) < len(prose) / 3
    assert corpus.demo_tokenizer(4096, pre_tokenizer=pre_tokenizer) == directory  # cached


def test_the_two_pre_tokenizers_segment_differently():
    byte_level = AutoTokenizer.from_pretrained(corpus.demo_tokenizer(4096, pre_tokenizer="bytelevel"))
    metaspace = AutoTokenizer.from_pretrained(corpus.demo_tokenizer(4096, pre_tokenizer="whitespace-digits"))
    text = "The year 2024 has 366 days."
    a = byte_level.convert_ids_to_tokens(byte_level(text)["input_ids"])
    b = metaspace.convert_ids_to_tokens(metaspace(text)["input_ids"])
    assert a != b
    assert any(t.startswith("Ġ") for t in a) and any(t.startswith("▁") for t in b)
    assert [t for t in b if t.isdigit()] == list("2024366")  # digits split one by one
    # offsets (used by cross-tokenizer alignment) cover the same text in both
    for tok in (byte_level, metaspace):
        spans = tok(text, return_offsets_mapping=True)["offset_mapping"]
        assert spans[-1][1] == len(text)


def test_train_demo_tokenizer_on_a_text_file(tmp_path):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("the cat sat on the mat. " * 200 + "numbers 0123456789", encoding="utf-8")
    out = corpus.train_demo_tokenizer(text_file, 300, tmp_path / "tok", pre_tokenizer="whitespace-digits")
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) <= 300
    assert tok.decode(tok("the cat 🐈 sat")["input_ids"]) == "the cat 🐈 sat"
    assert not list(tmp_path.glob(".tok.*"))  # staging directory renamed away


def test_unknown_pre_tokenizer_is_a_config_error(tmp_path):
    text_file = tmp_path / "c.txt"
    text_file.write_text("text", encoding="utf-8")
    with pytest.raises(ConfigError, match="sentencepiece"):
        corpus.train_demo_tokenizer(text_file, 300, tmp_path / "t", pre_tokenizer="sentencepiece")


# ----------------------------------------------------------------------------- load_texts


def test_load_texts_stdlib(stdlib_texts):
    assert stdlib_texts.column_names == ["module", "text"] and len(stdlib_texts) >= 150


def test_load_texts_txt_is_one_document_per_paragraph_group(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph,\nstill first.\n\nSecond one.\n\n\n\nThird.\n", encoding="utf-8")
    texts = data.load_texts(str(path))
    assert len(texts) == 3 and texts[0]["text"].startswith("First paragraph,\nstill first.")
    assert "Second one." in texts[1]["text"] and "Third." in texts[2]["text"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_load_texts_tabular_files(tmp_path, suffix):
    rows = {"body": [f"document {i}" for i in range(5)] + [""], "id": list(range(6))}
    path = tmp_path / f"docs{suffix}"
    frame = datasets.Dataset.from_dict(rows)
    if suffix == ".jsonl":
        frame.to_json(path, lines=True)
    elif suffix == ".json":
        path.write_text(json.dumps([dict(zip(rows, values)) for values in zip(*rows.values())]))
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    texts = data.load_texts(path, text_column="body", subset_size=3)
    assert texts["body"] == ["document 0", "document 1", "document 2"]
    assert len(data.load_texts(path, text_column="body")) == 5  # the empty document is dropped


def test_load_texts_saved_dataset_dirs(tmp_path):
    datasets.Dataset.from_dict({"text": ["a b", "c d"]}).save_to_disk(tmp_path / "single")
    assert data.load_texts(tmp_path / "single")["text"] == ["a b", "c d"]
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["x"]}),
            "test": datasets.Dataset.from_dict({"text": ["y"]}),
        }
    )
    splits.save_to_disk(tmp_path / "dict")
    assert data.load_texts(tmp_path / "dict", split="test")["text"] == ["y"]
    with pytest.raises(DataError, match="dataset_split"):
        data.load_texts(tmp_path / "dict", split="validation")


def test_load_texts_folder_of_files(tmp_path):
    folder = tmp_path / "input"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.jsonl").write_text('{"text": "from b"}\n', encoding="utf-8")
    (folder / "sub" / "a.txt").write_text("from a\n\nagain a\n", encoding="utf-8")
    (folder / "README.md").write_text("ignored", encoding="utf-8")
    texts = data.load_texts(folder)
    assert [t.strip() for t in texts["text"]] == ["from b", "from a", "again a"]  # sorted paths


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl") as err:
        data.load_texts(str(tmp_path / "missing.jsonl"))
    assert "does not exist" in str(err.value)


def test_empty_file_and_blank_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl.*empty"):
        data.load_texts(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n\n")
    with pytest.raises(DataError, match="blank.txt.*no documents"):
        data.load_texts(blank)


def test_non_utf8_file_says_re_encode(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt") as err:
        data.load_texts(path)
    assert "UTF-8" in str(err.value) and "offset 3" in str(err.value) and "Re-encode" in str(err.value)


def test_missing_text_column_lists_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"content": "hello", "lang": "en"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        data.load_texts(path)
    message = str(err.value)
    assert "'text'" in message and "content" in message and "lang" in message and "text_column" in message


def test_non_string_text_column(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text('{"text": 1}\n{"text": 2}\n', encoding="utf-8")
    with pytest.raises(DataError, match="not text"):
        data.load_texts(path)


def test_unsupported_extension_and_empty_folder(tmp_path):
    doc = tmp_path / "report.docx"
    doc.write_bytes(b"PK")
    with pytest.raises(DataError, match="report.docx.*unsupported"):
        data.load_texts(doc)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="nothing.*no data files"):
        data.load_texts(tmp_path / "nothing")


def test_hub_id_offline_says_how_to_attach_data():
    with pytest.raises(DataError) as err:
        data.load_texts("someone/no-such-dataset", dataset_config="en")
    message = str(err.value)
    assert "someone/no-such-dataset" in message and "Kaggle dataset" in message and "/kaggle/input" in message


def test_bad_subset_size_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        data.load_texts("stdlib-docs", subset_size=0)
    assert err.value.field == "dataset_subset_size"


# ----------------------------------------------------------------------------- build_blocks


def test_packing_is_exact_split_by_document_and_seeded():
    lengths = [30, 5, 17, 44, 9, 21, 13, 8, 26, 11, 19, 7]
    blocks = data.build_blocks(doc_dataset(lengths), DocTokenizer(), max_length=9, eval_fraction=0.25, seed=3)
    block = 10
    assert blocks.train.dtype == blocks.eval.dtype == torch.int64
    assert blocks.train.shape[1] == blocks.eval.shape[1] == block == blocks.block_size

    def docs_in(tensor):
        return {int(t) // 1000 for t in tensor.flatten() if t != DocTokenizer.eos_token_id}

    assert docs_in(blocks.train) and docs_in(blocks.eval)
    assert not docs_in(blocks.train) & docs_in(blocks.eval)
    assert blocks.info["eval_documents"] == round(0.25 * len(lengths))

    # Each split's blocks are exactly its documents' tokens (+ eos after each), in order, remainder dropped.
    train_idx, eval_idx = data._split_documents(np.array(lengths) + 1, 0.25, block, seed=3)
    assert sorted(train_idx + eval_idx) == list(range(len(lengths)))
    for tensor, indices, split in ((blocks.train, train_idx, "train"), (blocks.eval, eval_idx, "eval")):
        stream = []
        for index in indices:
            doc = index + 1
            stream += [1000 * doc + k for k in range(lengths[index])] + [DocTokenizer.eos_token_id]
        assert blocks.info[f"{split}_tokens"] == len(stream)
        assert tensor.flatten().tolist() == stream[: len(tensor) * block]
        assert 0 <= len(stream) - len(tensor) * block < block

    again = data.build_blocks(doc_dataset(lengths), DocTokenizer(), max_length=9, eval_fraction=0.25, seed=3)
    assert torch.equal(again.train, blocks.train) and torch.equal(again.eval, blocks.eval)
    other = data.build_blocks(doc_dataset(lengths), DocTokenizer(), max_length=9, eval_fraction=0.25, seed=4)
    assert docs_in(other.eval) != docs_in(blocks.eval)


def test_eval_gets_at_least_one_document_and_one_block():
    # 3% of 10 documents rounds to 0; eval still gets a document, and enough documents for one block.
    blocks = data.build_blocks(doc_dataset([6] * 10), DocTokenizer(), max_length=15, eval_fraction=0.03, seed=0)
    assert blocks.info["eval_documents"] == 3 and len(blocks.eval) == 1
    assert blocks.info["train_documents"] == 7 and len(blocks.train) == 3  # 49 tokens -> 3 blocks of 16


def test_no_eval_split_when_fraction_is_zero():
    blocks = data.build_blocks(doc_dataset([10, 10]), DocTokenizer(), max_length=4, eval_fraction=0.0)
    assert blocks.eval.shape == (0, 5) and len(blocks.train) == 4


def test_too_little_text_reports_token_counts():
    with pytest.raises(DataError) as err:
        data.build_blocks(doc_dataset([20, 30]), DocTokenizer(), max_length=40, eval_fraction=0.5, seed=0)
    message = str(err.value)
    assert "52 tokens" in message and "41" in message and "max_length" in message


def test_build_blocks_on_stdlib_docs(stdlib_texts, tokenizer):
    blocks = data.build_blocks(stdlib_texts, tokenizer, max_length=128, seed=0, source="stdlib-docs")
    info = blocks.info
    assert blocks.train.shape == (info["train_blocks"], 129) and blocks.eval.shape == (
        info["eval_blocks"],
        129,
    )
    assert info["train_blocks"] > 5000 and info["eval_blocks"] > 50
    assert info["documents"] == len(stdlib_texts) and info["eval_documents"] == round(0.05 * len(stdlib_texts))
    assert info["source"] == "stdlib-docs" and info["vocab_size"] == 4096
    assert info["train_tokens"] + info["eval_tokens"] == info["tokens"]
    for split in ("train", "eval"):
        kept = info[f"{split}_blocks"] * 129
        assert 0 <= info[f"{split}_tokens"] - kept < 129
    # eos only separates documents: never more of them than documents in the split (no pad filler)
    assert int((blocks.train == tokenizer.eos_token_id).sum()) <= info["train_documents"]
    assert int(blocks.train.max()) < 4096
    again = data.build_blocks(stdlib_texts, tokenizer, max_length=128, seed=0)
    assert torch.equal(again.train, blocks.train) and torch.equal(again.eval, blocks.eval)


def test_build_blocks_missing_column(stdlib_texts, tokenizer):
    with pytest.raises(DataError, match="'body'.*text_column"):
        data.build_blocks(stdlib_texts, tokenizer, max_length=8, text_column="body")


# ----------------------------------------------------------------------------- alignment + fingerprint


def test_next_token_batch_alignment():
    blocks = torch.arange(2 * 6).reshape(2, 6)
    input_ids, labels = data.next_token_batch(blocks)
    assert input_ids.shape == labels.shape == (2, 5)
    assert input_ids.is_contiguous() and labels.is_contiguous()
    assert torch.equal(labels, input_ids + 1)  # labels[b, t] is the token after input_ids[b, t]
    assert torch.equal(labels[:, :-1], input_ids[:, 1:])
    assert torch.equal(input_ids, blocks[:, :-1]) and torch.equal(labels, blocks[:, 1:])


def test_dataset_fingerprint_is_stable_and_sensitive(tokenizer, tmp_path):
    base = dict(source="stdlib-docs", tokenizer=tokenizer, max_length=128, eval_fraction=0.05, seed=0)
    first = data.dataset_fingerprint(**base)
    assert first == data.dataset_fingerprint(**base) and len(first) == 16
    for change in ({"max_length": 64}, {"seed": 1}, {"eval_fraction": 0.1}, {"subset_size": 10}):
        assert data.dataset_fingerprint(**{**base, **change}) != first
    other_tokenizer = AutoTokenizer.from_pretrained(corpus.demo_tokenizer(4096, pre_tokenizer="whitespace-digits"))
    assert data.dataset_fingerprint(**{**base, "tokenizer": other_tokenizer}) != first
    path = tmp_path / "d.txt"
    path.write_text("one")
    before = data.dataset_fingerprint(**{**base, "source": str(path)})
    path.write_text("one two")
    assert data.dataset_fingerprint(**{**base, "source": str(path)}) != before


def test_staged_directory_is_atomic(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError), corpus.staged_directory(final) as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("boom")
    assert not final.exists() and not list(tmp_path.iterdir())
    with corpus.staged_directory(final) as staging:
        (staging / "whole").write_text("x")
    assert (final / "whole").exists() and not list(tmp_path.glob(".out.*"))
    shutil.rmtree(final)


def test_local_loads_make_no_network_attempts(tmp_path, monkeypatch):
    """Mend: offline, `datasets` tried the network while loading a local corpus (it counts every load on the hub
    unless in offline mode, which HF_DATASETS_OFFLINE sets only when present at import). With `datasets` in its
    default online configuration and sockets blocked, local loads must not try to connect at all."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as imported without HF_DATASETS_OFFLINE
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest's HF_HUB_OFFLINE undone
    attempts = []

    def blocked(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError(101, "Network is unreachable (sockets blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket.socket, "connect_ex", blocked)
    monkeypatch.setattr(socket, "getaddrinfo", blocked)  # a name lookup is a network attempt too
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"doc {i} words"}) + "\n" for i in range(4)))
    (tmp_path / "notes.txt").write_text("one paragraph\n\nanother paragraph\n")
    datasets.Dataset.from_dict({"text": ["a b", "c d"]}).save_to_disk(tmp_path / "saved")
    for reference in ("stdlib-docs", tmp_path / "docs.jsonl", tmp_path / "notes.txt", tmp_path / "saved"):
        assert len(data.load_texts(reference, subset_size=2)) == 2
    assert attempts == []
    assert datasets.config.HF_HUB_OFFLINE is False  # offline mode only for the loads, then as it was
