"""Data on the device (issue 21, items 1-2, data side), checked on the CPU: batches gathered from moved datasets equal
today's batches bit for bit, gathering reads nothing back to the host, and `validate_dataset` finds what the model's
per-batch checks find, once."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import Subset

from mopoe.data import dataset_nbytes, dataset_to, get_datasets, place_dataset, validate_dataset
from mopoe.incomplete import IncompleteDataset, complete_tuples, missing_mask
from mopoe.likelihoods import get_likelihood

SMALL = {"polymnist": dict(num_modalities=3, num_train=64, num_test=16),
         "mnist_svhn_text": dict(num_train=64, num_test=16), "celeba": dict(num_train=32, num_test=8)}


@pytest.fixture(scope="module", params=list(SMALL))
def data(request, tmp_path_factory):
    name = request.param
    tr, _, info = get_datasets(name, root=tmp_path_factory.mktemp(name), **SMALL[name])
    return tr, info


def reference_batch(ds, idx):
    "Today's batch, from the stored uint8 values with the formulas of before: images / 255, F.one_hot(text).float()."
    x = {}
    for m, t in ds.data.items():
        raw = t[ds.index[m][idx]] if m in ds.index else t[idx]
        x[m] = F.one_hot(raw.long(), len(ds.alphabet)).float() if ds.kinds[m] == "text" else raw.float() / 255
    y = ds.labels[idx]
    return x, (y.float() if y.dtype == torch.uint8 else y)


def assert_same(a, b):
    (xa, *ra), (xb, *rb) = a, b
    assert list(xa) == list(xb)
    for m in xa:
        assert xa[m].dtype == xb[m].dtype == torch.float32 and torch.equal(xa[m], xb[m]), m
    for u, v in zip(ra, rb, strict=True): assert u.dtype == v.dtype and torch.equal(u, v)


def test_moved_batches_equal_todays_bitwise(data):
    tr, info = data
    idx = torch.randperm(len(tr), generator=torch.Generator().manual_seed(0))[:40]
    moved, on, why = place_dataset(tr, "cpu", "on")
    assert not on and moved is tr                                   # the CPU needs no move
    moved = dataset_to(tr, "cpu")
    assert dataset_nbytes(tr) == moved.nbytes > 0
    ref = reference_batch(tr, idx)
    assert_same(tr[idx], ref); assert_same(moved[idx], ref)
    # a Subset (the trainer's complete_only) and an incomplete view: the same gathers through the moved storage
    sub = Subset(tr, idx.tolist())
    msub = dataset_to(sub, "cpu")
    assert isinstance(msub.indices, torch.Tensor)
    assert_same(msub.dataset[msub.indices[torch.arange(10)]], reference_batch(tr, idx[:10]))
    obs = missing_mask(len(tr), len(info.modalities), 0.4, seed=1)
    inc = IncompleteDataset(tr, obs, info.modalities)
    assert_same(dataset_to(inc, "cpu")[idx], inc[idx])
    cmp = complete_tuples(inc)
    mc = dataset_to(cmp, "cpu")
    assert_same(mc.dataset[mc.indices[:5]], inc[torch.as_tensor(cmp.indices[:5])])


class HostReads(TorchDispatchMode):
    "Counts the reads of tensor values by the host (aten::_local_scalar_dense: .item(), bool(t), int(t))."
    def __init__(self): super().__init__(); self.n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default: self.n += 1
        return func(*args, **(kwargs or {}))


def test_gathering_reads_nothing_back_and_data_error_reads_one_flag(data):
    tr, info = data
    moved = dataset_to(tr, "cpu")
    idx = torch.arange(16)
    with HostReads() as reads:
        for _ in range(3): x, y = moved[idx]
    assert reads.n == 0                                         # F.one_hot read the indices' min and max per text batch
    for m in info.modalities:
        with HostReads() as reads: assert get_likelihood(info.likelihoods[m]).data_error(x[m]) is None
        assert reads.n == 1, (m, reads.n)                           # one flag per batch and modality


def test_validate_dataset_finds_the_first_bad_tuple(data):
    tr, info = data
    validate_dataset(tr, info, batch_size=25)
    class ByValue(torch.utils.data.Dataset):               # the same items, no storage to prove them: checked by value
        def __len__(self): return len(tr)
        def __getitem__(self, i): return tr[i]
    validate_dataset(ByValue(), info, batch_size=25)
    validate_dataset(IncompleteDataset(tr, missing_mask(len(tr), len(info.modalities), 0.5, seed=2), info.modalities),
                     info)
    text = [m for m in info.modalities if info.likelihoods[m] == "categorical"]
    if not text: return
    m = text[0]
    class Soft(torch.utils.data.Dataset):                  # the same data with softmax text at tuples 10 and 21
        def __len__(self): return len(tr)
        def __getitem__(self, i):
            x, y = tr[i]
            if i in (10, 21): x = {**x, m: torch.softmax(x[m] * 3, -1)}
            return x, y
    with pytest.raises(ValueError, match=rf"modality '{m}' is not one-hot.*\(tuple 10 of {len(tr)}, the first such\)"):
        validate_dataset(Soft(), info, batch_size=16)
    # a tuple whose bad modality is missing is not checked, as the model does not check it
    obs = torch.ones(len(tr), len(info.modalities), dtype=torch.bool); obs[[10, 21], info.modalities.index(m)] = False
    validate_dataset(IncompleteDataset(Soft(), obs, info.modalities), info)
