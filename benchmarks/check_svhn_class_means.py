"""Can a decoder that outputs E[x_m | digit] be coherent? Classify per-label mean/median images."""
import json, sys, torch, numpy as np
from mopoe.data import get_datasets
from mopoe.evaluate import train_classifiers
from mopoe.incomplete import complete_view
train_ds, test_ds, info = get_datasets("mnist_svhn_text", root="data")
clf = train_classifiers(train_ds, info, epochs=3, cache_dir="data/classifiers", seed=0, test_ds=test_ds, progress=False)
print(clf)
X, Y = [], []
for i in range(len(train_ds)):
    x, y = train_ds[i]; X.append(x); Y.append(int(y))
    if i >= 9999: break
Y = torch.tensor(Y)
out = {}
for m in ("mnist", "svhn"):
    xs = torch.stack([x[m] for x in X])
    for stat in ("mean", "median"):
        imgs = torch.stack([(xs[Y == d].mean(0) if stat == "mean" else xs[Y == d].median(0).values) for d in range(10)])
        with torch.no_grad(): pred = clf[m](imgs).argmax(1)
        acc = (pred == torch.arange(10)).float().mean().item()
        # digit contrast: spread of pixel values within the image (mean over channels)
        contrast = imgs.flatten(1).std(1).mean().item()
        data_contrast = xs[:500].flatten(1).std(1).mean().item()
        out[f"{m}_{stat}"] = dict(classifier_acc_on_class_images=acc, predictions=pred.tolist(), image_sd=round(contrast, 4), data_image_sd=round(data_contrast, 4))
        print(m, stat, out[f"{m}_{stat}"])
    torch.save(torch.stack([xs[Y == d].mean(0) for d in range(10)]), f"/work/scratch/s12/{m}_class_means.pt")
json.dump(out, open("/work/scratch/s12/class_means.json", "w"), indent=1)
