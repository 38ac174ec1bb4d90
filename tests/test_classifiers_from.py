"""The authors' released coherence classifiers (issue 30, item 4): their layouts (keys and shapes read off their code in
thomassutter/MoPoE and srl-ethz/mmvaeplus), a fixture folder saved the way they saved theirs (torch.save of a state
dict; PyTorch 1.4's legacy format and today's zip format) loaded weights-only through `classifiers_from`, files that
would run code refused unexecuted, and results.json naming the classifiers' source."""
import json
import os
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import TINY
from mopoe.config import ConfigError, config_key, resolve_config
from mopoe.data import ALPHABET, encode_text
from mopoe.io import CorruptFileError
from mopoe.released import (
    AUTHORS_ALPHABET,
    RELEASES,
    CelebAImageClassifier,
    CelebATextClassifier,
    MNISTDigitClassifier,
    PolyMNISTDigitClassifier,
    SVHNDigitClassifier,
    TextDigitClassifier,
    alphabet_map,
    load_released_classifiers,
    load_state_file,
)

MST = SimpleNamespace(name="mnist_svhn_text", modalities=["mnist", "svhn", "text"], multilabel=False,
                      likelihoods={"mnist": "laplace", "svhn": "laplace", "text": "categorical"},
                      shapes={"mnist": (1, 28, 28), "svhn": (3, 32, 32), "text": (8, len(ALPHABET))}, alphabet=ALPHABET)
POLY = SimpleNamespace(name="polymnist", modalities=[f"m{i}" for i in range(5)], multilabel=False,
                       likelihoods={f"m{i}": "laplace" for i in range(5)},
                       shapes={f"m{i}": (3, 28, 28) for i in range(5)})
CELEBA = SimpleNamespace(name="celeba", modalities=["img", "text"], multilabel=True,
                         likelihoods={"img": "laplace", "text": "categorical"},
                         shapes={"img": (3, 64, 64), "text": (256, len(ALPHABET))}, alphabet=ALPHABET)

# Their state dicts' layouts, read off their layer definitions (`ClfImg` of mmnist/ and of MMVAE+'s utils.py, `ClfImg`,
# `ClfImgSVHN`, `ClfText` of mnistsvhntext/, `ClfImg`, `ClfText` of celeba/): every key and shape of the small ones,
# the number of keys, parameters and a few shapes of the residual ones.
POLY_LAYOUT = {"encoder.0.weight": (10, 3, 4, 4), "encoder.0.bias": (10,), "encoder.3.weight": (20, 10, 4, 4),
               "encoder.3.bias": (20,), "encoder.7.weight": (128, 980), "encoder.7.bias": (128,),
               "encoder.10.weight": (10, 128), "encoder.10.bias": (10,)}
MNIST_LAYOUT = {"conv1.weight": (32, 1, 4, 4), "conv1.bias": (32,), "conv2.weight": (64, 32, 4, 4), "conv2.bias": (64,),
                "conv3.weight": (128, 64, 4, 4), "conv3.bias": (128,), "linear.weight": (10, 128), "linear.bias": (10,)}
SVHN_LAYOUT = {**{f"conv{i}.{p}": s for i, (o, c) in enumerate([(32, 3), (64, 32), (64, 64), (128, 64)], 1)
                  for p, s in (("weight", (o, c, 4, 4)), ("bias", (o,)))},
               **{f"bn{i}.{p}": ((o,) if p != "num_batches_tracked" else ()) for i, o in enumerate([32, 64, 64, 128], 1)
                  for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
               "linear.weight": (10, 128), "linear.bias": (10,)}
RESIDUAL = {  # class: (number of keys, some shapes)
    TextDigitClassifier: (46, {"conv1.weight": (128, 71, 1), "resblock_1.0.conv1.weight": (128, 128, 1),
                               "resblock_1.0.downsample.0.weight": (192, 128, 4),
                               "resblock_4.0.conv2.weight": (128, 192, 4), "linear.weight": (10, 128)}),
    CelebAImageClassifier: (79, {"feature_extractor.conv1.weight": (128, 3, 3, 3),
                                 "feature_extractor.resblock1.0.conv1.weight": (128, 128, 1, 1),
                                 "feature_extractor.resblock4.0.downsample.0.weight": (640, 512, 4, 4),
                                 "linear.weight": (40, 640)}),
    CelebATextClassifier: (130, {"conv1.weight": (128, 71, 3), "resblock_1.0.conv2.weight": (256, 128, 4),
                                 "resblock_6.0.downsample.0.weight": (896, 768, 4), "linear.weight": (40, 896)}),
}


def _layout(net): return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_layouts_are_the_authors():
    assert _layout(PolyMNISTDigitClassifier()) == POLY_LAYOUT
    assert _layout(MNISTDigitClassifier()) == MNIST_LAYOUT
    assert _layout(SVHNDigitClassifier()) == SVHN_LAYOUT
    for cls, (n_keys, shapes) in RESIDUAL.items():
        layout = _layout(cls())
        assert len(layout) == n_keys and {k: layout[k] for k in shapes} == shapes, cls.__name__
    # bias=False
    assert not any("bias" in k and "conv" in k and "downsample" not in k for k in _layout(CelebAImageClassifier()))
    assert len(AUTHORS_ALPHABET) == 71 and AUTHORS_ALPHABET.count("-") == 2 and AUTHORS_ALPHABET.endswith(" \n")


def _their_folder(folder, release, zip_format=True, seed=0):
    "Their layout: each classifier's state_dict() saved with torch.save under their file name, no extension."
    torch.manual_seed(seed)
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    nets = {}
    for m, (fname, arch) in release.files.items():
        nets[m] = arch().eval()
        for mod in nets[m].modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 2)
        torch.save(nets[m].state_dict(), folder / fname, _use_new_zipfile_serialization=zip_format)
    return nets


