"""Fault injection: a kill or a full disk during a checkpoint write, bit flips in every stored file, a crafted pickle,
bad inputs. Each case asserts the error text and that nothing was lost (the previous checkpoint and the metrics
intact and loadable, a resumed run equal to an uninterrupted one)."""
import dataclasses
import errno
import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mopoe.build
import mopoe.io
import mopoe.train as T
from mopoe.io import DiskFullError, content_digest, load_verified
from mopoe.train import CheckpointError, load_checkpoint, read_results, resolve_config, sweep_config, train
from toys import INFO, ToyPairs

DATA = (ToyPairs(64, 0), ToyPairs(16, 1), INFO)


def cfg_for(out, **kw):
    return resolve_config(dataset="mnist_svhn_text", epochs=3, batch_size=32, latent_dim=4, out_dir=str(out),
                          device="cpu", **kw)


def params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "An uninterrupted 3-epoch run: its final parameters and history."
    res = train(cfg_for(tmp_path_factory.mktemp("ref")), progress=False, data=DATA)
    return params(res["model"]), [h["train_loss"] for h in res["history"]]


def two_epochs(tmp_path):
    out = tmp_path / "run"
    train(dataclasses.replace(cfg_for(out), epochs=2), progress=False, data=DATA)
    return out


def snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir()}


def epochs_in_metrics(out):
    return [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def assert_resume_matches(out, reference):
    res = train(cfg_for(out, resume=True), progress=False, data=DATA)
    ref_params, ref_losses = reference
    assert [h["train_loss"] for h in res["history"]] == ref_losses
    for k, v in params(res["model"]).items(): assert torch.equal(v, ref_params[k]), k
    assert epochs_in_metrics(out) == [1, 2, 3]


def half_then(exc, target="checkpoint.pt"):
    "A writer that fails half way through writing `target` (other files are written normally)."
    def write(f, data):
        if target not in os.path.basename(f.name): return f.write(data)
        f.write(data[:len(data) // 2]); raise exc
    return write


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(9), OSError(errno.EIO, "Input/output error")])
def test_kill_during_checkpoint_write_loses_nothing(exc, tmp_path, monkeypatch, reference):
    out = two_epochs(tmp_path)
    before = snapshot(out)
    monkeypatch.setattr(mopoe.io, "_write", half_then(exc))
    with pytest.raises(type(exc)):
        train(cfg_for(out, resume=True), progress=False, data=DATA)
    monkeypatch.undo()
    assert snapshot(out) == before                           # checkpoint, .prev and metrics untouched, no temp file
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2 and epochs_in_metrics(out) == [1, 2]
    assert_resume_matches(out, reference)


@pytest.mark.parametrize("target", ["checkpoint.pt", "metrics.jsonl"])
def test_full_disk_names_the_file_and_the_intact_checkpoint(target, tmp_path, monkeypatch, reference):
    out = two_epochs(tmp_path)
    before = snapshot(out)
    monkeypatch.setattr(mopoe.io, "_write", half_then(OSError(errno.ENOSPC, "No space left on device"), target))
    with pytest.raises(DiskFullError) as e:
        train(cfg_for(out, resume=True), progress=False, data=DATA)
    monkeypatch.undo()
    if target == "checkpoint.pt":
        assert str(e.value) == (f"no space left on device while writing {out / 'checkpoint.pt'}; "
                                f"the previous checkpoint {out / 'checkpoint.pt'} is intact")
    else:                                                                                    # before training
        assert str(e.value) == (f"no space left on device while writing {out / 'metrics.jsonl'}; the checkpoint of "
                                f"epoch 2 was saved before it and is intact (resume rebuilds metrics.jsonl)")
    assert snapshot(out) == before
    assert_resume_matches(out, reference)


def test_kill_between_the_rotation_renames_resumes_from_prev(tmp_path, reference):
    out = two_epochs(tmp_path)
    os.replace(out / "checkpoint.pt", out / "checkpoint.prev.pt")     # killed after the first rename: only .prev left
    with pytest.warns(UserWarning, match="using the previous checkpoint .*checkpoint.prev.pt \\(epoch 2\\)"):
        assert_resume_matches(out, reference)


@pytest.mark.parametrize("damage", ["missing line", "extra line"])
def test_metrics_agree_with_the_checkpoint_after_a_kill(damage, tmp_path, reference):
    out = two_epochs(tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines(True)
    # killed after the checkpoint but before the metrics line / a writer that logged an epoch it never saved
    (out / "metrics.jsonl").write_text("".join(lines[:1] if damage == "missing line" else lines + lines[1:]))
    assert_resume_matches(out, reference)


def _flip_positions(n, k=24):
    return sorted({int(i * (n - 1) / (k - 1)) for i in range(k)})


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint.prev.pt"])
def test_bit_flips_in_a_checkpoint_never_load_silently(name, tmp_path):
    out = two_epochs(tmp_path)
    path = out / name
    good = path.read_bytes()
    state = load_checkpoint(path)
    digest = content_digest(state)
    weights = state["model"][next(iter(state["model"]))].numpy().tobytes()
    detected = 0
    positions = _flip_positions(len(good)) + [good.find(weights) + 3]  # spread over the file, and inside the weights
    for pos in positions:
        raw = bytearray(good); raw[pos] ^= 0x04; path.write_bytes(bytes(raw))
        try: loaded = load_checkpoint(path)
        except CheckpointError as e:
            assert str(path) in str(e), e
            if name == "checkpoint.pt": assert "checkpoint.prev.pt (epoch 1) is intact" in str(e), e
            detected += 1
        else: assert content_digest(loaded) == digest, f"flip at byte {pos} changed the contents silently"
    path.write_bytes(good)
    assert detected >= len(positions) // 2                   # (a flip in zip padding changes nothing and may load)
    raw = bytearray(good); raw[positions[-1]] ^= 0x04; path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="fails its digest check|corrupted"):
        load_checkpoint(path)


def test_a_flipped_checkpoint_is_survived_by_resume(tmp_path, reference):
    out = two_epochs(tmp_path)
    raw = bytearray((out / "checkpoint.pt").read_bytes()); raw[len(raw) // 2] ^= 0xFF
    (out / "checkpoint.pt").write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="checkpoint.pt"):
        res = train(cfg_for(out, resume=True), progress=False, data=DATA)
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3] and epochs_in_metrics(out) == [1, 2, 3]
    assert (out / "checkpoint.damaged.pt").exists()         # kept for inspection, out of the rotation


