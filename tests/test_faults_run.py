"""Issue 22, the run-folder cases: nothing lost, nothing silently wrong when a user or a second process does the
unexpected – `~` in out_dir, two processes in one folder, evaluating a damaged run, resuming with fewer epochs, a
checkpoint that does not state how to rebuild its model, paths taken from a checkpoint. Real processes where the
case is about processes."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mopoe.io import RunLockedError, load_verified, run_lock, save_verified
from mopoe.train import CheckpointError, evaluate_saved, load_run, main_eval, resolve_config, train
from toys import INFO, ToyPairs

DATA = (ToyPairs(64, 0), ToyPairs(16, 1), INFO)
BIN = Path(sys.executable).parent
T = ["--dataset", "mnist_svhn_text", "--num_train", "128", "--num_test", "64", "--epochs", "1", "--latent_dim", "8",
     "--batch_size", "64", "--classifier_epochs", "1", "--loglik_samples", "2", "--loglik_max_test", "8",
     "--device", "cpu"]


def cfg_for(out, **kw):
    return resolve_config(**{**dict(dataset="mnist_svhn_text", epochs=2, batch_size=32, latent_dim=4, out_dir=str(out),
                                    device="cpu"), **kw})


def files(out):
    return {p.name: p.read_bytes() for p in Path(out).iterdir() if p.is_file()}


def cli(*args, cwd, env=None, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [str(BIN / args[0]), *map(str, args[1:])]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_tilde_in_out_dir_is_the_home_folder_everywhere(tmp_path, data_dir):
    "Case 1 and 5: `~/r1` is expanded once; a second fresh run into it is refused; the message names the real path."
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(); work.mkdir()
    env = {"HOME": str(home)}
    p = cli("mopoe-train", *T, "--data_dir", data_dir, "--out_dir", "~/r1", cwd=work, env=env)
    assert p.returncode == 0, p.stderr
    assert (home / "r1" / "results.json").exists() and not (work / "~").exists()
    assert f"wrote {home / 'r1' / 'results.json'}" in p.stdout
    before = files(home / "r1")
    p2 = cli("mopoe-train", *T, "--data_dir", data_dir, "--out_dir", "~/r1", cwd=work, env=env)
    assert p2.returncode == 1 and "already holds a run" in p2.stderr and str(home / "r1") in p2.stderr
    assert files(home / "r1") == before
    assert resolve_config(out_dir="$HOME/x", data_dir="~/d").out_dir.startswith("/")


def test_two_runs_into_one_folder_cannot_both_run(tmp_path, data_dir):
    "Case 2: two processes started into one folder at once: one trains, the other is refused; nothing is mixed."
    out = tmp_path / "run"
    procs = [cli("mopoe-train", *T, "--data_dir", data_dir, "--out_dir", out, cwd=tmp_path, wait=False)
             for _ in range(2)]
    res = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in res)
    assert codes == [0, 1], res
    err = next(e for c, e in res if c == 1)
    assert "is in use by another mopoe process" in err or "already holds a run" in err, err
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1]
    assert json.loads((out / "results.json").read_text())["history"][-1]["epoch"] == 1


def test_a_second_process_cannot_resume_a_run_in_progress(tmp_path):
    "Case 4: while a process (here: this test process) holds the run, `--resume true` from another is refused by PID."
    out = tmp_path / "run"
    train(cfg_for(out), progress=False, data=DATA)
    before = files(out)
    with run_lock(out):
        p = cli("mopoe-train", *T, "--out_dir", out, "--resume", "true", "--epochs", "3", "--data_dir", tmp_path / "d",
                cwd=tmp_path)
    assert p.returncode == 1 and str(os.getpid()) in p.stderr, p.stderr
    assert ({k: v for k, v in files(out).items() if k != ".mopoe.lock"}
            == {k: v for k, v in before.items() if k != ".mopoe.lock"})


def test_in_process_second_holder_is_refused(tmp_path):
    out = tmp_path / "run"
    ready = tmp_path / "ready"
    code = (f"import time, pathlib; from mopoe.io import run_lock\n"
            f"with run_lock({str(out)!r}):\n    pathlib.Path({str(ready)!r}).write_text('1'); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(300):
            if ready.exists(): break
            time.sleep(0.05)
        with pytest.raises(RunLockedError, match=str(holder.pid)):
            train(cfg_for(out), progress=False, data=DATA)
    finally: holder.kill(); holder.wait()
    train(cfg_for(out), progress=False, data=DATA)              # the killed holder's lock is taken over
    assert (out / "checkpoint.pt").exists()


def damaged_run(tmp_path, data_dir):
    out = tmp_path / "run"
    p = cli("mopoe-train", *T, "--epochs", "2", "--data_dir", data_dir, "--out_dir", out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    raw = bytearray((out / "checkpoint.pt").read_bytes()); raw[len(raw) // 2] ^= 0xFF
    (out / "checkpoint.pt").write_bytes(bytes(raw))
    return out


def test_eval_of_a_damaged_final_checkpoint_replaces_nothing(tmp_path, data_dir, capsys):
    "Case 3: mopoe-eval refuses a damaged checkpoint.pt; with --use_prev it evaluates epoch 1 into its own file."
    out = damaged_run(tmp_path, data_dir)
    before = files(out)
    assert main_eval([str(out), "--device", "cpu", "--data_dir", str(data_dir)]) == 1
    assert "use_prev" in capsys.readouterr().err and files(out) == before
    assert main_eval([str(out), "--device", "cpu", "--data_dir", str(data_dir), "--use_prev", "true"]) == 0
    prev = json.loads((out / "results.prev_epoch1.json").read_text())
    assert prev["evaluated_epoch"] == 1 and prev["written_by"] == "mopoe-eval"
    assert (out / "results.json").read_bytes() == before["results.json"]
    assert json.loads(before["results.json"])["evaluated_epoch"] == 2


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path):
    "Case 6: resuming a 2-epoch run with epochs=1 would put results.json on a 2-epoch model: refused, nothing changed."
    out = tmp_path / "run"
    train(cfg_for(out), progress=False, data=DATA)
    before = files(out)
    with pytest.raises(CheckpointError, match="has done 2 epochs, more than epochs=1"):
        train(cfg_for(out, epochs=1, resume=True), progress=False, data=DATA)
    assert files(out) == before


def test_a_checkpoint_that_does_not_state_its_build_is_refused(tmp_path):
    "Case 7: a checkpoint whose config lacks an option that builds the model is refused by name, never rebuilt anew."
    out = tmp_path / "run"
    train(cfg_for(out), progress=False, data=DATA)
    state = load_verified(out / "checkpoint.pt")
    assert load_run(out).config.encoder_init == "he_leaky"
    state["config"].pop("encoder_init")
    save_verified(state, out / "checkpoint.pt")                   # a well-formed file from an earlier version
    with pytest.raises(CheckpointError, match=r"did not record \['encoder_init'\]"):
        load_run(out)
    state["config"]["encoders"] = "he_leaky"                      # the option's old name is read as the new one
    save_verified(state, out / "checkpoint.pt")
    assert load_run(out).config.encoder_init == "he_leaky"


def test_paths_in_a_checkpoint_are_never_used_for_writing(tmp_path, data_dir, monkeypatch):
    "Case 10: a crafted checkpoint's data_dir does not decide where mopoe-eval writes caches."
    out = tmp_path / "run"
    p = cli("mopoe-train", *T, "--data_dir", data_dir, "--out_dir", out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    state = load_verified(out / "checkpoint.pt")
    evil = tmp_path / "elsewhere"
    state["config"]["data_dir"] = str(evil)
    save_verified(state, out / "checkpoint.pt")
    assert load_run(out).config.data_dir == "data"
    monkeypatch.chdir(tmp_path)
    evaluate_saved(out, device="cpu", progress=False, data_dir=str(data_dir))
    assert not evil.exists()


def test_temp_files_of_killed_writes_are_cleaned_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    train(cfg_for(out), progress=False, data=DATA)
    (out / ".checkpoint.pt.new").write_bytes(b"x" * 1000)         # what a kill during a checkpoint write leaves
    train(cfg_for(out, epochs=3, resume=True), progress=False, data=DATA)
    assert not (out / ".checkpoint.pt.new").exists()


def test_old_option_names_are_refused_with_their_name_today(capsys):
    "The names retired in 0.1 are refused before any work, naming today's option; stored configs still read them."
    from mopoe.train import main, stored_options
    assert main(["--model", "mvae", "--objective", "mopoe"]) == 2           # never trains MVAE under a rename warning
    assert "unrecognized arguments: --model mvae" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'model' is now called 'objective'"):
        resolve_config(model="mvae", objective="mopoe")
    cfg = resolve_config(stored_options({"model": "powerset", "encoders": "paper", "num_samples": 3}))
    assert (cfg.objective, cfg.encoder_init, cfg.loglik_samples) == ("subset_elbos", "paper", 3)


def test_sweep_outside_the_repository_fails_before_creating_anything(tmp_path):
    import papermill as pm
    nb = Path(__file__).resolve().parents[1] / "nbs" / "sweep.ipynb"
    with pytest.raises(pm.PapermillExecutionError, match="train.ipynb is neither in"):
        pm.execute_notebook(str(nb), str(tmp_path / "o.ipynb"), parameters={"runs_dir": str(tmp_path / "runs")},
                            cwd=str(tmp_path), progress_bar=False, kernel_name="python3")
    assert not (tmp_path / "runs").exists()
