"""The real-data sources read files in the exact formats of the paper's data (written by tests/fixtures_real.py),
bad input gets named errors with nothing half-written, the training notebook runs `source real` on each fixture with
the paper's setup, and PAPER_SETUPS matches the reference table."""
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import torch

import fixtures_real as fx
import mopoe.data.files as files
from mopoe.data import (
    DIGIT_WORDS,
    POLYMNIST_URL,
    ChecksumError,
    DataFormatError,
    MissingDataError,
    celeba_text,
    decode_text,
    get_datasets,
)

NB = Path(__file__).resolve().parents[1] / "nbs" / "train.ipynb"


def _u8(x):                                   # float [0, 1] -> the stored uint8 pixels
    return x.mul(255).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------- MNIST-SVHN-Text
@pytest.fixture(scope="module")
def mst_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mst")
    return root, fx.write_mnist_raw(root), fx.write_svhn_mat(root)


def test_mnist_svhn_text_reads_torchvision_files(mst_root):
    root, mn, sv = mst_root
    tr, te, info = get_datasets("mnist_svhn_text", root=root, source="real", download=False, cache=False)
    assert info.source == "real" and info.paper_data and not any(info.synthetic.values())
    for ds, split in ((tr, "train"), (te, "test")):
        pairs = ds.meta["pairs"].numpy()
        (Xm, ym), (Xs, ys) = mn[split], sv[split]
        assert (ym[pairs[:, 0]] == ds.labels.numpy()).all() and (ys[pairs[:, 1]] == ds.labels.numpy()).all()
        # the pairing rule: per class, 20 rounds of min(#MNIST, #SVHN) pairs; each MNIST image in exactly 20 pairs
        # where SVHN has at least as many images of its class
        nm, ns = np.bincount(ym, minlength=10), np.bincount(ys, minlength=10)
        assert len(ds) == 20 * np.minimum(nm, ns).sum()
        uses = np.bincount(pairs[:, 0], minlength=len(ym))
        full = nm[ym] <= ns[ym]
        assert (uses[full] == 20).all() and (uses[~full] <= 20).all()
        for i in range(0, len(ds), max(1, len(ds) // 25)):        # pixels and text of every modality
            x, y = ds[i]
            assert (_u8(x["mnist"][0]) == Xm[pairs[i, 0]]).all() and (_u8(x["svhn"]) == Xs[pairs[i, 1]]).all()
            assert decode_text(x["text"]).strip() == DIGIT_WORDS[int(y)]
    assert (sv["train"][1] == 0).any()                            # the fixture holds zeros, stored as label 10


def test_mnist_gz_only_and_missing_files(tmp_path, mst_root):
    root, mn, _ = mst_root
    raw = tmp_path / "MNIST" / "raw"; raw.mkdir(parents=True)
    for f in (root / "MNIST" / "raw").glob("*.gz"): (raw / f.name).write_bytes(f.read_bytes())
    for f in ("train_32x32.mat", "test_32x32.mat"): (tmp_path / f).write_bytes((root / f).read_bytes())
    tr, _, _ = get_datasets("mnist_svhn_text", root=tmp_path, source="real", download=False, cache=False)
    assert (mn["train"][1][tr.meta["pairs"][:, 0].numpy()] == tr.labels.numpy()).all()
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(MissingDataError) as e:
        get_datasets("mnist_svhn_text", root=tmp_path, source="real", download=False)
    msg = str(e.value)
    assert "SVHN: missing test_32x32.mat" in msg and f"Put it in {tmp_path}/" in msg
    assert f"-p dataset mnist_svhn_text -p source real -p data_dir {tmp_path}" in msg
    assert not (tmp_path / "mnist_svhn_text").exists()           # no cache of a failed build


# ---------------------------------------------------------------- PolyMNIST
def _check_polymnist(tr, te, written):
    for ds, split in ((tr, "train"), (te, "test")):
        imgs, labels = written[split]
        assert (ds.labels.numpy() == labels).all() and (ds.meta["file_index"].numpy() == np.arange(len(labels))).all()
        for m in range(5): assert (ds.data[f"m{m}"].numpy() == imgs[:, m]).all()    # aligned by numeric index


def test_polymnist_released_folder_and_zip(tmp_path):
    written = fx.write_polymnist_release(tmp_path / "folder")
    tr, te, info = get_datasets("polymnist", root=tmp_path / "folder", source="real", download=False)
    assert info.source == "real" and info.paper_data and info.modalities == [f"m{m}" for m in range(5)]
    _check_polymnist(tr, te, written)
    zwritten = fx.write_polymnist_release(tmp_path / "zip", as_zip=True)
    assert sorted(p.name for p in (tmp_path / "zip").iterdir()) == ["PolyMNIST.zip"]
    tr, te, info = get_datasets("polymnist", root=tmp_path / "zip", source="real", download=False)
    _check_polymnist(tr, te, zwritten)
    assert sorted(p.name for p in (tmp_path / "zip").iterdir()) == ["PolyMNIST", "PolyMNIST.zip", "polymnist"]


def _fake_zenodo(monkeypatch, body: bytes, md5: str):
    meta = json.dumps({"files": [{"key": "PolyMNIST.zip", "size": len(body), "checksum": f"md5:{md5}"}]}).encode()
    served = []
    class Response(io.BytesIO):
        def __init__(self, b): super().__init__(b); self.headers = {"Content-Length": str(len(b))}
    def open_url(url, timeout=None):
        served.append(url)
        return Response({POLYMNIST_URL: body, "https://zenodo.org/api/records/4899160": meta}[url])
    monkeypatch.setattr(files, "_open_url", open_url)
    return served


def test_polymnist_download_verified_then_unpacked(tmp_path, monkeypatch):
    written = fx.write_polymnist_release(tmp_path / "src", as_zip=True)
    body = (tmp_path / "src" / "PolyMNIST.zip").read_bytes()
    served = _fake_zenodo(monkeypatch, body, hashlib.md5(body).hexdigest())
    tr, te, info = get_datasets("polymnist", root=tmp_path / "data", source="real")
    assert served == ["https://zenodo.org/api/records/4899160", POLYMNIST_URL]
    _check_polymnist(tr, te, written)
    assert (tmp_path / "data" / "PolyMNIST.zip").read_bytes() == body
    served.clear(); get_datasets("polymnist", root=tmp_path / "data", source="real")
    assert served == []                                          # present: nothing is downloaded twice


def test_polymnist_bad_input_named_and_nothing_left(tmp_path, monkeypatch):
    fx.write_polymnist_release(tmp_path / "src", as_zip=True)
    body = (tmp_path / "src" / "PolyMNIST.zip").read_bytes()
    # checksum mismatch: refused, no file left
    _fake_zenodo(monkeypatch, body, "0" * 32)
    with pytest.raises(ChecksumError, match="checksum mismatch for PolyMNIST.zip"):
        get_datasets("polymnist", root=tmp_path / "a", source="real")
    assert list((tmp_path / "a").iterdir()) == []
    # truncated archive: named, not unpacked
    (tmp_path / "b").mkdir(); (tmp_path / "b" / "PolyMNIST.zip").write_bytes(body[: len(body) // 2])
    with pytest.raises(DataFormatError, match="PolyMNIST.zip is not a complete zip archive"):
        get_datasets("polymnist", root=tmp_path / "b", source="real")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["PolyMNIST.zip"]
    # wrong folder layout (the splits one level too deep)
    fx.write_polymnist_release(tmp_path / "c" / "PolyMNIST" / "data")
    with pytest.raises(DataFormatError, match="lacks train/ and test/"):
        get_datasets("polymnist", root=tmp_path / "c", source="real")
    # an archive without the layout
    import zipfile
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z: z.writestr("something/else.txt", "x")
    (tmp_path / "d").mkdir(); (tmp_path / "d.zip").rename(tmp_path / "d" / "PolyMNIST.zip")
    with pytest.raises(DataFormatError, match="does not hold the released PolyMNIST layout"):
        get_datasets("polymnist", root=tmp_path / "d", source="real")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["PolyMNIST.zip"]
    # labels that disagree across modalities: named, no cache written
    fx.write_polymnist_release(tmp_path / "e")
    f = next((tmp_path / "e" / "PolyMNIST" / "test" / "m3").glob("5.*.png"))
    lab = int(f.name.split(".")[1]); f.rename(f.with_name(f"5.{(lab + 1) % 10}.png"))
    with pytest.raises(DataFormatError, match="label mismatch for tuple 5"):
        get_datasets("polymnist", root=tmp_path / "e", source="real")
    assert not (tmp_path / "e" / "polymnist").exists()
    # no network: the error names the file, where it goes and the command that continues
    monkeypatch.setattr(files, "_open_url", lambda url, timeout=None: (_ for _ in ()).throw(OSError("no network")))
    with pytest.raises(MissingDataError) as e:
        get_datasets("polymnist", root=tmp_path / "f", source="real")
    msg = str(e.value)
    assert "missing PolyMNIST.zip" in msg and POLYMNIST_URL in msg and f"Put it in {tmp_path / 'f'}/" in msg
    assert f"-p dataset polymnist -p source real -p data_dir {tmp_path / 'f'}" in msg


def test_polymnist_generated_from_torchvision_mnist(tmp_path):
    mn = fx.write_mnist_raw(tmp_path, n_train=200, n_test=100, gz=False)
    tr, te, info = get_datasets("polymnist", root=tmp_path, source="generated", num_modalities=3, num_train=50,
                                num_test=20, download=False)
    assert info.source == "generated" and not info.paper_data and "torchvision's MNIST" in info.note
    from mopoe.train import resolve_config, stand_in_label  # a run on it is labelled: not the released files
    label = stand_in_label(resolve_config(dataset="polymnist", source="generated"), info)
    assert "generated with Appendix D's recipe" in label
    for ds, split in ((tr, "train"), (te, "test")):
        X, y = mn[split]
        mi = ds.meta["mnist_index"].numpy()                        # (N, M) indices into the IDX files
        assert (y[mi] == ds.labels.numpy()[:, None]).all()         # every modality's digit has the tuple's label
        assert all(len(set(r)) == 3 for r in mi)                   # distinct instances within a tuple


# ---------------------------------------------------------------- CelebA
def test_celeba_reads_torchvision_files(tmp_path):
    w = fx.write_celeba(tmp_path)
    tr, te, info = get_datasets("celeba", root=tmp_path, source="real", download=False)
    assert info.source == "real" and info.paper_data and not any(info.synthetic.values())
    for ds, p in ((tr, 0), (te, 2)):
        sel = np.flatnonzero(w["partition"] == p)
        assert len(ds) == len(sel)
        assert (ds.labels.numpy() == (w["attrs"][sel] > 0)).all()
        for i in range(len(ds)):
            x, y = ds[i]
            assert x["img"].shape == (3, 64, 64)
            assert np.abs(_u8(x["img"]).reshape(3, -1).mean(1) - w["colours"][sel[i]]).max() < 4   # that image's colour
            assert decode_text(x["text"]).strip() == celeba_text(y.numpy()).strip()
    (tmp_path / "celeba" / "list_eval_partition.txt").unlink()
    with pytest.raises(MissingDataError) as e:
        get_datasets("celeba", root=tmp_path / "other", source="real", download=False)
    assert "CelebA: missing img_align_celeba, list_attr_celeba.txt, list_eval_partition.txt" in str(e.value)


# ---------------------------------------------------------------- the training notebook on each fixture
@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    fx.write_mnist_raw(root); fx.write_svhn_mat(root)
    fx.write_polymnist_release(root, as_zip=True); fx.write_celeba(root)
    return root


@pytest.mark.parametrize("dataset", ["polymnist", "mnist_svhn_text", "celeba"])
def test_train_notebook_paper_preset_on_real_fixture(dataset, fixture_root, tmp_path):
    from mopoe.nets import PAPER_SETUPS
    out = tmp_path / "run"
    pm.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), progress_bar=False, kernel_name="python3",
                        parameters=dict(dataset=dataset, source="real", data_dir=str(fixture_root), preset="paper",
                                        epochs=1, batch_size=8, num_train=16, num_test=8, classifier_epochs=1,
                                        loglik_samples=2, loglik_max_test=8, out_dir=str(out), device="cpu"))
    res = json.loads((out / "results.json").read_text())
    cfg, paper = res["config"], PAPER_SETUPS[dataset]
    assert cfg["source"] == "real" and cfg["preset"] == "paper"
    assert ((cfg["latent_dim"], cfg["private_dim"], cfg["beta"], cfg["lr"])
            == (paper.latent_dim, paper.private_dim, paper.beta, paper.lr))
    assert res["data"]["sizes"] == {"train": 16, "test": 8} and res["data"]["source"] == "real"
    assert res["data"]["synthetic"] == [] and not res["data"]["stand_in"] and res["data"]["label"] == ""
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert len(res["history"]) == 1 and record["step"] == 2 and len(record["step_losses"]) == 2      # two steps of 8
    assert np.isfinite(res["history"][0]["train_loss"])
    assert res["metrics"]["latent"]["per_subset"]


# ---------------------------------------------------------------- the paper's setups
# Transcribed from /work/shared/reference/paper_results.md, "Setups" (paper appendix): shared latent, modality-specific
# latent, epochs, Adam lr, batch, beta, Laplace scale; reconstruction weights: PolyMNIST "1 each", the others by data
# size – for CelebA relative to the image's pixels per channel (64 * 64 / data size: image 1/3, text 16), and its
# private latents' KL weighted beta_style 2 times 1 (image) and 5 (text) as the authors ran it (thomassutter/MoPoE
# job_celeba, celeba/experiment.py set_rec_weights and set_style_weights).
REFERENCE = {
    "polymnist":       dict(latent_dim=512, private_dim=0,  epochs=300, lr=1e-3, batch_size=256, beta=2.5,
                            likelihood_scale=0.75, rec_weights="uniform", num_modalities=5),
    "mnist_svhn_text": dict(latent_dim=20,  private_dim=0,  epochs=150, lr=1e-3, batch_size=256, beta=2.5,
                            likelihood_scale=0.75, rec_weights="data_size", num_modalities=3),
    "celeba":          dict(latent_dim=32,  private_dim=32, epochs=200, lr=5e-4, batch_size=256, beta=2.5,
                            likelihood_scale=0.75, rec_weights={"img": 1 / 3, "text": 16.0}, num_modalities=2,
                            private_beta=2.0,
                            private_style_weights={"img": 1.0, "text": 5.0}),
}


def test_paper_setups_match_the_reference_table():
    from mopoe.nets import PAPER_SETUPS
    assert set(PAPER_SETUPS) == set(REFERENCE)
    for name, ref in REFERENCE.items():
        got = PAPER_SETUPS[name].as_dict()
        assert {k: got[k] for k in ref} == ref, name
        assert got["image_likelihood"] == "laplace" and got["text_likelihood"] == "categorical"


SMALL = {"polymnist": dict(num_modalities=5, num_train=4, num_test=2), "mnist_svhn_text": dict(num_train=4, num_test=2),
         "celeba": dict(num_train=4, num_test=2)}


@pytest.mark.parametrize("name", ["polymnist", "mnist_svhn_text", "celeba"])
def test_paper_preset_builds_the_model_its_setup_describes(name, tmp_path):
    "The fields of PAPER_SETUPS that change the model are the values the model built for `--preset paper` reads."
    from mopoe.nets import PAPER_SETUPS
    from mopoe.train import build_model, resolve_config
    setup = PAPER_SETUPS[name]
    _, _, info = get_datasets(name, root=tmp_path, **SMALL[name])
    model = build_model(resolve_config(dataset=name, preset="paper", device="cpu"), info)
    assert (model.latent_dim, model.private_dim) == (setup.latent_dim, setup.private_dim)
    assert [type(model.likelihoods[m]).__name__.lower() for m in info.modalities] == [
        setup.text_likelihood if info.likelihoods[m] == "categorical" else setup.image_likelihood
        for m in info.modalities]
    want = setup.model_options(info)
    assert model.rec_weights == pytest.approx(want["rec_weights"])          # read by the loss: sum_m w_m log p(x_m | z)
    if setup.private_dim:
        assert getattr(model, "private_kl_weights", None) == pytest.approx(want["private_kl_weights"])


def test_command_line_source_real(fixture_root, tmp_path):
    from mopoe.train import main  # the `mopoe-train` entry point
    status = main(["--dataset", "mnist_svhn_text", "--source", "real", "--data_dir", str(fixture_root), "--epochs", "1",
                   "--batch_size", "8", "--num_train", "16", "--num_test", "8", "--device", "cpu",
                   "--classifier_epochs", "1",
                   "--loglik_samples", "2", "--loglik_max_test", "8", "--out_dir", str(tmp_path / "cli")])
    assert status == 0
    res = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert res["config"]["source"] == "real" and res["data"]["source"] == "real" and not res["data"]["stand_in"]
    assert res["written_by"] == "mopoe-train" and len(res["history"]) == 1 and res["history"][0]["step"] == 2
