"""Tests for fxtucker.data: IDX parsing, Fashion-MNIST, errors, dataset_info and make_loader."""

import gzip
import struct

import numpy as np
import pytest
import torch

from fxtucker.data import (
    DATASETS,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IdxImageDataset,
    dataset_info,
    get_dataset,
    make_loader,
    read_idx,
)


def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """IDX encoding of ``array``: magic 00 00 <code> <ndim>, big-endian sizes, big-endian data."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def _write(path, payload: bytes, gz: bool):
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _fake_split(root, prefix="train", n=6, gz=True, seed=0):
    """Write a tiny Fashion-MNIST split; return its images (N x 28 x 28 uint8) and labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    labels = (np.arange(n) * 7 % 10).astype(np.uint8)
    _write(root / f"{prefix}-images-idx3-ubyte", _idx_bytes(images), gz)
    _write(root / f"{prefix}-labels-idx1-ubyte", _idx_bytes(labels), gz)
    return images, labels


# --- read_idx ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = _write(tmp_path / "a-idx3-ubyte", _idx_bytes(array), gz)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


def test_read_idx_big_endian_types(tmp_path):
    shorts = np.array([[1, -2, 300], [-32768, 32767, 0]], dtype=np.int16)
    floats = np.array([1.5, -0.25, 3e8], dtype=np.float32)
    np.testing.assert_array_equal(
        read_idx(_write(tmp_path / "s", _idx_bytes(shorts, 0x0B), False)), shorts
    )
    out = read_idx(_write(tmp_path / "f", _idx_bytes(floats, 0x0D), False))
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, floats)


def test_read_idx_bad_magic(tmp_path):
    path = _write(tmp_path / "bad", b"\x01\x02\x08\x01" + b"\x00" * 8, False)
    with pytest.raises(ValueError, match=r"bad is not an IDX file: the magic number must start "
                       r"with bytes 00 00, found 01 02 08 01"):
        read_idx(path)


def test_read_idx_unknown_type(tmp_path):
    path = _write(tmp_path / "t", bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\x00", False)
    with pytest.raises(ValueError, match=r"unknown IDX type code 0x07; valid codes are 0x08, "):
        read_idx(path)


def test_read_idx_truncated(tmp_path):
    payload = _idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))[:-5]
    path = _write(tmp_path / "short-idx3-ubyte", payload, True)
    with pytest.raises(ValueError, match=r"header says shape \(3, 28, 28\) of uint8, which is "
                       r"2352 data bytes, but the file has 2347; the file is truncated"):
        read_idx(path)


def test_read_idx_refuses_a_huge_header_before_decompressing(tmp_path, monkeypatch):
    # A gzip "Fashion-MNIST" of a few hundred KB that would inflate to gigabytes.
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 3_000_000, 28, 28)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header)
        for _ in range(64):
            f.write(bytes(1 << 20))
    assert path.stat().st_size < 200_000
    read = []
    real_open = gzip.open

    def counting_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        real_read = f.read
        f.read = lambda n=-1: (lambda b: (read.append(len(b)), b)[1])(real_read(n))
        return f

    monkeypatch.setattr(gzip, "open", counting_open)
    with pytest.raises(ValueError, match=r"header says shape \(3000000, 28, 28\) of uint8, which is 2,352,000,000 "
                                         r"data bytes, above the 1,073,741,824 fxtucker reads; refused before reading"):
        read_idx(path)
    assert sum(read) == len(header)  # nothing past the header was decompressed
    with pytest.raises(ValueError, match=r"which is 2,352,000,000 data bytes, above the 1,000 fxtucker reads"):
        read_idx(path, max_bytes=1000)


def test_read_idx_stops_at_the_announced_size(tmp_path):
    payload = _idx_bytes(np.zeros((3, 4), dtype=np.uint8)) + bytes(10_000)
    path = _write(tmp_path / "long-idx2-ubyte", payload, True)
    with pytest.raises(ValueError, match=r"which is 12 data bytes, but the file has more than 12; the file is "
                                         r"truncated or corrupt"):
        read_idx(path)
    with pytest.raises(ValueError, match=r"the IDX header says shape \(3, 4\), expected N x 28 x 28"):
        read_idx(path, expect=(None, 28, 28))


