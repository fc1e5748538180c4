"""`launcher.nproc_per_node: auto` (one process per GPU of the node; 1 without GPUs) and the stage's refusal of
bf16 on a GPU without it. No GPU here: the GPU counts come from CUDA_VISIBLE_DEVICES and a stand-in for the NVIDIA
driver's list, the bf16 answer from a stand-in for torch.cuda's."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.devices import visible_gpus
from launcher.errors import ConfigError
from tests.test_ledger_plan import stages_of, write_manifest


def test_visible_gpus_are_cuda_visible_devices_else_the_driver_s_list(tmp_path: Path) -> None:
    listed = tmp_path / "gpus"
    assert visible_gpus({}, listed) == 0  # no NVIDIA driver
    for bus in ("0000:17:00.0", "0000:65:00.0", "0000:ca:00.0"):
        (listed / bus).mkdir(parents=True)
    assert visible_gpus({}, listed) == 3
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,0"}, listed) == 2
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-5f1a,MIG-3c2b"}, listed) == 2
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,1"}, listed) == 1  # CUDA stops at an invalid entry
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, listed) == 0


def test_auto_is_one_process_per_gpu_and_one_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = {r.name: r for r in stages_of(write_manifest(tmp_path / "one", nproc=1))}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a machine without GPUs, whatever this one has
    auto = {r.name: r for r in stages_of(write_manifest(tmp_path / "auto", nproc="auto"))}  # type: ignore[arg-type]
    assert {n: r.nproc_per_node for n, r in auto.items()} == {"tok": 1, "pre": 1, "cls": 1}
    # on the CPU, auto is an explicit 1: the same specs, so the same fingerprints and results
    strip = lambda r: {k: v for k, v in r.base.items() if k not in ("inputs", "data")}  # noqa: E731 (paths differ)
    assert all(strip(auto[n]) == strip(one[n]) for n in one)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    four = {r.name: r for r in stages_of(write_manifest(tmp_path / "auto", nproc="auto"))}  # type: ignore[arg-type]
    assert (four["pre"].nproc_per_node, four["pre"].world_size, four["tok"].nproc_per_node) == (4, 4, 1)
    assert four["pre"].base["train"]["global_batch_size"] == 4 * 4  # micro batch 4 on each of the 4 ranks


def test_auto_under_slurm_is_the_gpus_each_node_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.manifest import load
    from launcher.resolve import resolve

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the submitting machine's GPUs do not count
    manifest = write_manifest(tmp_path, nproc="auto")  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as e:
        resolve(load(manifest), under_slurm=True)
    assert f"{manifest}:4 defaults.launcher.nproc_per_node: auto under `baton submit`" in str(e.value)
    assert "set slurm.gpus_per_node" in str(e.value)
    text = manifest.read_text().replace("defaults:\n", "defaults:\n  slurm: {gpus_per_node: 8}\n")
    manifest.write_text(text)
    stages = {r.name: r for r in resolve(load(manifest), under_slurm=True)}
    assert (stages["pre"].nproc_per_node, stages["tok"].nproc_per_node) == (8, 1)
    assert {r.name: r.nproc_per_node for r in resolve(load(manifest))}["pre"] == 1  # `baton run` here: 1 GPU


def test_bf16_on_a_gpu_without_it_is_refused_with_what_to_set() -> None:
    torch = pytest.importorskip("torch")
    from stages.runtime.dist import precision_refused

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    why = precision_refused("bf16", gpu, supports_bf16=lambda: False, name=lambda: "Tesla V100-SXM2-32GB")
    assert why is not None and "Tesla V100-SXM2-32GB" in why and "set precision: fp16" in why
    assert precision_refused("bf16", gpu, supports_bf16=lambda: True, name=lambda: "NVIDIA H100") is None
    assert precision_refused("fp16", gpu, supports_bf16=lambda: False, name=lambda: "Tesla T4") is None
    assert precision_refused("bf16", cpu) is None  # the CPU trains bf16 (the stage tests do)
