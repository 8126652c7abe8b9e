"""Datasets by name and a seeded DataLoader factory.

Fashion-MNIST is read straight from its IDX files with numpy (gzip or plain), from ``root``,
from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), or
through torchvision's downloader when ``download=True``. The whole split is kept as one uint8
tensor and normalized one item at a time. CIFAR-10/100 and ImageFolder go through torchvision.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torchvision import transforms as T
from torchvision.datasets.folder import find_classes

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_CLASSES",
    "DEFAULT_ROOT",
    "IdxImageDataset",
    "Augmented",
    "read_idx",
    "get_dataset",
    "dataset_info",
    "make_loader",
]

PathLike = Union[str, os.PathLike]

#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Where CIFAR is looked for, and downloads go, when no ``root`` is given.
DEFAULT_ROOT = Path.home() / ".cache" / "fxtucker" / "datasets"

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

#: name -> (in_channels, num_classes, image_size); imagefolder's class count depends on root.
DATASETS: dict[str, tuple[int, Optional[int], int]] = {
    "fashion-mnist": (1, 10, 28),
    "cifar10": (3, 10, 32),
    "cifar100": (3, 100, 32),
    "imagefolder": (3, None, 224),
}

# IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


#: The most data bytes read_idx reads from one file unless told otherwise (Fashion-MNIST's
#: training images are 47 MB).
MAX_IDX_BYTES = 1 << 30


def read_idx(path: PathLike, *, max_bytes: int = MAX_IDX_BYTES,
             expect: Optional[tuple[Optional[int], ...]] = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed if its name ends in ``.gz``) into a numpy array.

    The header is the magic number ``00 00 <type> <ndim>`` and ``ndim`` big-endian uint32
    sizes, followed by the data in C order. The header is checked (against ``expect`` and
    ``max_bytes``) before any data is read or decompressed, and no more than the data bytes the
    header announces (plus one, to detect trailing bytes) is ever read: a small gzip file that
    decompresses to gigabytes is refused after its header.

    Args:
        path: the file.
        max_bytes: the most data bytes accepted.
        expect: the expected shape, None for a size that may be anything (e.g. ``(None, 28, 28)``).

    Returns:
        An array of the file's shape, in native byte order.

    Raises:
        ValueError: a bad magic number, an unknown type code, a shape other than ``expect``,
            more data than ``max_bytes``, or a data length that does not match the header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
                raise ValueError(
                    f"{path} is not an IDX file: the magic number must start with bytes 00 00, found "
                    f"{magic.hex(' ') or 'an empty file'}"
                )
            code, ndim = magic[2], magic[3]
            if code not in _IDX_DTYPES:
                valid = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
                raise ValueError(f"{path}: unknown IDX type code 0x{code:02X}; valid codes are {valid}")
            header = 4 + 4 * ndim
            sizes = f.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise ValueError(
                    f"{path}: the IDX header announces {ndim} dimensions ({header} header bytes) but "
                    f"the file has only {4 + len(sizes)} bytes"
                )
            shape = tuple(int(d) for d in np.frombuffer(sizes, dtype=">u4", count=ndim))
            dtype = _IDX_DTYPES[code]
            if expect is not None and (len(shape) != len(expect)
                                       or any(e is not None and e != d for e, d in zip(expect, shape))):
                want = " x ".join("N" if e is None else str(e) for e in expect)
                raise ValueError(f"{path}: the IDX header says shape {shape}, expected {want}; the file is not "
                                 f"the one fxtucker looks for here, or it is corrupt")
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if expected > max_bytes:
                raise ValueError(f"{path}: the IDX header says shape {shape} of {dtype.name}, which is "
                                 f"{expected:,} data bytes, above the {max_bytes:,} fxtucker reads; refused "
                                 f"before reading (or decompressing) the data")
            raw = f.read(expected + 1)  # one byte more: trailing data means a corrupt file
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{path}: cannot be read as an IDX file ({type(exc).__name__}: {exc}); it is "
                         f"truncated or corrupt") from None
    if len(raw) != expected:
        got = f"{len(raw)}" if len(raw) <= expected else f"more than {expected}"
        raise ValueError(
            f"{path}: the IDX header says shape {shape} of {dtype.name}, which is {expected} "
            f"data bytes, but the file has {got}; the file is truncated or corrupt"
        )
    data = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


class IdxImageDataset(Dataset):
    """Grayscale images and labels held in memory; items are normalized float32 1xHxW tensors.

    Attributes:
        data: uint8 tensor N x H x W.
        targets: int64 tensor N.
        classes: class names, one per label.
        mean, std: the normalization applied by ``__getitem__``.
        files: the (images, labels) files it was read from.
    """

    def __init__(
        self,
        data: torch.Tensor,
        targets: torch.Tensor,
        mean: float,
        std: float,
        classes: tuple[str, ...] = (),
        files: tuple[str, ...] = (),
    ) -> None:
        self.data = data
        self.targets = targets
        self.mean = mean
        self.std = std
        self.classes = classes
        self.files = files

    def __len__(self) -> int:
        """Number of items."""
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Item ``index`` as (normalized float32 1xHxW image, int label)."""
        x = self.data[index].to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        return x.unsqueeze(0), int(self.targets[index])

    def __repr__(self) -> str:
        """Size, image shape and source files."""
        return (
            f"{type(self).__name__}(n={len(self)}, image={tuple(self.data.shape[1:])}, "
            f"files={list(self.files)})"
        )


