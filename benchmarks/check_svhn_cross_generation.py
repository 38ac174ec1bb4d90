"""SVHN generated from SVHN and from MNIST alone by a trained MNIST-SVHN-Text run (first 2,000 test tuples): classifier
accuracy, pixel spread, and a figure (test image, S<-S, S<-M per digit).
Usage: python benchmarks/check_svhn_cross_generation.py RUN_DIR OUT  (writes OUT.json and OUT.png)."""
import json
import sys

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

torch.set_num_threads(1)
from mopoe.data import get_datasets
from mopoe.evaluate import train_classifiers
from mopoe.train import load_run

run = load_run(sys.argv[1])
tr, te, info = get_datasets("mnist_svhn_text", root="data")
clf = train_classifiers(tr, info, epochs=3, cache_dir="data/classifiers", seed=0, test_ds=te, progress=False)
idx = torch.arange(0, 2000)
X = [te[i] for i in idx.tolist()]
x = {m: torch.stack([a[0][m] for a in X]) for m in info.modalities}; y = torch.tensor([int(a[1]) for a in X])
torch.manual_seed(0)
with torch.no_grad():
    gm = run.model.cond_generate({"mnist": x["mnist"]})["svhn"]
    gs = run.model.cond_generate({"svhn": x["svhn"]})["svhn"]
    acc_m = (clf["svhn"](gm).argmax(1) == y).float().mean().item()
    acc_s = (clf["svhn"](gs).argmax(1) == y).float().mean().item()
sd = lambda t: t.flatten(1).std(1).mean().item()
out = {"S<-M accuracy": acc_m, "S<-S accuracy": acc_s, "pixel sd S<-M": sd(gm), "pixel sd S<-S": sd(gs),
       "pixel sd data": sd(x["svhn"]),
       "spread of S<-M outputs across test tuples (mean pixel sd over tuples)": gm.std(0).mean().item()}
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[2] + ".json", "w"), indent=1)
fig, ax = plt.subplots(3, 10, figsize=(10, 3.3))
for d in range(10):
    i = int((y == d).nonzero()[0, 0])
    for r, img in enumerate((x["svhn"][i], gs[i], gm[i])): ax[r, d].imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
    ax[0, d].set_title(str(d), fontsize=8)
for a in ax.flat: a.axis("off")
for r, t in enumerate(("test image", "S <- S", "S <- M")):
    ax[r, 0].text(-40, 16, t, fontsize=8, ha="right", va="center")
fig.savefig(sys.argv[2] + ".png", dpi=110, bbox_inches="tight")