def test_read_idx_torn_gzip_is_a_value_error(tmp_path):
    path = _write(tmp_path / "torn-idx2-ubyte", _idx_bytes(np.zeros((30, 40), dtype=np.uint8)), True)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"torn-idx2-ubyte.gz: cannot be read as an IDX file \(EOFError"):
        read_idx(path)


def test_read_idx_short_header(tmp_path):
    path = _write(tmp_path / "h", bytes([0, 0, 0x08, 3, 0, 0]), False)
    with pytest.raises(ValueError, match=r"announces 3 dimensions \(16 header bytes\) but the "
                       r"file has only 6 bytes"):
        read_idx(path)


# --- Fashion-MNIST from a root ----------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("train", [True, False])
def test_fashion_mnist_from_root(tmp_path, gz, train):
    prefix = "train" if train else "t10k"
    images, labels = _fake_split(tmp_path, prefix, n=6, gz=gz)
    ds = get_dataset("fashion-mnist", train=train, root=tmp_path)
    assert isinstance(ds, IdxImageDataset)
    assert len(ds) == 6
    assert ds.data.dtype == torch.uint8 and ds.data.shape == (6, 28, 28)
    assert ds.targets.dtype == torch.int64
    assert torch.equal(ds.data, torch.from_numpy(images))
    assert ds.targets.tolist() == labels.tolist()
    assert all(f.endswith(".gz") == gz for f in ds.files)
    assert all(f"{prefix}-" in f for f in ds.files)

    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
    assert isinstance(y, int) and y == int(labels[3])
    expected = (torch.from_numpy(images[3]).float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(x[0], expected)


def test_fashion_mnist_normalization_constants(tmp_path):
    _fake_split(tmp_path)
    ds = get_dataset("fashion-mnist", train=True, root=tmp_path)
    black, _ = ds[0]
    white, _ = ds[1]
    assert torch.allclose(black, torch.full((1, 28, 28), (0 - 0.2860) / 0.3530))
    assert torch.allclose(white, torch.full((1, 28, 28), (1 - 0.2860) / 0.3530))
    # __getitem__ must not modify the stored uint8 data.
    assert int(ds.data[1].min()) == 255


def test_fashion_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _, labels = _fake_split(raw, "t10k", n=4, gz=False)
    ds = get_dataset("fashion-mnist", train=False, root=tmp_path)
    assert ds.targets.tolist() == labels.tolist()


def test_fashion_mnist_count_mismatch(tmp_path):
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    labels = np.zeros(4, dtype=np.uint8)
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images), True)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels), True)
    with pytest.raises(ValueError, match=r"Fashion-MNIST files disagree: .*train-images-idx3-ubyte"
                       r"\.gz has 5 images but .*train-labels-idx1-ubyte\.gz has 4 labels"):
        get_dataset("fashion-mnist", train=True, root=tmp_path)


def test_fashion_mnist_bad_magic(tmp_path):
    _fake_split(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x01\x08\x01" + b"\x00" * 10)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte is not an IDX file"):
        get_dataset("fashion-mnist", train=True, root=tmp_path)


def test_fashion_mnist_wrong_image_shape(tmp_path):
    _fake_split(tmp_path, gz=False)
    _write(tmp_path / "train-images-idx3-ubyte",
           _idx_bytes(np.zeros((6, 32, 32), dtype=np.uint8)), False)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: the IDX header says shape \(6, 32, 32\), "
                       r"expected N x 28 x 28"):
        get_dataset("fashion-mnist", train=True, root=tmp_path)


def test_fashion_mnist_label_out_of_range(tmp_path):
    _fake_split(tmp_path, gz=False)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.full(6, 10, dtype=np.uint8)), False)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.9, found 10"):
        get_dataset("fashion-mnist", train=True, root=tmp_path)


