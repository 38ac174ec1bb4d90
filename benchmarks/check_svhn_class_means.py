"""Can a decoder that outputs E[x_m | digit] be coherent? The coherence classifiers on the per-digit mean and median
images of MNIST and of the SVHN stand-in (offline MNIST-SVHN-Text, first 10,000 training pairs; run from the
repository root, which holds `data/`). Prints the figures of results/svhn_cross_generation.md."""
import torch

from mopoe.data import get_datasets
from mopoe.evaluate import train_classifiers

train_ds, test_ds, info = get_datasets("mnist_svhn_text", root="data")
clf = train_classifiers(train_ds, info, epochs=3, cache_dir="data/classifiers", seed=0, test_ds=test_ds, progress=False)
print(clf)
X, Y = zip(*(train_ds[i] for i in range(min(10_000, len(train_ds)))), strict=True)
Y = torch.tensor([int(y) for y in Y])
for m in ("mnist", "svhn"):
    xs = torch.stack([x[m] for x in X])
    for stat in ("mean", "median"):
        imgs = torch.stack([(xs[Y == d].mean(0) if stat == "mean" else xs[Y == d].median(0).values) for d in range(10)])
        with torch.no_grad(): pred = clf[m](imgs).argmax(1)
        acc = (pred == torch.arange(10)).float().mean().item()
        sd = imgs.flatten(1).std(1).mean().item()                      # pixel spread within an image
        data_sd = xs[:500].flatten(1).std(1).mean().item()
        print(m, stat, dict(classifier_acc_on_class_images=acc, predictions=pred.tolist(), image_sd=round(sd, 4),
                            data_image_sd=round(data_sd, 4)))
