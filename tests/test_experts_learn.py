"""No dead expert: on the main job's setting (MNIST-SVHN-Text, beta 5, cpu preset) every single modality's expert
learns digit identity within a short run (issue 12, part 4; the measurements are in results/dead_experts.md)."""
from mopoe.evaluate import latent_classification
from mopoe.train import TrainConfig, build_data, resolve_config, train

def test_every_single_expert_learns(tmp_path):
    cfg = resolve_config(TrainConfig(dataset="mnist_svhn_text", beta=5.0, epochs=8, num_test=1000, device="cpu", seed=0,
                                     data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run")))
    data = build_data(cfg)
    model = train(cfg, progress=False, data=data)["model"]  # 8 epochs of 20,000 pairs at batch 128: 1,256 steps
    train_ds, test_ds, info = data
    acc = latent_classification(model, train_ds, test_ds, info)["per_subset"]
    print({m: round(acc[m], 3) for m in info.modalities})
    for m in info.modalities: assert acc[m] >= 0.5, f"the {m} expert did not learn digit identity: {acc}"