def test_fashion_mnist_missing_root(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as info:
        get_dataset("fashion-mnist", train=False, root=root)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte[.gz]" in message
    assert f"looked in {root}, {root / 'FashionMNIST' / 'raw'}" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "pass root=" in message and "download=True" in message


def test_fashion_mnist_only_one_split_present(tmp_path):
    _fake_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"Fashion-MNIST t10k files .* not found; "
                       r"looked in "):
        get_dataset("fashion-mnist", train=False, root=tmp_path)


def test_fashion_mnist_default_dir_missing(tmp_path, monkeypatch):
    monkeypatch.setattr("fxtucker.data.FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"looked in .*nowhere\. Install them with "
                       r"'apt-get install dataset-fashion-mnist'"):
        get_dataset("fashion-mnist", train=True)


def test_fashion_mnist_default_dir_is_used(tmp_path, monkeypatch):
    _, labels = _fake_split(tmp_path, "train", n=3)
    monkeypatch.setattr("fxtucker.data.FASHION_MNIST_DIR", tmp_path)
    assert get_dataset("fashion-mnist", train=True).targets.tolist() == labels.tolist()


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"{FASHION_MNIST_DIR} is absent; 'apt-get install dataset-fashion-mnist' provides it",
)
def test_real_fashion_mnist():
    train = get_dataset("fashion-mnist", train=True)
    assert len(train) == 60000
    assert train.data.shape == (60000, 28, 28) and train.data.dtype == torch.uint8
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    x, y = train[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10
    # The published statistics are those of the training images.
    pixels = train.data.float() / 255
    assert pixels.mean().item() == pytest.approx(FASHION_MNIST_MEAN, abs=1e-3)
    assert pixels.std().item() == pytest.approx(FASHION_MNIST_STD, abs=1e-3)
    assert len(get_dataset("fashion-mnist", train=False)) == 10000


# --- names, info, other datasets --------------------------------------------------------------


def test_unknown_dataset():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; valid names are "
                       r"\['fashion-mnist', 'cifar10', 'cifar100', 'imagefolder'\]"):
        get_dataset("mnist", train=True)
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'; valid names"):
        dataset_info("svhn")


def test_dataset_info():
    assert dataset_info("fashion-mnist") == (1, 10, 28)
    assert dataset_info("cifar10") == (3, 10, 32)
    assert dataset_info("cifar100") == (3, 100, 32)
    assert set(DATASETS) == {"fashion-mnist", "cifar10", "cifar100", "imagefolder"}


def test_dataset_info_imagefolder(tmp_path):
    for cls in ("cat", "dog", "fox"):
        (tmp_path / cls).mkdir()
    assert dataset_info("imagefolder", root=tmp_path) == (3, 3, 224)
    with pytest.raises(ValueError, match=r"dataset 'imagefolder' needs root="):
        dataset_info("imagefolder")


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=rf"{name} not found in .*; pass root= \(--root on the command line\) to the "
                       r"directory that holds it, or download=True \(Python API\) where there is a network"):
        get_dataset(name, train=True, root=tmp_path)


def test_imagefolder(tmp_path):
    from PIL import Image

    for i, cls in enumerate(("a", "b")):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (300, 260), color=(40 * i, 100, 200)).save(tmp_path / cls / "x.png")
    ds = get_dataset("imagefolder", train=False, root=tmp_path)
    assert len(ds) == 2
    x, y = ds[1]
    assert x.shape == (3, 224, 224) and y == 1
    expected_red = (40 / 255 - 0.485) / 0.229
    assert x[0].mean().item() == pytest.approx(expected_red, abs=1e-4)
    x_train, _ = get_dataset("imagefolder", train=True, root=tmp_path)[0]
    assert x_train.shape == (3, 224, 224)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"dataset 'imagefolder' needs root=<directory with one "
                       r"subdirectory per class>"):
        get_dataset("imagefolder", train=True)
    with pytest.raises(FileNotFoundError, match=r"imagefolder root '.*nope' is not a directory"):
        get_dataset("imagefolder", train=True, root=tmp_path / "nope")