def test_both_checkpoints_damaged_is_an_error_naming_both(tmp_path):
    out = two_epochs(tmp_path)
    for n in ("checkpoint.pt", "checkpoint.prev.pt"): (out / n).write_bytes((out / n).read_bytes()[:500])
    with pytest.raises(CheckpointError, match="checkpoint.pt is corrupted.*checkpoint.prev.pt is corrupted"):
        train(cfg_for(out, resume=True), progress=False, data=DATA)


class Evil:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("with_prev", [True, False])
def test_a_crafted_pickle_never_executes(with_prev, tmp_path):
    out = two_epochs(tmp_path)
    marker = tmp_path / "pwned"
    if not with_prev: (out / "checkpoint.prev.pt").unlink()
    state = load_checkpoint(out / "checkpoint.pt")
    torch.save({"format": mopoe.io.FORMAT, "digest": "0", "payload": {**state, "epoch": Evil(marker)}},
               out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="refused unexecuted"):
        load_checkpoint(out / "checkpoint.pt")
    if with_prev:
        with pytest.warns(UserWarning, match="using the previous checkpoint"):
            res = train(cfg_for(out, resume=True), progress=False, data=DATA)
        assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    else:
        with pytest.raises(CheckpointError, match="refused unexecuted"):
            train(cfg_for(out, resume=True), progress=False, data=DATA)
    assert not marker.exists()


def test_classifier_cache_flips_are_rebuilt(tmp_path):
    from mopoe.evaluate import train_classifiers
    info = SimpleNamespace(**{**vars(INFO), "multilabel": False, "label_names": [str(i) for i in range(10)],
                              "name": "mnist_svhn_text"})
    ds = ToyPairs(64, 0)
    kw = dict(epochs=1, batch_size=32, cache_dir=str(tmp_path), test_ds=ToyPairs(16, 1), arch="mlp", hidden=(8,),
              progress=False)
    first = train_classifiers(ds, info, **kw)
    good = Path(first.path).read_bytes()
    for pos in _flip_positions(len(good), 8):
        raw = bytearray(good); raw[pos] ^= 0x01; Path(first.path).write_bytes(bytes(raw))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            again = train_classifiers(ds, info, **kw)
        if again.from_cache:
            assert content_digest(load_verified(first.path)) == content_digest(load_verified(first.path))
        else: assert any("retraining" in str(x.message) for x in w)
        assert again.scores == first.scores                  # the same classifiers either way
        load_verified(first.path)                            # and the cache is whole again


