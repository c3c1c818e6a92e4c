"""Offline teacher cache: round trip against the live teacher, manifest checks, budget, atomicity."""

import json

import pytest
import torch

from kagglekd.config import KDOptions
from kagglekd.errors import ConfigError
from kagglekd.losses import IGNORE_INDEX, kd_loss, teacher_topk
from kagglekd.models import tiny_random_moe
from kagglekd.teacher_cache import (
    MANIFEST_NAME,
    REQUIRED_MANIFEST_KEYS,
    estimate_cache_bytes,
    open_cache,
    write_cache,
)

VOCAB, LENGTH, K, TEMPERATURE = 4096, 16, 8, 2.0


@pytest.fixture(scope="module")
def teacher():
    return tiny_random_moe(VOCAB, seed=0).eval()


@pytest.fixture(scope="module")
def blocks():
    return torch.randint(0, VOCAB, (7, LENGTH + 1), generator=torch.Generator().manual_seed(0))


def run_manifest(**overrides):
    manifest = {
        "teacher_model": "tiny-random-moe",
        "teacher_revision": "seed-0",
        "tokenizer_hash": "abc123",
        "max_length": LENGTH,
        "dataset_fingerprint": "f00d",
    }
    return {**manifest, **overrides}


@pytest.fixture(scope="module")
def cache_dir(teacher, blocks, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "teacher"
    # 3 blocks per shard and batch 2: reads cross shard and batch boundaries
    return write_cache(teacher, blocks, out, k=K, temperature=TEMPERATURE, batch_size=2, manifest=run_manifest(),
                       blocks_per_shard=3)  # fmt: skip


def expected_manifest(**overrides):
    return {**run_manifest(), "k": K, "temperature": TEMPERATURE, **overrides}


def test_round_trip_equals_live_teacher_topk(teacher, blocks, cache_dir):
    cache = open_cache(cache_dir, expected_manifest())
    assert len(cache) == 7 and cache.k == K
    picked = torch.tensor([6, 0, 4, 3])
    cached = cache.get(picked)
    with torch.no_grad():
        live = teacher_topk(teacher(input_ids=blocks[picked, :-1]).logits, K, TEMPERATURE)
    assert cached.indices.shape == (4, LENGTH, K) and cached.indices.dtype == torch.long
    assert cached.logprobs.dtype == torch.float32 and cached.tail.shape == (4, LENGTH)
    assert torch.equal(cached.indices, live.indices)
    # float16 storage: ~3 significant digits on log-probs of a few nats
    torch.testing.assert_close(cached.logprobs, live.logprobs, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(cached.tail, live.tail, rtol=1e-6, atol=1e-6)
    # and the KD loss from cached targets is the loss from live targets
    student = torch.randn(4, LENGTH, VOCAB)
    labels = blocks[picked, 1:].clone()
    labels[0, :3] = IGNORE_INDEX
    from_cache = kd_loss(student, cached, labels, KDOptions(temperature=TEMPERATURE))
    from_live = kd_loss(student, live, labels, KDOptions(temperature=TEMPERATURE))
    torch.testing.assert_close(from_cache, from_live, rtol=1e-3, atol=1e-4)


def test_manifest_records_the_run(cache_dir):
    manifest = json.loads((cache_dir / MANIFEST_NAME).read_text())
    for key in REQUIRED_MANIFEST_KEYS:
        assert manifest[key] == run_manifest()[key]
    assert manifest["k"] == K and manifest["temperature"] == TEMPERATURE and manifest["num_blocks"] == 7
    assert [shard["blocks"] for shard in manifest["shards"]] == [3, 3, 1]
    on_disk = sum(p.stat().st_size for p in cache_dir.glob("shard-*.npy"))
    estimate = estimate_cache_bytes(7 * LENGTH, K)
    assert estimate <= on_disk <= estimate + 9 * 128  # .npy headers only


def test_estimate_is_six_k_plus_four_bytes_per_token():
    assert estimate_cache_bytes(1, 1) == 10
    assert estimate_cache_bytes(10**6, 256) == 10**6 * 1540
    with pytest.raises(ValueError):
        estimate_cache_bytes(10, 0)


@pytest.mark.parametrize(
    "key, value",
    [("teacher_revision", "seed-1"), ("k", 16), ("temperature", 1.0), ("dataset_fingerprint", "beef"),
     ("max_length", 32)],
)  # fmt: skip
def test_mismatching_manifest_is_a_config_error_naming_the_key(cache_dir, key, value):
    with pytest.raises(ConfigError, match=key) as info:
        open_cache(cache_dir, expected_manifest(**{key: value}))
    assert "cache-teacher" in str(info.value) and info.value.field == "teacher_cache"


def test_several_mismatches_are_all_named(cache_dir):
    with pytest.raises(ConfigError) as info:
        open_cache(cache_dir, expected_manifest(tokenizer_hash="zzz", teacher_model="other"))
    assert "tokenizer_hash" in str(info.value) and "teacher_model" in str(info.value)


def test_over_budget_is_refused_unless_allowed(teacher, blocks, tmp_path):
    needed = estimate_cache_bytes(2 * LENGTH, K)
    with pytest.raises(ConfigError, match="budget") as info:
        write_cache(teacher, blocks[:2], tmp_path / "c", k=K, temperature=1.0, batch_size=2,
                    manifest=run_manifest(), budget_bytes=needed - 1)  # fmt: skip
    assert "kd_top_k" in str(info.value)
    assert not list((tmp_path / "c").glob("shard-*"))
    path = write_cache(teacher, blocks[:2], tmp_path / "c", k=K, temperature=1.0, batch_size=2,
                       manifest=run_manifest(), budget_bytes=needed - 1, allow_over_budget=True)  # fmt: skip
    assert len(open_cache(path, expected_manifest(temperature=1.0))) == 2


def test_no_manifest_is_not_a_cache(cache_dir, tmp_path):
    half_written = tmp_path / "half"
    half_written.mkdir()
    for shard in cache_dir.glob("shard-*.npy"):
        (half_written / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(ConfigError, match="no manifest.json"):
        open_cache(half_written, expected_manifest())
    with pytest.raises(ConfigError, match="no manifest.json"):
        open_cache(tmp_path / "does-not-exist", expected_manifest())


def test_interrupted_rewrite_leaves_no_manifest(teacher, blocks, tmp_path):
    path = write_cache(teacher, blocks[:2], tmp_path / "c", k=K, temperature=1.0, batch_size=2,
                       manifest=run_manifest())  # fmt: skip
    assert (path / MANIFEST_NAME).is_file()

    class Interrupt(Exception):
        pass

    class Failing(torch.nn.Module):  # a teacher that dies mid-run
        def __init__(self):
            super().__init__()
            self.inner = teacher

        def get_output_embeddings(self):
            return teacher.get_output_embeddings()

        def forward(self, **kwargs):
            raise Interrupt

    with pytest.raises(Interrupt):
        write_cache(Failing(), blocks[:2], path, k=K, temperature=1.0, batch_size=2, manifest=run_manifest())
    assert not (path / MANIFEST_NAME).exists()
    with pytest.raises(ConfigError, match="no manifest.json"):
        open_cache(path, expected_manifest(temperature=1.0))


def test_missing_shard_and_bad_arguments(teacher, blocks, cache_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in cache_dir.iterdir():
        if item.name != "shard-00002.tail.npy":
            (copy / item.name).write_bytes(item.read_bytes())
    with pytest.raises(ConfigError, match="incomplete"):
        open_cache(copy, expected_manifest())
    with pytest.raises(ValueError, match="missing"):
        write_cache(teacher, blocks, tmp_path / "x", k=K, temperature=1.0, batch_size=2, manifest={})
    with pytest.raises(ValueError, match="max_length"):
        write_cache(teacher, blocks, tmp_path / "x", k=K, temperature=1.0, batch_size=2,
                    manifest=run_manifest(max_length=8))  # fmt: skip
    with pytest.raises(IndexError):
        open_cache(cache_dir, expected_manifest()).get(torch.tensor([7]))