def _their_text(words, L):
    "One-hot texts in their alphabet, as their one_hot_encode (a character's first index)."
    x = torch.zeros(len(words), L, len(AUTHORS_ALPHABET))
    for i, w in enumerate(words):
        for j, c in enumerate(w.ljust(L)): x[i, j, AUTHORS_ALPHABET.find(c)] = 1.0
    return x


@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy_format_of_pytorch_1_4", "zip_format"])
@pytest.mark.parametrize("info", [POLY, MST, CELEBA], ids=lambda i: i.name)
@torch.no_grad()
def test_a_folder_in_their_layout_loads_and_reproduces_their_outputs(tmp_path, info, zip_format):
    theirs = _their_folder(tmp_path, RELEASES[info.name], zip_format)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                          # every key used: nothing ignored
        clfs = load_released_classifiers(tmp_path, info)
    assert sorted(clfs) == sorted(info.modalities) and clfs.scores is None
    assert clfs.metric == ("average_precision" if info.multilabel else "accuracy")
    for m in info.modalities:
        if info.likelihoods[m] == "categorical":
            L = info.shapes[m][0]
            words = ["  three ", "five", "a smiling woman with blond hair"[:L]]
            ours = torch.stack([encode_text(w, L) for w in words])
            assert torch.equal(clfs[m](ours), theirs[m](_their_text(words, L)))
        else:
            x = torch.rand(3, *info.shapes[m])
            assert torch.equal(clfs[m](x), theirs[m](x))
        rec = clfs.source["files"][m]
        assert rec["file"] == RELEASES[info.name].files[m][0] and len(rec["sha256"]) == 64
        assert rec["ignored_keys"] == []
        assert not clfs[m].training and all(not p.requires_grad for p in clfs[m].parameters())
    assert clfs.source["folder"] == str(tmp_path) and "MoPoE authors" in clfs.source["release"]


def test_alphabet_map_places_every_character_at_its_first_index():
    P = alphabet_map(ALPHABET)
    assert P.shape == (69, 71) and torch.equal(P.sum(1), torch.ones(69))
    # the second '-', newline: unused
    assert P[ALPHABET.index("-"), 36] == 1 and P[:, 59].sum() == 0 and P[:, 70].sum() == 0
    with pytest.raises(ValueError, match=r"characters \['é'\]"):
        alphabet_map(ALPHABET + "é")


class _Evil:
    def __reduce__(self): return (os.system, (f"touch {tempfile.gettempdir()}/mopoe_clf_pwned",))


def test_files_that_are_not_their_state_dicts_are_refused_naming_the_file(tmp_path):
    marker = Path(tempfile.gettempdir()) / "mopoe_clf_pwned"
    marker.unlink(missing_ok=True)
    _their_folder(tmp_path, RELEASES["mnist_svhn_text"])
    f = tmp_path / "clf_m2"
    sd = SVHNDigitClassifier().state_dict()
    cases = [
        (lambda: torch.save({"conv1.weight": _Evil()}, f), CorruptFileError,
         "clf_m2 holds more than a state dict .* refused unexecuted"),
        (lambda: torch.save({"conv1.weight": _Evil()}, f, _use_new_zipfile_serialization=False), CorruptFileError,
         "refused unexecuted"),
        # a whole model
        (lambda: torch.save(SVHNDigitClassifier(), f), CorruptFileError, "holds more than a state dict"),
        (lambda: torch.save([torch.zeros(1)], f), CorruptFileError, "clf_m2 does not hold a state dict"),
        (lambda: f.write_bytes(b"not a pickle at all"), CorruptFileError, "clf_m2 is not a PyTorch state-dict file"),
        (lambda: torch.save(MNISTDigitClassifier().state_dict(), f), ValueError,
         "clf_m2 does not fit SVHNDigitClassifier: missing"),
        (lambda: torch.save({**sd, "linear.weight": torch.zeros(10, 64)}, f), ValueError,
         r"wrong shapes linear.weight \(10, 64\)"),
        (lambda: f.unlink(), FileNotFoundError, "clf_m2 does not exist"),
    ]
    for make, err, match in cases:
        make()
        with pytest.raises(err, match=match):
            load_released_classifiers(tmp_path, MST)
        torch.save(sd, f)
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])                                                 # truncated
    with pytest.raises(CorruptFileError, match="not a PyTorch state-dict file"):
        load_state_file(f)
    assert not marker.exists()                                                          # nothing executed


