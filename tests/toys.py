"""Test doubles shared by the test files: a tiny two-modality dataset of random images and its description."""
from types import SimpleNamespace

import torch
from torch.utils.data import Dataset

class ToyPairs(Dataset):
    "n random (mnist, mnist2) image pairs with random labels, seeded."
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(10, (n,), generator=g)
        self.a, self.b = torch.rand(n, 1, 28, 28, generator=g), torch.rand(n, 1, 28, 28, generator=g)
    def __len__(self): return len(self.y)
    def __getitem__(self, i): return {"mnist": self.a[i], "mnist2": self.b[i]}, self.y[i]


INFO = SimpleNamespace(name="mnist_svhn_text", modalities=["mnist", "mnist2"],
                       shapes={"mnist": (1, 28, 28), "mnist2": (1, 28, 28)},
                       likelihoods={"mnist": "laplace", "mnist2": "laplace"}, data_dims={"mnist": 784, "mnist2": 784},
                       num_classes=10, alphabet=None, synthetic={}, source="offline")