def _find_idx(directory: Path, stem: str) -> Optional[Path]:
    """The IDX file ``stem`` (plain preferred) or ``stem.gz`` in ``directory``, if present."""
    for name in (stem, stem + ".gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(directory: Path, train: bool) -> IdxImageDataset:
    """Read one split of Fashion-MNIST from the IDX files in ``directory`` and check them."""
    prefix = "train" if train else "t10k"
    images_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {prefix} files ({prefix}-images-idx3-ubyte[.gz], "
            f"{prefix}-labels-idx1-ubyte[.gz]) not found in {directory}"
        )
    images = read_idx(images_path, expect=(None, 28, 28))
    labels = read_idx(labels_path, expect=(None,))
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{images_path}: Fashion-MNIST images must be uint8 of shape N x 28 x 28, found "
            f"{images.dtype} of shape {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{labels_path}: Fashion-MNIST labels must be a uint8 vector, found {labels.dtype} "
            f"of shape {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST files disagree: {images_path} has {images.shape[0]} images but "
            f"{labels_path} has {labels.shape[0]} labels"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"{labels_path}: Fashion-MNIST labels must be in 0..9, found {int(labels.max())}"
        )
    return IdxImageDataset(
        torch.from_numpy(images),
        torch.from_numpy(labels.astype(np.int64)),
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        classes=FASHION_MNIST_CLASSES,
        files=(str(images_path), str(labels_path)),
    )


def _has_fashion_mnist(directory: Path, train: bool) -> bool:
    """Whether ``directory`` holds both IDX files of the split."""
    prefix = "train" if train else "t10k"
    return (
        _find_idx(directory, f"{prefix}-images-idx3-ubyte") is not None
        and _find_idx(directory, f"{prefix}-labels-idx1-ubyte") is not None
    )


def _fashion_mnist(train: bool, root: Optional[PathLike], download: bool) -> IdxImageDataset:
    """Find Fashion-MNIST (root, then the Debian directory, then a download) and read it."""
    if root is not None:
        # torchvision.datasets.FashionMNIST keeps its files under <root>/FashionMNIST/raw.
        candidates = [Path(root), Path(root) / "FashionMNIST" / "raw"]
    else:
        candidates = [FASHION_MNIST_DIR]
    for directory in candidates:
        if _has_fashion_mnist(directory, train):
            return _load_fashion_mnist(directory, train)
    if download:
        target = Path(root) if root is not None else DEFAULT_ROOT
        torchvision.datasets.FashionMNIST(str(target), train=train, download=True)
        return _load_fashion_mnist(target / "FashionMNIST" / "raw", train)
    prefix = "train" if train else "t10k"
    looked = ", ".join(str(d) for d in candidates)
    raise FileNotFoundError(
        f"Fashion-MNIST {prefix} files ({prefix}-images-idx3-ubyte[.gz], "
        f"{prefix}-labels-idx1-ubyte[.gz]) not found; looked in {looked}. Install them with "
        f"'apt-get install dataset-fashion-mnist' (into {FASHION_MNIST_DIR}), pass root= (--root on the "
        f"command line) to a directory that holds them, or download=True (Python API) where there is a network"
    )


def _cifar(name: str, train: bool, root: Optional[PathLike], download: bool) -> Dataset:
    """CIFAR-10/100 through torchvision, normalized; random crop and flip for training."""
    mean, std = _CIFAR_STATS[name]
    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    transform = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    directory = Path(root) if root is not None else DEFAULT_ROOT
    try:
        return cls(str(directory), train=train, download=download, transform=transform)
    except RuntimeError as e:
        # torchvision says "Dataset not found or corrupted" as a RuntimeError.
        if download or "not found" not in str(e):
            raise
        raise FileNotFoundError(
            f"{name} not found in {directory} (torchvision layout, e.g. "
            f"{directory / cls.base_folder}); pass root= (--root on the command line) to the directory that "
            f"holds it, or download=True (Python API) where there is a network"
        ) from e


