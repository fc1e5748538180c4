"""A full disk inside a stage, in this process on one rank: a checkpoint save that runs out of space removes the
unfinished checkpoint and says, in one line, which step it was saving where and which step is intact; any write
that finds the disk full ends the stage with exit 2 and an error.json that says so (from whichever rank it was),
never a traceback. The injected error is what the kernel gives (OSError ENOSPC) or what torch's zip writer turns a
short write into (RuntimeError "unexpected pos")."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from contract.layout import read_bad_input
from stages.runtime import checkpoint, entry
from stages.runtime.checkpoint import NoSpace, Position
from stages.runtime.spec import TrainingSpec
from tests.stages import specs


class Engine:
    """What `checkpoint.save` asks of DeepSpeed's engine; `fail` makes the save run out of space part-way."""

    def __init__(self) -> None:
        self.fail: BaseException | None = None

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        folder = Path(root, tag)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"model " * 100)
        if self.fail is not None:
            raise self.fail
        (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim " * 100)


@pytest.fixture
def spec(tmp_path: Path) -> TrainingSpec:
    specs.copy_data(tmp_path / "data", pretrain_lines=20, labelled_lines=20)
    stages = specs.Stages(tmp_path, specs.head("full") + f"""
  - name: mlm
    kind: mlm
    init: {{config: {specs.TINY_BERT}}}
    tokenizer: {{from: tokenizer}}
    data: {{train: data/pretrain.txt, max_length: 32}}
    train: {{max_steps: 24, micro_batch_size: 4}}
    checkpoint: {{every_steps: 8, keep_last: 2}}
""", tmp_path / "hf")
    spec = stages.spec("mlm", outputs={"tokenizer": {"path": str(tmp_path / "tok"), "digest": None}})
    Path(spec.stage_dir).mkdir(parents=True)
    return TrainingSpec.of(spec)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")],
                         ids=["ENOSPC", "torch-short-write"])
def test_a_save_that_runs_out_of_space_says_which_step_is_intact(spec: TrainingSpec, error: BaseException,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 0)
    engine = Engine()
    assert checkpoint.save(engine, spec, Position(step=8, samples=64)) == "step00000008"
    engine.fail = error
    root = Path(spec.stage_dir) / "ckpt"
    with pytest.raises(NoSpace) as e:
        checkpoint.save(engine, spec, Position(step=16, samples=128))
    assert str(e.value) == (f"no space left on device while saving step 16 to {root / 'step00000016'}; "
                            f"step 8 is intact ({root / 'step00000008'})")
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step00000008"]  # the unfinished one is gone


def test_a_short_write_on_a_disk_with_room_is_not_called_a_full_disk(spec: TrainingSpec,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 10 << 30)
    engine = Engine()
    engine.fail = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    with pytest.raises(RuntimeError, match="unexpected pos"):
        checkpoint.save(engine, spec, Position(step=8, samples=64))


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_full_disk_anywhere_in_a_stage_is_exit_2_with_one_line_from_any_rank(
        spec: TrainingSpec, rank: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RANK", rank)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    metrics = Path(spec.stage_dir) / "metrics.jsonl"
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(metrics))
    assert entry.failure(error, str(spec_path)) == 2
    err = capsys.readouterr().err
    assert err == (f"baton stage error: no space left on device: [Errno 28] No space left on device: "
                   f"'{metrics}'; no checkpoint is intact yet\n")
    report = read_bad_input(spec.stage_dir)
    assert report is not None and report.no_space and report.message == err.removeprefix("baton stage error: ").strip()
    assert json.loads((Path(spec.stage_dir) / "error.json").read_text())["no_space"] is True

    (Path(spec.stage_dir) / "error.json").unlink()
    assert entry.failure(NoSpace("no space left on device while saving step 16 to x; step 8 is intact"),
                         str(spec_path)) == 2
    assert read_bad_input(spec.stage_dir).message.endswith("step 8 is intact")


def test_anything_else_is_a_traceback_and_exit_1(spec: TrainingSpec, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    try:
        raise ZeroDivisionError("a bug")
    except ZeroDivisionError as e:
        assert entry.failure(e, str(spec_path)) == 1
    assert "Traceback" in capsys.readouterr().err
    assert read_bad_input(spec.stage_dir) is None
