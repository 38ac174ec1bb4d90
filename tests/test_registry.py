"""The dataset registry (issue 18, item 5): each built-in dataset is one registration carrying its builder, sources,
networks, cpu preset and paper setup – the same values the trainer uses today – and a new dataset needs nothing else."""
import torch

import mopoe.data as D
from mopoe.nets import PAPER_SETUPS

def test_builtin_registrations_carry_what_the_trainer_uses():
    "The trainer's dataset choices and presets come from the registry; the presets are the measured ones of the README."
    import mopoe.train as T
    assert D.dataset_names() == T.option_choices("dataset") == ("polymnist", "mnist_svhn_text", "celeba")
    measured = {"polymnist": dict(latent_dim=64, private_dim=0, beta=1.0, lr=1e-3, batch_size=64, epochs=18),
                "mnist_svhn_text": dict(latent_dim=20, private_dim=0, beta=2.5, lr=1e-3, batch_size=128, epochs=10),
                "celeba": dict(latent_dim=32, private_dim=32, beta=2.5, lr=5e-4, batch_size=64, epochs=2)}
    for name in D.dataset_names():
        e = D.dataset_entry(name)
        assert e.cpu_preset == T.cpu_preset(name) == measured[name], name
        cfg = T.resolve_config(dataset=name)
        assert all(getattr(cfg, k) == v for k, v in measured[name].items()), name
        assert e.paper_setup is PAPER_SETUPS[name]
        assert T.resolve_config(dataset=name, preset="paper").latent_dim == e.paper_setup.latent_dim
        assert e.sources == D.SOURCES[name] and e.builder is D.DATASETS[name]


def test_registered_networks_build_for_each_dataset(tmp_path):
    for name, opts in (("polymnist", dict(num_modalities=2, num_train=4, num_test=2)),
                       ("mnist_svhn_text", dict(num_train=4, num_test=2)), ("celeba", dict(num_train=4, num_test=2))):
        e = D.dataset_entry(name)
        tr, _, info = D.get_datasets(name, root=tmp_path / name, **opts)
        enc, dec = e.networks(info, e.cpu_preset["latent_dim"], e.cpu_preset["private_dim"])
        x, _ = tr[torch.arange(4)]
        D_ = e.cpu_preset["latent_dim"] + e.cpu_preset["private_dim"]
        for m in info.modalities:
            enc[m].eval(); dec[m].eval()
            with torch.no_grad():
                assert enc[m](x[m])[0].shape == (4, D_)
                assert dec[m](torch.zeros(3, D_)).shape == (3, *info.shapes[m])