# --- make_loader ------------------------------------------------------------------------------


def _labelled_range(n=50):
    return torch.utils.data.TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n))


def _all_labels(loader):
    return torch.cat([y for _, y in loader]).tolist()


def test_make_loader_subset_is_deterministic():
    ds = _labelled_range()
    a = _all_labels(make_loader(ds, 4, train=False, subset=10, seed=3))
    b = _all_labels(make_loader(ds, 4, train=False, subset=10, seed=3))
    c = _all_labels(make_loader(ds, 4, train=False, subset=10, seed=4))
    assert a == b
    assert len(a) == 10 and len(set(a)) == 10 and a == sorted(a)
    assert a != c
    assert a != list(range(10))


def test_make_loader_train_shuffles_reproducibly():
    ds = _labelled_range(30)
    first = _all_labels(make_loader(ds, 8, train=True, seed=1))
    again = _all_labels(make_loader(ds, 8, train=True, seed=1))
    assert first == again
    assert sorted(first) == list(range(30)) and first != list(range(30))
    assert _all_labels(make_loader(ds, 8, train=False)) == list(range(30))
    # Epochs differ from each other but the sequence of epochs is reproducible.
    loader = make_loader(ds, 8, train=True, seed=1)
    epochs = [_all_labels(loader), _all_labels(loader)]
    assert epochs[0] == first and epochs[0] != epochs[1]


def test_make_loader_epoch_items_draws_each_epoch_afresh_from_the_subset():
    """epoch_items: every epoch is that many distinct items of the subset, another draw each epoch
    (train() redraws the order from seed + epoch), the same draws for the same seed."""
    from fxtucker.batches import train_batches
    from fxtucker.distributed import Dist

    ds = _labelled_range(50)
    pool = set(_all_labels(make_loader(ds, 4, train=False, subset=30, seed=2)))
    loader = make_loader(ds, 4, train=True, subset=30, epoch_items=10, seed=2)
    assert len(loader) == 3 and len(loader.sampler) == 10 and len(loader.dataset) == 30
    epochs = [_all_labels(train_batches(loader, 7, epoch, Dist())) for epoch in range(4)]
    assert all(len(e) == 10 and len(set(e)) == 10 and set(e) <= pool for e in epochs)
    assert len({tuple(sorted(e)) for e in epochs}) == 4  # four different draws
    assert len(set().union(*epochs)) > 10  # more items seen than one epoch holds
    again = make_loader(ds, 4, train=True, subset=30, epoch_items=10, seed=2)
    assert [_all_labels(train_batches(again, 7, epoch, Dist())) for epoch in range(4)] == epochs
    # Under DDP the ranks share out the draw one process makes (the ranks' shares make up its items).
    for epoch in range(2):
        shares = [_all_labels(train_batches(loader, 7, epoch, Dist(rank=r, world=2))) for r in range(2)]
        assert len(shares[0]) == len(shares[1]) == 5 and sorted(shares[0] + shares[1]) == sorted(epochs[epoch])
    # Without subset the draw is from the whole dataset; all of it is a plain shuffled epoch.
    assert len(set(_all_labels(make_loader(ds, 25, train=True, epoch_items=50, seed=0)))) == 50


def _images(n=6, size=5):
    x = torch.arange(n * size * size, dtype=torch.float32).reshape(n, 1, size, size)
    return torch.utils.data.TensorDataset(x, torch.arange(n))


