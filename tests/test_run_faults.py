"""Issue 28 in the run's rooms: loggers rebuilt on resume, no logger file followed or overwritten, a run stopped
mid-epoch evaluated as saved, a full disk under a logger named with the checkpoint intact, errors knowable before
training refused before it, and the training notebook with any subset of the metrics."""
import csv
import dataclasses
import errno
import json
import os
import warnings
from pathlib import Path

import pytest

import mopoe.build
import mopoe.loggers
from conftest import TINY
from mopoe.io import DiskFullError
from mopoe.train import StopAfter, evaluate_saved, load_checkpoint, resolve_config, run, save_checkpoint, train
from toys import INFO, ToyPairs

DATA = (ToyPairs(96, 0), ToyPairs(32, 1), INFO)


def cfg_for(out, **kw):
    return resolve_config(**{**dict(dataset="mnist_svhn_text", epochs=3, batch_size=32, latent_dim=4, device="cpu",
                                    out_dir=str(out), data_dir=str(Path(out).parent / "data")), **kw})


def _epochs(path: Path) -> list:
    if path.suffix == ".csv": return [int(r["epoch"]) for r in csv.DictReader(open(path))]
    return [json.loads(s)["epoch"] for s in path.read_text().splitlines()]


def test_loggers_are_rebuilt_from_the_checkpoint_on_resume(tmp_path):
    "#6: a kill between the checkpoint and the loggers, and a fall back to .prev: every file lists each epoch once."
    out = tmp_path / "run"
    train(cfg_for(out, epochs=2, loggers="jsonl,csv"), progress=False, data=DATA)
    # the loggers of epoch 2 never ran (a kill after the checkpoint): the files stop at epoch 1
    for name in ("metrics.jsonl", "metrics.csv"):
        lines = (out / name).read_text().splitlines(keepends=True)
        (out / name).write_text("".join(lines[:-1]))
    train(cfg_for(out, epochs=3, loggers="jsonl,csv", resume=True), progress=False, data=DATA)
    assert _epochs(out / "metrics.jsonl") == _epochs(out / "metrics.csv") == [1, 2, 3]
    # checkpoint.pt damaged: resume falls back to the epoch-2 checkpoint and redoes epoch 3 – listed once
    (out / "checkpoint.pt").write_bytes(b"damaged")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        train(cfg_for(out, epochs=3, loggers="jsonl,csv", resume=True), progress=False, data=DATA)
    assert _epochs(out / "metrics.jsonl") == _epochs(out / "metrics.csv") == [1, 2, 3]


def test_tensorboard_events_past_the_checkpoint_are_purged(tmp_path):
    "#6: TensorBoard's step scalars after a resume from an earlier checkpoint hold each step once."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    train(cfg_for(out, epochs=3, loggers="tensorboard", sync_every=1), progress=False, data=DATA)
    (out / "checkpoint.pt").write_bytes(b"damaged")                     # back to epoch 2: steps 7..9 are written again
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        train(cfg_for(out, epochs=3, loggers="tensorboard", sync_every=1, resume=True), progress=False, data=DATA)
    acc = EventAccumulator(str(out / "tensorboard")); acc.Reload()
    steps = [e.step for e in acc.Scalars("step/loss")]
    assert steps == list(range(1, 10)), steps
    assert [e.step for e in acc.Scalars("epoch/train_loss")] == [3, 6, 9]


@pytest.mark.parametrize("name", ["metrics.csv", "tensorboard"])
def test_a_fresh_run_refuses_a_folder_holding_a_logger_file(tmp_path, name):
    "#7: a metrics.csv or tensorboard/ of another run: refused before anything is written, the file untouched."
    out = tmp_path / "run"; out.mkdir()
    (out / name).mkdir() if name == "tensorboard" else (out / name).write_text("epoch,old\n1,2\n")
    with pytest.raises(FileExistsError, match=f"already holds a run \\({name}\\)"):
        train(cfg_for(out, loggers="jsonl,csv,tensorboard"), progress=False, data=DATA)
    assert sorted(p.name for p in out.iterdir()) == [name]
    if name == "metrics.csv": assert (out / name).read_text() == "epoch,old\n1,2\n"


def test_no_logger_writes_through_a_link(tmp_path):
    "#7: a metrics.csv link to a file outside the folder is refused, and the file it points to is not touched."
    outside = tmp_path / "notes.txt"; outside.write_text("my notes")
    out = tmp_path / "run"; out.mkdir(); (out / "metrics.csv").symlink_to(outside)
    with pytest.raises(FileExistsError, match="metrics.csv"):
        train(cfg_for(out, loggers="csv"), progress=False, data=DATA)
    assert outside.read_text() == "my notes"
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        mopoe.loggers.append_text(out / "metrics.csv", "x")
    assert outside.read_text() == "my notes"


def test_a_run_stopped_mid_epoch_evaluates_what_was_saved(tmp_path, data_dir, capsys):
    "#8: results.json holds the numbers of the checkpoint it names – the same as mopoe-eval of that checkpoint."
    out = tmp_path / "run"
    cfg = resolve_config(**{**TINY, "epochs": 3, "metrics": "latent,loglik", "data_dir": str(data_dir),
                            "out_dir": str(out)})
    res = run(cfg, callbacks=[StopAfter(4)], progress=True)            # 3 steps an epoch: stopped in epoch 2
    assert "stopped during epoch 2: evaluating checkpoint.pt (epoch 1)" in capsys.readouterr().out
    first = json.loads((out / "results.json").read_text())
    assert first["evaluated_epoch"] == 1 and load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    again = evaluate_saved(out, device="cpu", progress=False)
    assert again["metrics"]["loglik"] == first["metrics"]["loglik"]
    assert again["metrics"]["latent"] == first["metrics"]["latent"]
    assert res["metrics"]["loglik"] == first["metrics"]["loglik"]


