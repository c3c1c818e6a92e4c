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
    from kagglekd import data

    root = tmp_path_factory.mktemp("kagglekd-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAGGLEKD_CACHE", str(root))
        data.demo_tokenizer(4096)
    return root


@pytest.fixture(scope="session")
def demo_tokenizer_dir(kagglekd_cache):
    """Directory of the demo byte-level BPE tokenizer (vocab 4096), loadable with AutoTokenizer."""
    from kagglekd import data

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KAGGLEKD_CACHE", str(kagglekd_cache))
        return data.demo_tokenizer(4096)
