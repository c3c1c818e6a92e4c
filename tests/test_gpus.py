"""kagglekd.gpus: the one GPU-profile table and the one resolver of names, machine shapes and devices."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from kagglekd import gpus
from kagglekd.errors import ConfigError, KaggleKDError
from kagglekd.gpus import PROFILES, GiB, resolve


def test_gpu_profiles():
    assert set(PROFILES) == {"T4", "T4x2", "P100", "A100", "L4", "H100", "RTXPRO6000", "cpu"}
    assert gpus.names() == list(PROFILES)
    assert resolve("t4x2").devices == 2 and not resolve("T4").native_bf16
    assert not resolve("P100").supported and resolve("P100").compute_capability == (6, 0)
    assert resolve("A100").native_bf16 and resolve("L4").capacity_bytes == int(22.5 * GiB)
    assert all(profile.known for profile in PROFILES.values())
    with pytest.raises(KeyError):
        resolve("H200", strict=True)


@pytest.mark.parametrize(
    "hint, name",
    [
        ("T4", "T4"),
        ("t4x2", "T4x2"),
        ("T4 x2", "T4x2"),
        ("2xT4", "T4x2"),
        ("Tesla T4 x2", "T4x2"),
        ("A100 x 2", "A100x2"),
        ("CPU", "cpu"),
        ("a100", "A100"),
        # Kaggle kernel-metadata machine shapes (../shared/KAGGLE.md): NvidiaTeslaT4 is T4 x2
        ("NvidiaTeslaT4", "T4x2"),
        ("NvidiaTeslaP100", "P100"),
        ("NvidiaTeslaA100", "A100"),
        ("NvidiaL4X1", "L4"),
        ("NvidiaL4", "L4x4"),
        ("NvidiaH100", "H100"),
        ("NvidiaRtxPro6000", "RTXPRO6000"),
        # nvidia-smi / torch device names
        ("Tesla T4", "T4"),
        ("Tesla P100-PCIE-16GB", "P100"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "RTXPRO6000"),
    ],
)
def test_resolve_names_shapes_and_device_names(hint, name):
    profile = resolve(hint)
    assert profile.name == name and profile.known


def test_counted_profiles_reuse_the_table_row():
    assert resolve("Tesla T4", devices=2) is PROFILES["T4x2"]
    assert resolve("T4x2", devices=1) is PROFILES["T4"]
    four = resolve("NVIDIA L4", devices=4)
    assert (four.name, four.devices, four.capacity_bytes) == ("L4x4", 4, PROFILES["L4"].capacity_bytes)
    assert resolve("A100x2") == dataclasses.replace(PROFILES["A100"], name="A100x2", devices=2)
    assert resolve(PROFILES["L4"]) is PROFILES["L4"]


@pytest.mark.parametrize(
    "hint", ["H200", "NVIDIA H200", "NVIDIA L40S", "NVIDIA RTX 6000 Ada Generation", "NvidiaB200", "cuda", "T40", ""]
)
def test_unknown_gpus_are_unknown_never_a_t4(hint):
    profile = resolve(hint, devices=2)
    assert not profile.known and profile.name == f"unknown ({hint})"
    assert profile.capacity_bytes == 0 and profile.devices == 2 and profile.peak_flops == 0
    with pytest.raises(KaggleKDError, match="matches no GPU profile") as raised:
        resolve(hint, strict=True)
    assert isinstance(raised.value, ConfigError) and raised.value.field == "gpu"


def test_devices_are_read_off_the_device(monkeypatch):
    assert resolve(torch.device("cpu")) is PROFILES["cpu"]
    props = {"Tesla T4": (7, 5, 15 * GiB), "NVIDIA H200": (9, 0, 140 * GiB)}
    name = "Tesla T4"
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: SimpleNamespace(
            name=name, major=props[name][0], minor=props[name][1], total_memory=props[name][2]
        ),
    )
    assert resolve(torch.device("cuda", 0)) is PROFILES["T4"]
    name = "NVIDIA H200"
    h200 = resolve(torch.device("cuda", 1))
    assert not h200.known and h200.name == "unknown (NVIDIA H200)"
    assert h200.capacity_bytes == 140 * GiB and h200.compute_capability == (9, 0) and h200.native_bf16
    resolve(torch.device("cuda", 1), strict=False)  # an unknown device is fine where the device itself is planned
    with pytest.raises(KaggleKDError):
        resolve(torch.device("cuda", 1), strict=True)


def test_resolving_a_name_never_touches_cuda(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("CUDA touched")

    monkeypatch.setattr(torch.cuda, "get_device_properties", tripwire)
    monkeypatch.setattr(torch.cuda, "is_available", tripwire)
    assert not resolve("cuda:0").known and resolve("Tesla T4").name == "T4"


def test_every_bundle_accelerator_is_a_documented_shape_with_a_real_profile():
    """``bundle --accelerator`` offers only shapes the Kaggle CLI documents, each planned with a table profile."""
    assert set(gpus.BUNDLE_ACCELERATORS) <= set(gpus.KAGGLE_ACCELERATORS)
    assert not set(gpus.BUNDLE_ACCELERATORS) & set(gpus.RETIRED_ACCELERATORS)
    for shape in gpus.BUNDLE_ACCELERATORS:
        profile = resolve(shape, strict=True)
        assert profile.known and profile.supported and profile.capacity_bytes > 10 * GiB, shape
        assert profile.peak_flops > 0 and profile.compute_capability >= (7, 5), shape
    # memory per device as nvidia-smi reports it; devices as Kaggle's accelerator names them
    assert resolve("NvidiaH100").capacity_bytes == 81559 * 1024**2 and resolve("NvidiaH100").native_bf16
    assert resolve("NvidiaRtxPro6000").capacity_bytes == 97887 * 1024**2
    assert resolve("NvidiaRtxPro6000").compute_capability == (12, 0)
    assert (resolve("NvidiaL4").devices, resolve("NvidiaL4X1").devices, resolve("NvidiaTeslaT4").devices) == (4, 1, 2)