def test_a_run_stopped_before_its_first_epoch_evaluates_nothing(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    cfg = resolve_config(**{**TINY, "metrics": "latent", "data_dir": str(data_dir), "out_dir": str(out)})
    res = run(cfg, callbacks=[StopAfter(1)], progress=False)
    assert res["results"] is None and not (out / "results.json").exists()
    assert "nothing was saved" in capsys.readouterr().out


def test_a_full_disk_under_a_logger_names_its_file_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    "#14: ENOSPC while the JSON-lines logger appends: DiskFullError naming metrics.jsonl, the epoch's checkpoint kept."
    real = os.write
    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)
    monkeypatch.setattr(mopoe.loggers.os, "write", full)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError,
                       match=r"metrics.jsonl; the checkpoint of epoch 1 was saved before it and is intact"):
        train(cfg_for(out), progress=False, data=DATA)
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    train(cfg_for(out, resume=True), progress=False, data=DATA)           # space again: resume rebuilds the file
    assert _epochs(out / "metrics.jsonl") == [1, 2, 3]


@pytest.mark.parametrize("options, message", [
    (dict(metrics=""), "metrics must name at least one metric"),
    (dict(metrics="latent,fid", fid_weights="/no/such/inception.pth"),
     "fid_weights '/no/such/inception.pth' is not a file"),
    (dict(objective="mvae", objective_options="unimodal_elbos=maybe"), "unimodal_elbos must be true or false"),
    (dict(objective="mmvaeplus", objective_options="K=four"), "K must be a whole number, got 'four'"),
    (dict(objective="mmjsd", objective_options="prior_weight=2"), "prior_weight must lie in (0, 1)"),
    (dict(objective="mopoe", objective_options="kl=row_subset"), "'kl' is a run option"),
])
def test_errors_knowable_before_training_come_before_any_data(options, message, tmp_path, monkeypatch):
    "#4, #12, #15: typed objective options and evaluation options are refused before the data is built."
    monkeypatch.setattr(mopoe.build, "build_data", lambda cfg: pytest.fail("data was built"))
    with pytest.raises(ValueError) as e:
        run(dict(out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), **options))
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


def test_objective_option_strings_are_typed(tmp_path):
    "#4: 'false' means False (not a truthy string) – the model trains without the unimodal ELBOs."
    cfg = cfg_for(tmp_path / "run", objective="mvae", objective_options="unimodal_elbos=false", epochs=1)
    assert cfg.objective_options == "unimodal_elbos=False"
    res = train(cfg, progress=False, data=DATA)
    assert res["model"].objective.unimodal_elbos is False


def test_a_run_logged_with_a_missing_logger_still_evaluates(tmp_path, data_dir):
    "#15: mopoe-eval needs no training logger: a run whose logger's package is gone evaluates and reloads."
    out = tmp_path / "run"
    run(resolve_config(**{**TINY, "metrics": "latent", "data_dir": str(data_dir), "out_dir": str(out)}), progress=False)
    state = load_checkpoint(out / "checkpoint.pt")
    state["config"]["loggers"] = "jsonl,no_longer_installed"
    os.remove(out / "checkpoint.pt"); save_checkpoint(state, out)
    res = evaluate_saved(out, device="cpu", progress=False)
    assert res["metrics"]["latent"]["per_subset"]


@pytest.mark.slow
def test_the_training_notebook_renders_with_any_metric_subset(tmp_path, data_dir):
    "#13: papermill train.ipynb -p metrics latent runs every cell (no classifiers, no coherence, no log-likelihood)."
    import papermill as pm
    nb = Path(__file__).resolve().parents[1] / "nbs" / "train.ipynb"
    params = {**TINY, "metrics": "latent", "data_dir": str(data_dir), "out_dir": str(tmp_path / "run")}
    pm.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), parameters=params, progress_bar=False,
                        kernel_name="python3")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(res["metrics"]["metrics"]) == {"latent"} and "coherence" not in res["metrics"]
    out = json.loads((tmp_path / "out.ipynb").read_text())
    assert not [o for c in out["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert dataclasses.is_dataclass(resolve_config(**{k: v for k, v in params.items()}))


def test_a_full_disk_under_tensorboard_names_its_folder_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    "#14: ENOSPC in TensorBoard's writer thread: DiskFullError naming the event folder, the epoch's checkpoint saved."
    from tensorboard.summary.writer import record_writer
    real, calls = record_writer.RecordWriter.write, []
    def full(self, data):                                 # the event file's header fits; the disk fills after
        calls.append(1)
        if len(calls) > 1: raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(record_writer.RecordWriter, "write", full)
    out = tmp_path / "run"
    with pytest.raises(DiskFullError,
                       match=r"tensorboard; the checkpoint of epoch 1 was saved before it and is intact"):
        train(cfg_for(out, loggers="jsonl,tensorboard"), progress=False, data=DATA)
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and _epochs(out / "metrics.jsonl") == [1]