def test_results_and_sweep_files(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text('{"config": {"epochs": 2')       # truncated
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        read_results(tmp_path / "r", resolve_config())
    with pytest.raises(ValueError, match="unknown objective '../../x'"):
        sweep_config(tmp_path / "runs", objective="../../x")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match="runs_dir .* is not a folder"):
        sweep_config(tmp_path / "afile")


@pytest.mark.parametrize("options, message", [
    (dict(num_train=0), "num_train must be at least 1 (or None), got 0"),
    (dict(num_train=-5), "num_train must be at least 1 (or None), got -5"),
    (dict(beta="abc"), "beta must be a number, got 'abc'"),
    (dict(epochs=1.5), "epochs must be a whole number, got 1.5"),
    (dict(lr="-1"), "lr must be greater than 0"),
    (dict(objective="poe"), "unknown objective 'poe'"),
    (dict(out_dir=""), "out_dir must be a folder name"),
])
def test_bad_config_is_refused_before_any_work(options, message, tmp_path, monkeypatch):
    monkeypatch.setattr(mopoe.build, "build_data", lambda cfg: pytest.fail("data was built"))
    with pytest.raises(ValueError) as e:
        T.run(dict(dict(out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data")), **options))
    assert message in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_paths_are_checked_before_anything_is_created(tmp_path, monkeypatch):
    monkeypatch.setattr(mopoe.build, "build_data", lambda cfg: pytest.fail("data was built"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="out_dir .*file' exists and is not a folder"):
        T.run(resolve_config(out_dir=str(tmp_path / "file"), data_dir=str(tmp_path / "data")))
    with pytest.raises(NotADirectoryError, match="data_dir"):
        T.run(resolve_config(out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "file")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_fresh_run_never_touches_another_run(tmp_path):
    out = two_epochs(tmp_path)
    before = snapshot(out)
    with pytest.raises(FileExistsError,
                       match="already holds a run .*resume it with resume=True, or choose another out_dir"):
        train(cfg_for(out), progress=False, data=DATA)
    assert snapshot(out) == before


def test_resume_compares_paths_resolved(tmp_path, monkeypatch, reference):
    monkeypatch.chdir(tmp_path)
    out = two_epochs(tmp_path)
    res = train(cfg_for(out, resume=True, data_dir="./data/"), progress=False, data=DATA)   # "data" == "./data/"
    assert [h["epoch"] for h in res["history"]] == [1, 2, 3]
    with pytest.raises(CheckpointError, match="another config: {'data_dir'"):
        train(cfg_for(out, resume=True, data_dir="other"), progress=False, data=DATA)


def test_reload_of_a_damaged_final_checkpoint_is_refused_unless_asked_and_changes_no_file(tmp_path):
    "A damaged checkpoint.pt is an error naming the intact previous one; use_prev=True loads that one; no file changes."
    from mopoe.train import load_run
    out = two_epochs(tmp_path)
    raw = bytearray((out / "checkpoint.pt").read_bytes()); raw[len(raw) // 2] ^= 0xFF
    (out / "checkpoint.pt").write_bytes(bytes(raw))
    before = snapshot(out)
    with pytest.raises(CheckpointError, match="checkpoint.prev.pt \\(epoch 1\\) is intact.*use_prev=True"):
        load_run(out)
    saved = load_run(out, use_prev=True)
    assert saved.state["epoch"] == 1 and not saved.model.training and snapshot(out) == before


# ---------------------------------------------------------------- data: caches, unpacking, input checks (issue 22)
import zipfile

import numpy as np
from PIL import Image

import fixtures_real as fx
from mopoe.data import DataFormatError, get_datasets

def _rewrite_pngs(folder, pixels_of, compress_level=0):
    "Rewrite every PNG under `folder` (same names) with `pixels_of(path) -> (28, 28, 3) uint8`, uncompressed: one size."
    for f in sorted(folder.rglob("*.png")):
        Image.fromarray(pixels_of(f)).save(f, compress_level=compress_level)


@pytest.mark.parametrize("keep_mtimes", [False, True])
def test_real_polymnist_cache_follows_replaced_images(keep_mtimes, tmp_path):
    "Case 8: replacing the released images (same names, same counts) must not reuse the cache of the old ones."
    fx.write_polymnist_release(tmp_path, n_train=12, n_test=6)
    base = tmp_path / "PolyMNIST"
    _rewrite_pngs(base, lambda f: np.asarray(Image.open(f).convert("RGB")))     # uncompressed: every file the same size
    tr, _, info = get_datasets("polymnist", root=tmp_path, source="real", download=False)
    assert not info.from_cache and get_datasets("polymnist", root=tmp_path, source="real", download=False)[2].from_cache
    stats = {f: f.stat() for f in base.rglob("*.png")}
    rng = np.random.default_rng(5)
    _rewrite_pngs(base, lambda f: rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))  # other images, same names, sizes
    for f, st in stats.items():
        assert f.stat().st_size == st.st_size
        if keep_mtimes: os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))         # as `cp -p` / `rsync -a` would
    tr2, _, info2 = get_datasets("polymnist", root=tmp_path, source="real", download=False)
    assert not info2.from_cache and info2.cache_file != info.cache_file
    order = tr2.meta["file_index"].tolist()
    for m in range(5):
        files = {int(f.name.split(".")[0]): f for f in (base / "train" / f"m{m}").glob("*.png")}
        want = np.stack([np.asarray(Image.open(files[i]).convert("RGB")).transpose(2, 0, 1) for i in order])
        assert np.array_equal(tr2.data[f"m{m}"].numpy(), want)              # the new images, not the cached old ones


def test_real_celeba_cache_follows_replaced_images(tmp_path):
    "Case 8: CelebA's cache was keyed by the attribute file only; new images with the same names must be read."
    w = fx.write_celeba(tmp_path, n_train=6, n_valid=1, n_test=3)
    tr, _, info = get_datasets("celeba", root=tmp_path, source="real", download=False)
    assert not info.from_cache
    imgs = tmp_path / "celeba" / "img_align_celeba"
    new = (255 - w["colours"]).astype(np.uint8)
    for name, c in zip(w["names"], new, strict=True):
        Image.fromarray(np.full((218, 178, 3), c, np.uint8)).save(imgs / name, quality=95)
    tr2, _, info2 = get_datasets("celeba", root=tmp_path, source="real", download=False)
    assert not info2.from_cache
    got = tr2.data["img"].float().reshape(len(tr2), 3, -1).mean(-1).numpy()
    assert np.abs(got - new[:6]).max() < 4                                      # the new colours


def test_disk_full_while_unpacking_keeps_the_archive(tmp_path, monkeypatch):
    "Case 9: ENOSPC while unpacking a valid PolyMNIST.zip is a disk-full error that says the archive is fine."
    fx.write_polymnist_release(tmp_path, n_train=6, n_test=3, as_zip=True)
    zf = tmp_path / "PolyMNIST.zip"; before = zf.read_bytes()
    def full(src, dst, *a, **k):                                   # zipfile writes each member through copyfileobj
        dst.write(src.read(64)); raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(zipfile.shutil, "copyfileobj", full)
    with pytest.raises(DiskFullError) as e:
        get_datasets("polymnist", root=tmp_path, source="real", download=False)
    msg = str(e.value)
    assert "no space left on device while unpacking" in msg and str(zf) in msg and "the archive is fine" in msg
    assert "delete" not in msg and "corrupted" not in msg
    assert not isinstance(e.value, DataFormatError) and e.value.errno == errno.ENOSPC
    assert zf.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PolyMNIST.zip"]                      # nothing half-unpacked
    monkeypatch.undo()
    tr, _, info = get_datasets("polymnist", root=tmp_path, source="real", download=False)    # space again: it works
    assert len(tr) == 6 and info.paper_data


@pytest.mark.parametrize("how", ["softmax", "two-hot"])
def test_text_that_is_not_one_hot_is_refused(how):
    "Case 13: the README says text that is not one-hot is refused; softmax rows and two-hot rows were accepted."
    from mopoe.likelihoods import Categorical
    from mopoe.model import MultimodalVAE
    from mopoe.nets import make_networks
    info = SimpleNamespace(name="toy", modalities=["img", "txt"], shapes={"img": (4,), "txt": (3, 5)},
                           likelihoods={"img": "gaussian", "txt": "categorical"}, alphabet=None, num_classes=2)
    enc, dec = make_networks(info, 2, arch="mlp", hidden=(8,))
    model = MultimodalVAE(enc, dec, {"img": "gaussian", "txt": "categorical"}, 2, shapes=info.shapes)
    g = torch.Generator().manual_seed(0)
    txt = torch.nn.functional.one_hot(torch.randint(5, (4, 3), generator=g), 5).float()
    if how == "softmax": txt[1] = torch.softmax(torch.randn(3, 5, generator=g), -1)       # rows sum to 1
    else: txt[2, 1] = torch.tensor([0.5, 0.5, 0, 0, 0])                                   # two-hot, halved
    x = {"img": torch.rand(4, 4, generator=g), "txt": txt}
    with pytest.raises(ValueError, match="modality 'txt' is not one-hot"):
        model.loss(x)
    assert Categorical().data_error(txt) is not None