def test_augmented_shifts_and_flips_by_seed_epoch_and_index():
    from fxtucker.data import Augmented

    ds = _images()
    aug = Augmented(ds, shift=2, seed=3)
    first = [aug[i][0] for i in range(6)]
    assert all(torch.equal(a, aug[i][0]) for i, a in enumerate(first))  # the same draw again
    assert [aug[i][1] for i in range(6)] == [ds[i][1] for i in range(6)]  # labels kept
    # each item is the original shifted (edges repeated, as replicate padding does) and maybe flipped
    for i, a in enumerate(first):
        padded = torch.nn.functional.pad(ds[i][0].unsqueeze(0), (2, 2, 2, 2), mode="replicate")[0]
        crops = [padded[:, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(a, c) or torch.equal(a, c.flip(-1)) for c in crops), i
    assert not all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))  # something moved
    aug.set_epoch(1)
    assert not all(torch.equal(a, aug[i][0]) for i, a in enumerate(first))  # another epoch, another draw
    other = Augmented(ds, shift=2, seed=4)
    assert not all(torch.equal(a, other[i][0]) for i, a in enumerate(first))  # another seed, another draw
    # half the items flipped, whatever the shift (shift 0: flips only)
    ramps = torch.utils.data.TensorDataset(torch.arange(8.0).expand(400, 1, 3, 8), torch.zeros(400))  # left < right
    for shift in (0, 2):
        aug = Augmented(ramps, shift=shift)
        flipped = sum(bool(aug[i][0][0, 1, 0] > aug[i][0][0, 1, -1]) for i in range(400))
        assert 180 < flipped < 220, (shift, flipped)  # 200 +- 2 std; a 2-in-5 flip (160) fails
    with pytest.raises(ValueError, match=r"shift must be an integer >= 0 \(pixels\), got -1"):
        Augmented(ds, shift=-1)
    flat = torch.utils.data.TensorDataset(torch.zeros(2, 5), torch.arange(2))
    with pytest.raises(TypeError, match=r"items must be \(C x H x W image tensor, label\), got a Tensor of shape \(5,\)"):
        Augmented(flat)[0]


def test_make_loader_augment_draws_each_training_epoch_anew():
    """The training loop sets the epoch: epochs differ, and a new loader (a resumed run's) gives the same epochs."""
    from fxtucker.batches import train_batches
    from fxtucker.distributed import Dist

    def epoch(loader, e):
        return torch.cat([x for x, _ in train_batches(loader, 0, e, Dist())])

    loader = make_loader(_images(), 3, train=True, augment=True, seed=1)
    a0, a1 = epoch(loader, 0), epoch(loader, 1)
    assert not torch.equal(a0, a1)
    again = make_loader(_images(), 3, train=True, augment=True, seed=1)
    assert torch.equal(epoch(again, 1), a1) and torch.equal(epoch(again, 0), a0)  # a resumed run's epochs
    with pytest.raises(ValueError, match="augment is for training loaders"):
        make_loader(_images(), 3, train=False, augment=True)


def test_make_loader_batches(tmp_path):
    _fake_split(tmp_path, n=6)
    loader = make_loader(get_dataset("fashion-mnist", True, root=tmp_path), 4, train=False)
    batches = list(loader)
    assert [x.shape for x, _ in batches] == [(4, 1, 28, 28), (2, 1, 28, 28)]
    assert batches[0][1].dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
        ({"subset": 0}, r"subset must be an integer in 1\.\.50 \(the dataset's size\) or None"),
        ({"subset": 51}, r"subset must be an integer in 1\.\.50 .*got 51"),
        ({"num_workers": -1}, r"num_workers must be an integer >= 0, got -1"),
        ({"epoch_items": 0, "train": True}, r"epoch_items must be an integer in 1\.\.50 \(the items to draw from\)"),
        ({"epoch_items": 21, "subset": 20, "train": True},
         r"epoch_items must be an integer in 1\.\.20 \(the items to draw from after subset\).*got 21"),
        ({"epoch_items": True, "train": True}, r"epoch_items must be an integer .*got True"),
        ({"epoch_items": 10}, r"epoch_items draws each training epoch's items afresh; an evaluation loader"),
    ],
)
def test_make_loader_errors(kwargs, pattern):
    args = {"batch_size": 4, "train": False, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        make_loader(_labelled_range(), args.pop("batch_size"), **args)