def _imagefolder(train: bool, root: Optional[PathLike]) -> Dataset:
    """ImageFolder at ``root`` with the standard ImageNet train or eval transform."""
    directory = _imagefolder_root(root)
    if train:
        steps = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(256), T.CenterCrop(224)]
    transform = T.Compose(steps + [T.ToTensor(), T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)])
    return torchvision.datasets.ImageFolder(str(directory), transform=transform, loader=_load_image)


def _load_image(path: str):
    """ImageFolder's default loader, with a ValueError naming the file when an image cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"imagefolder: the image {path} cannot be decoded ({type(exc).__name__}: {exc}); remove or "
                         f"replace the file") from None


def _imagefolder_root(root: Optional[PathLike]) -> Path:
    """Check that ImageFolder's root was given and exists."""
    if root is None:
        raise ValueError(
            "dataset 'imagefolder' needs root=<directory with one subdirectory per class> (--root on the "
            "command line)"
        )
    directory = Path(root)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"imagefolder root {str(directory)!r} is not a directory; pass root= to a directory "
            f"with one subdirectory of images per class"
        )
    return directory


def _check_name(name: object) -> str:
    """Return ``name`` if it is a known dataset, else raise ValueError listing the valid ones."""
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names are {list(DATASETS)}")
    return name


def get_dataset(
    name: str, train: bool, root: Optional[PathLike] = None, download: bool = False
) -> Dataset:
    """Return a dataset of (normalized float32 CxHxW image tensor, int label) items.

    Args:
        name: ``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"`` or ``"imagefolder"``.
        train: the training split (with augmentation for CIFAR and ImageFolder) or the test split.
            For ``"imagefolder"`` it only selects the transform: point ``root`` at the split.
        root: where the files are. For Fashion-MNIST, a directory with the IDX files (or
            torchvision's ``FashionMNIST/raw`` under it); by default the Debian package's
            ``/usr/share/datasets/fashion-mnist``. For CIFAR, torchvision's layout, by default
            ``~/.cache/fxtucker/datasets``. Required for ``"imagefolder"``.
        download: let torchvision download Fashion-MNIST or CIFAR into ``root`` (or the
            default cache directory) when the files are not found.

    Returns:
        For Fashion-MNIST an :class:`IdxImageDataset` (``.data`` uint8 N x 28 x 28,
        ``.targets`` int64); torchvision datasets otherwise.

    Raises:
        ValueError: an unknown name, or ``"imagefolder"`` without ``root``.
        FileNotFoundError: the files are not there; the message says where it looked and how
            to get them.
    """
    name = _check_name(name)
    for arg, value in (("train", train), ("download", download)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"get_dataset: {arg} must be True or False, got {value!r}")
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"get_dataset: root must be a path (str or os.PathLike) or None, got {type(root).__name__} {root!r}")
    if name == "fashion-mnist":
        return _fashion_mnist(bool(train), root, download)
    if name in _CIFAR_STATS:
        return _cifar(name, bool(train), root, download)
    return _imagefolder(bool(train), root)


def dataset_info(name: str, root: Optional[PathLike] = None) -> tuple[int, int, int]:
    """Return ``(in_channels, num_classes, image_size)`` of a dataset, the input the model sees.

    Args:
        name: a dataset name, as for :func:`get_dataset`.
        root: for ``"imagefolder"`` only (and required there): the class count is the number of
            class subdirectories.
    """
    name = _check_name(name)
    in_channels, num_classes, image_size = DATASETS[name]
    if num_classes is None:
        num_classes = len(find_classes(str(_imagefolder_root(root)))[0])
    return in_channels, num_classes, image_size