def test_dataparallel_prefix_and_extra_keys(tmp_path):
    _their_folder(tmp_path, RELEASES["mnist_svhn_text"])
    sd = SVHNDigitClassifier().state_dict()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "clf_m2")
    load_released_classifiers(tmp_path, MST)
    torch.save({**sd, "sigmoid.unused": torch.zeros(1)}, tmp_path / "clf_m2")
    with pytest.warns(UserWarning, match=r"keys not in SVHNDigitClassifier ignored: \['sigmoid.unused'\]"):
        clfs = load_released_classifiers(tmp_path, MST)
    assert clfs.source["files"]["svhn"]["ignored_keys"] == ["sigmoid.unused"]


def test_wrong_dataset_modality_or_folder(tmp_path):
    _their_folder(tmp_path, RELEASES["polymnist"])
    with pytest.raises(ValueError, match="no released classifiers are known for dataset 'cub'"):
        load_released_classifiers(tmp_path, SimpleNamespace(name="cub", modalities=["img"]))
    with pytest.raises(ValueError, match="m0, m1, m2, m3, m4 only, not m5, m6"):
        load_released_classifiers(tmp_path,
                                  SimpleNamespace(name="polymnist", modalities=[f"m{i}" for i in range(7)]))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_released_classifiers(tmp_path / "none", POLY)
    short = SimpleNamespace(**{**vars(MST), "shapes": {**MST.shapes, "text": (16, len(ALPHABET))}})
    _their_folder(tmp_path / "mst", RELEASES["mnist_svhn_text"])
    with pytest.raises(ValueError, match="reads texts of length 8, mnist_svhn_text's are 16 long"):
        load_released_classifiers(tmp_path / "mst", short)


def test_option_declared_checked_and_keyed(tmp_path):
    base = resolve_config()
    assert base.classifiers_from == "" and config_key(base) == config_key(resolve_config(classifiers_from=""))
    with pytest.raises(ConfigError, match="classifiers_from '/no/such/folder' is not a folder .*trained_clfs_mst/"):
        resolve_config(classifiers_from="/no/such/folder")
    resolve_config(classifiers_from="/no/such/folder", metrics="latent")        # no coherence: not needed, not checked
    os.environ["MOPOE_TEST_CLF"] = str(tmp_path)
    try: cfg = resolve_config(classifiers_from="$MOPOE_TEST_CLF")
    finally: del os.environ["MOPOE_TEST_CLF"]
    # other classifiers, other numbers
    assert cfg.classifiers_from == str(tmp_path) and config_key(cfg) != config_key(base)


@pytest.mark.integration
def test_run_and_mopoe_eval_use_them_and_results_name_the_source(tmp_path, data_dir):
    from mopoe.train import evaluate_saved, run
    folder = tmp_path / "trained_clfs_mst"
    _their_folder(folder, RELEASES["mnist_svhn_text"], zip_format=False)
    cfg = resolve_config(**{**TINY, "metrics": "coherence"}, classifiers_from=str(folder), data_dir=str(data_dir),
                         out_dir=str(tmp_path / "run"))
    res = run(cfg, progress=False)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    src = saved["classifiers_source"]
    assert type(res["classifiers"]).__name__ == "ReleasedClassifiers" and src == res["classifiers"].source
    assert src["folder"] == str(folder) and src["files"]["text"]["architecture"] == "TextDigitClassifier"
    assert saved["config"]["classifiers_from"] == str(folder)
    assert set(saved["metrics"]["classifiers"]) == {"mnist", "svhn", "text"}
    # a run evaluated with classifiers trained here has no source entry; mopoe-eval's override brings it
    cfg2 = resolve_config(**{**TINY, "metrics": "coherence"}, data_dir=str(data_dir), out_dir=str(tmp_path / "run2"))
    run(cfg2, progress=False)
    assert "classifiers_source" not in json.loads((tmp_path / "run2" / "results.json").read_text())
    evaluate_saved(tmp_path / "run2", device="cpu", progress=False, classifiers_from=str(folder))
    again = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert again["classifiers_source"]["files"]["mnist"]["sha256"] == src["files"]["mnist"]["sha256"]
    assert again["written_by"] == "mopoe-eval"
