"""Shared fixtures. Tests never touch the network: the hub is switched off before anything imports it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def kagglekd_cache(tmp_path_factory):
    """A kit cache for the whole test session, with the stdlib corpus and demo tokenizer built once.

    Tests that call cache-backed functions point ``KAGGLEKD_CACHE`` here (``monkeypatch.setenv``).
    """
    from kagglekd import corpus

    root = tmp_path_factory.mktemp("kagglekd-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAGGLEKD_CACHE", str(root))
        corpus.demo_tokenizer(4096)
    return root


@pytest.fixture(scope="session")
def demo_tokenizer_dir(kagglekd_cache):
    """Directory of the demo byte-level BPE tokenizer (vocab 4096), loadable with AutoTokenizer."""
    from kagglekd import corpus

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))
        return corpus.demo_tokenizer(4096)


@pytest.fixture(scope="session")
def student_tok(demo_tokenizer_dir):
    """The demo byte-level tokenizer (vocab 4096), loaded: the student side of the cross-tokenizer tests."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_tokenizer_dir)


@pytest.fixture(scope="session")
def metaspace_tok(kagglekd_cache):
    """A SentencePiece-style (metaspace, digits split) 3000-token tokenizer of the same corpus: a teacher side."""
    from transformers import AutoTokenizer

    from kagglekd import corpus

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))
        return AutoTokenizer.from_pretrained(corpus.demo_tokenizer(3000, pre_tokenizer="whitespace-digits"))


@pytest.fixture
def use_kit_cache(kagglekd_cache, monkeypatch):
    """Point the kit at the session cache for one test (tiny models and the corpus are built once)."""
    monkeypatch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))
    return kagglekd_cache


# A run of tiny random models on a few stdlib-docs modules: seconds on two CPU cores.
TINY_RUN = dict(
    teacher_model="tiny-random-moe",
    student_model="tiny-random-dense",
    dataset="stdlib-docs",
    dataset_subset_size=12,
    max_length=32,
    batch_size=4,
    max_steps=6,
    warmup_steps=1,
    eval_steps=None,
    eval_max_blocks=8,
    save_steps=None,
    resume="never",
    seed=0,
)
