"""The missing-data options of a run: validated, turned into an incomplete training set, trained on, and recorded."""
import dataclasses

import pytest
import torch

from mopoe.incomplete import IncompleteDataset, complete_view, distinct_tuples, observed_of
from mopoe.train import incomplete_train_set, resolve_config, train
from toys import INFO, ToyPairs

@pytest.mark.parametrize("bad, msg", [
    (dict(missing_rate=1.0), "missing_rate must be below 1"),
    (dict(missing_fraction=0.5), "missing_modality and missing_fraction go together"),
    (dict(missing_modality="svhn"), "missing_modality and missing_fraction go together"),
    (dict(complete_only_repeat=True), "complete_only_repeat needs complete_only")])
def test_missing_options_are_validated(bad, msg):
    with pytest.raises(ValueError, match=msg): resolve_config(**bad)


def test_incomplete_training_set_and_a_run_on_it(tmp_path):
    base = ToyPairs(64, 0)
    cfg = resolve_config(dataset="mnist_svhn_text", missing_rate=0.5, epochs=1, batch_size=16, latent_dim=4,
                         device="cpu", out_dir=str(tmp_path / "run"), seed=2)
    assert incomplete_train_set(base, INFO, dataclasses.replace(cfg, missing_rate=0.0)) is base     # nothing missing
    ds = incomplete_train_set(base, INFO, cfg)
    assert isinstance(ds, IncompleteDataset) and complete_view(ds) is base
    obs = observed_of(ds)
    assert obs.any(1).all() and not obs.all()                                   # incomplete, every tuple keeps one
    x, y, o = ds[torch.arange(8)]
    for j, m in enumerate(INFO.modalities): assert (x[m][~o[:, j]] == 0).all()   # missing entries zero-filled
    only = incomplete_train_set(base, INFO, dataclasses.replace(cfg, complete_only=True))
    assert len(only) == int(obs.all(1).sum()) and observed_of(only).all()
    rep = incomplete_train_set(base, INFO, dataclasses.replace(cfg, complete_only=True, complete_only_repeat=True))
    assert len(rep) == len(base) and distinct_tuples(rep) == len(only) and observed_of(rep).all()   # equal steps
    assert set(rep.indices) == set(only.indices)
    with pytest.raises(ValueError, match="not a modality of"):
        incomplete_train_set(base, INFO, dataclasses.replace(cfg, missing_modality="svhn", missing_fraction=0.5))
    res = train(cfg, progress=False, data=(ds, ToyPairs(16, 1), INFO))        # batches carry `observed` to the model
    assert len(res["history"]) == 1 and torch.isfinite(torch.tensor(res["history"][0]["train_loss"]))


def test_an_option_added_later_keeps_old_run_folders_and_checkpoints(tmp_path):
    import json

    from mopoe.train import config_key, load_checkpoint, save_checkpoint
    cfg = resolve_config(dataset="mnist_svhn_text", epochs=1, batch_size=16, latent_dim=4, device="cpu",
                         out_dir=str(tmp_path / "run"), seed=1)
    from pathlib import Path

    from mopoe.train import stored_options
    committed = sorted((Path(__file__).resolve().parents[1] / "results").glob("**/results.json"))
    assert len(committed) >= 20
    for f in committed:                      # every committed run folder keeps its key (options added or renamed later)
        saved = json.loads(f.read_text())
        c = resolve_config(stored_options(saved["config"]))
        assert config_key(c) == saved["config_key"], f
    assert (config_key(dataclasses.replace(cfg, complete_only=True, complete_only_repeat=True))
            != config_key(dataclasses.replace(cfg, complete_only=True)))
    data = (ToyPairs(48, 0), ToyPairs(16, 1), INFO)
    train(cfg, progress=False, data=data)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    del state["config"]["complete_only_repeat"]                                   # a checkpoint from before the option
    save_checkpoint(state, tmp_path / "run")
    res = train(dataclasses.replace(cfg, epochs=2, resume=True), progress=False, data=data)
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    with pytest.raises(Exception, match="another config"):                       # a real difference is still refused
        train(dataclasses.replace(cfg, epochs=3, resume=True, complete_only_repeat=True, complete_only=True),
              progress=False, data=data)