class Augmented(Dataset):
    """``dataset``'s items shifted by up to ``shift`` pixels each way and flipped left to right half
    the time: the augmentation fxtucker gives training images that are not augmented already
    (Fashion-MNIST's; CIFAR's and ImageFolder's training splits augment themselves).

    Each item's draw is a function of (``seed``, the epoch, its index): the same run gives the same
    images, a resumed one too, and each epoch another draw. fxtucker's training loop calls
    :meth:`set_epoch` before each epoch with the epoch of the run (``TrainConfig.first_epoch`` plus
    the stage's; call it yourself in your own loop): each stage of ``compress`` counts its epochs
    from 0, so fine-tuning's epoch e sees the draw of step 3's epoch e, unless
    ``CompressConfig.one_schedule`` runs the stages as one run.
    """

    def __init__(self, dataset: Dataset, shift: int = 2, seed: int = 0) -> None:
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ValueError(f"Augmented: shift must be an integer >= 0 (pixels), got {shift!r}")
        self.dataset = dataset
        self.shift = shift
        self.seed = seed
        self.epoch = 0
        self._index: dict[tuple[int, int], torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        """Draw the items of ``epoch`` from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of items."""
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Item ``index`` of the wrapped dataset, shifted and maybe flipped (an image tensor C x H x W)."""
        x, y = self.dataset[index]
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise TypeError(f"Augmented: items must be (C x H x W image tensor, label), got a "
                            f"{type(x).__name__}{' of shape ' + str(tuple(x.shape)) if isinstance(x, torch.Tensor) else ''}")
        key = (self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + int(index)
        g = torch.Generator().manual_seed(key % (2**63))
        dy, dx = torch.randint(0, 2 * self.shift + 1, (2,), generator=g).tolist()
        flip = int(torch.randint(0, 2, (1,), generator=g))
        if self.shift:  # edge pixels repeated where the shift uncovers the border
            x = x.index_select(1, self._rows(x.shape[1], dy)).index_select(2, self._rows(x.shape[2], dx))
        if flip:
            x = x.flip(-1)
        return x, y

    def _rows(self, size: int, draw: int) -> torch.Tensor:
        """Indices that shift ``size`` pixels by ``draw - shift``, edges repeated."""
        key = (size, draw)
        if key not in self._index:
            self._index[key] = torch.arange(size).add(draw - self.shift).clamp_(0, size - 1)
        return self._index[key]


def _check_count(name: str, value: object, n: int, what: str, none: str) -> None:
    """Raise unless ``value`` is an integer in 1..n (``what`` says what n is; ``none`` what None means)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n:
        raise ValueError(f"make_loader: {name} must be an integer in 1..{n} ({what}) or None for {none}, got {value!r}")


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    *,
    subset: Optional[int] = None,
    epoch_items: Optional[int] = None,
    augment: bool = False,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Wrap ``dataset`` in a DataLoader, shuffled with a seeded generator when ``train``.

    Args:
        dataset: a map-style dataset.
        batch_size: items per batch, >= 1.
        train: shuffle (with a generator seeded by ``seed``) if true; keep the order otherwise.
        subset: if given, use only this many items, a fixed random choice seeded by ``seed``
            (kept in index order), for quick runs and tests.
        epoch_items: if given (``train`` only), each epoch is this many items drawn afresh, without
            repeats, from the dataset (or from ``subset``'s items): an epoch costs what an epoch of a
            ``subset`` of that size costs, and successive epochs see different items. fxtucker's
            ``train`` draws epoch e from ``seed + e`` (its config's seed; each stage of
            ``compress`` counts from 0, so fine-tuning's epoch e draws what step 3's epoch e drew).
        augment: (``train`` only) shift and flip the items, :class:`Augmented` (for datasets that
            do not augment themselves: Fashion-MNIST).
        seed: seeds the subset choice, the augmentation and the shuffling (``train`` redraws the order of each
            epoch from its own seed).
        num_workers: DataLoader worker processes.

    Returns:
        A DataLoader; batches keep their last, possibly smaller, batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"make_loader: batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"make_loader: num_workers must be an integer >= 0, got {num_workers!r}")
    if subset is not None:
        n = len(dataset)
        _check_count("subset", subset, n, "the dataset's size", "all items")
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(n, generator=generator)[:subset].sort().values.tolist()
        dataset = Subset(dataset, indices)
    if augment:
        if not train:
            raise ValueError("make_loader: augment is for training loaders; an evaluation loader (train=False) "
                             "sees the images as they are, so leave it False")
        dataset = Augmented(dataset, seed=seed)
    if epoch_items is not None:
        _check_count("epoch_items", epoch_items, len(dataset),
                     "the items to draw from" + (" after subset" if subset is not None else ""), "all of them each epoch")
        if not train:
            raise ValueError("make_loader: epoch_items draws each training epoch's items afresh; an "
                             "evaluation loader (train=False) goes over all its items, so leave it None")
        sampler = RandomSampler(dataset, num_samples=epoch_items, generator=torch.Generator().manual_seed(seed))
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=bool(train),
        generator=torch.Generator().manual_seed(seed) if train else None,
        num_workers=num_workers,
    )
