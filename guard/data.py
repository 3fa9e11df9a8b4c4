"""Image datasets held in memory as uint8 tensors, and the training augmentations.

Every dataset the project trains or evaluates on becomes an :class:`ImageTensorDataset`: uint8 images
``(N, C, H, W)`` plus int64 labels. Keeping pixels as uint8 keeps CIFAR-10 at 150 MB, lets the training
loop index whole batches without per-sample Python, and keeps the exact 8-bit pixels that small triggers
and imperceptible perturbations depend on (ALGORITHMS.md §0.1).

CIFAR-10 (Krizhevsky, 2009) is read from either layout found on disk:

* torchvision's ``cifar-10-batches-py/`` (what ``download=True`` fetches), or
* the npz layout (``cifar10_train_0.npz``, ``cifar10_train_1.npz``, ``cifar10_test.npz``,
  ``cifar10_test_lossless_first1000.npz``), whose full test file was decoded from JPEG and is lossy.

Splits are chosen explicitly: ``"train"`` (50,000), ``"test"`` (10,000) and ``"test-lossless"`` (the first
1,000 test images with exact pixels). SVHN, GTSRB and any ImageFolder tree go through torchvision and are
resized to a fixed square size.

A dataset that is neither on disk nor downloadable raises :class:`DataNotFoundError`, whose message says
what was looked for, where, and how to provide it (``--data-dir``, ``GUARD_DATA_DIR``, ``--download``).

Example::

    from guard.data import load_dataset
    test = load_dataset("cifar10", "/data", split="test-lossless")
    x, y = test[0]          # float (3, 32, 32) in [0, 1], int label
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ._validation import is_int, is_number, require_extra

logger = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "DataNotFoundError",
    "ImageTensorDataset",
    "check_quality_range",
    "data_dir",
    "jpeg_roundtrip",
    "load_dataset",
    "random_crop_flip",
    "random_jpeg",
]

#: CIFAR-10 class names in label order.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

_CIFAR_SPLITS = ("train", "test", "test-lossless")
_LOSSLESS_TEST_SIZE = 1000
_RESIZE_CHUNK = 1024


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$GUARD_DATA_DIR``, else ``~/.cache/guard/data``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("GUARD_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "guard" / "data"


class DataNotFoundError(FileNotFoundError):
    """A dataset is neither on disk nor downloadable now; the message (one line) says what was looked for,
    where, and how to provide it. A :class:`FileNotFoundError`, so code handling missing files handles it."""


_PROVIDE = ("--data-dir DIR (root=DIR) or GUARD_DATA_DIR=DIR pointing at a folder holding {what}, or "
            "--download (download=True) to fetch it through torchvision")


def _not_found(what: str, looked: str, error: BaseException | None = None,
               downloading: bool = True) -> DataNotFoundError:
    """The one error for missing data: what, where, why the download (or read) failed, and the remedies."""
    message = f"{what} not found: looked for {looked}"
    if error is not None:
        cause = " ".join(f"{type(error).__name__}: {error}".split())
        message += f"; {'downloading' if downloading else 'reading'} it failed ({cause})"
    retry = " where the download site is reachable" if error is not None and downloading else ""
    return DataNotFoundError(f"{message}. Provide it with {_PROVIDE.format(what=what)}{retry}.")


class ImageTensorDataset(torch.utils.data.Dataset):
    """Images as a uint8 tensor ``(N, C, H, W)`` with int64 labels ``(N,)`` and class names.

    ``dataset[i]`` returns ``(float image (C, H, W) in [0, 1], int label)`` like torchvision's
    ``ToTensor`` pipeline; the training loop reads ``.images`` / ``.labels`` directly instead.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if images.dtype != torch.uint8:
            raise TypeError(f"images must have dtype torch.uint8 (pixels 0..255), got {images.dtype}")
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.dtype != torch.int64:
            raise TypeError(f"labels must have dtype torch.int64, got {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must have shape ({images.shape[0]},) to match {images.shape[0]} images, "
                f"got shape {tuple(labels.shape)}"
            )
        if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
            raise TypeError(f"classes must be a sequence of class-name strings, got {classes!r}")
        classes = tuple(classes)
        if not classes:
            raise ValueError("classes must name at least one class, got an empty sequence")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise ValueError(
                f"labels must lie in [0, {len(classes) - 1}] for {len(classes)} classes, "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        self.images = images.contiguous()
        self.labels = labels.contiguous()
        self.classes = classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].float().div_(255), int(self.labels[index])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={len(self)}, image_shape={tuple(self.images.shape[1:])}, "
                f"classes={len(self.classes)})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "ImageTensorDataset":
        """A new dataset holding copies of the images at ``indices`` (in that order)."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        if index.dim() != 1:
            raise ValueError(f"indices must be one-dimensional, got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(
                f"indices must lie in [0, {len(self) - 1}] for a dataset of {len(self)} images, "
                f"got values in [{int(index.min())}, {int(index.max())}]"
            )
        return ImageTensorDataset(self.images[index], self.labels[index], self.classes)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4,
                     flip: bool = True) -> torch.Tensor:
    """Random crop after zero-padding by ``padding`` pixels, and a random horizontal flip, per image.

    The standard CIFAR training augmentation (torchvision ``RandomCrop(size, padding=4)`` +
    ``RandomHorizontalFlip()``), applied to a whole batch ``(N, C, H, W)`` of any dtype and on any device
    with one gather. The random offsets and flips are drawn on ``generator``'s device and moved to the
    images, so a CPU generator gives the same result on CPU and GPU.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (N, C, H, W), got {got}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    n, _, h, w = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=generator.device)
    flips = (torch.rand(n, generator=generator, device=generator.device) < 0.5) if flip else None
    offsets = offsets.to(images.device)
    rows = offsets[:, :1] + torch.arange(h, device=images.device)           # (N, H)
    cols = torch.arange(w, device=images.device).expand(n, w)
    if flips is not None:
        cols = torch.where(flips.to(images.device)[:, None], cols.flip(1), cols)
    cols = offsets[:, 1:] + cols                                             # (N, W)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def jpeg_roundtrip(images: torch.Tensor, quality: int | Sequence[int]) -> torch.Tensor:
    """Every RGB image of ``images`` ``(N, 3, H, W)`` encoded as a JPEG at ``quality`` (one int, or one per
    image) and decoded again, with PIL — what an image that travelled as a JPEG looks like. uint8 images, or
    float images in [0, 1] (rounded to 8 bits first); the result has the dtype and device of ``images``."""
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be RGB images of shape (N, 3, H, W), got {got}")
    qualities = [quality] * len(images) if isinstance(quality, int) else [int(q) for q in quality]
    if len(qualities) != len(images) or any(isinstance(q, bool) or not 1 <= q <= 100 for q in qualities):
        raise ValueError(f"quality must be an int in [1, 100] or one per image, got {quality!r} for "
                         f"{len(images)} images")
    as_bytes = images if images.dtype == torch.uint8 else (images.clamp(0, 1) * 255).round().byte()
    out = []
    for array, q in zip(as_bytes.permute(0, 2, 3, 1).cpu().numpy(), qualities):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "JPEG", quality=q)
        buffer.seek(0)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    decoded = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.device)
    return decoded if images.dtype == torch.uint8 else decoded.to(images.dtype) / 255


def check_quality_range(quality: object, name: str = "quality") -> tuple[int, int]:
    """``quality`` as the ``(lowest, highest)`` JPEG qualities of :func:`random_jpeg`, 1 ≤ lowest ≤ highest
    ≤ 100."""
    if isinstance(quality, (str, bytes)) or not hasattr(quality, "__len__") or len(quality) != 2 \
            or not all(is_int(q) for q in quality) or not 1 <= quality[0] <= quality[1] <= 100:
        raise ValueError(f"{name} must be a pair (lowest, highest) of JPEG qualities with 1 <= lowest <= highest "
                         f"<= 100, got {quality!r}")
    return (int(quality[0]), int(quality[1]))


def random_jpeg(images: torch.Tensor, generator: torch.Generator, p: float,
                quality: tuple[int, int] = (50, 95)) -> torch.Tensor:
    """Each image of the batch, with probability ``p``, through :func:`jpeg_roundtrip` at a quality drawn
    uniformly from ``quality`` (inclusive): the JPEG augmentation of :class:`guard.train.TrainConfig`, for a
    model that will see images that travelled as JPEGs. Both draws are taken from ``generator`` for every image,
    so the draws that follow do not depend on which images were picked."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not is_number(p) or not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    quality = check_quality_range(quality)
    n = len(images)
    picked = torch.nonzero(torch.rand(n, generator=generator, device=generator.device) < p).flatten().cpu()
    drawn = torch.randint(quality[0], quality[1] + 1, (n,), generator=generator, device=generator.device).cpu()
    if not len(picked):
        return images
    out = images.clone()
    rows = picked.to(images.device)
    out[rows] = jpeg_roundtrip(images[rows], drawn[picked].tolist())
    return out


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images ``(N, C, H, W)`` (or one ``(C, H, W)``) to ``size x size``, antialiased."""
    from torchvision.transforms.v2 import functional as TF

    if tuple(images.shape[-2:]) == (size, size):
        return images
    if images.dim() == 3 or len(images) <= _RESIZE_CHUNK:
        return TF.resize(images, [size, size], antialias=True)
    return torch.cat([TF.resize(chunk, [size, size], antialias=True)
                      for chunk in images.split(_RESIZE_CHUNK)])


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")


# --------------------------------------------------------------------------------------------- CIFAR-10

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files without running arbitrary code: only numpy arrays are rebuilt."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a CIFAR batch file (only numpy arrays allowed)"
            )
        if module.startswith("numpy.core."):  # files written by NumPy 1.x name numpy.core
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels'")
    data = np.asarray(entry["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected 'data' uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(entry["labels"], dtype=np.int64)


def _torchvision_cifar_dir(base: Path) -> Path | None:
    for candidate in (base / "cifar-10-batches-py", base):
        if (candidate / "data_batch_1").is_file() or (candidate / "test_batch").is_file():
            return candidate
    return None


def _npz_cifar_dir(base: Path) -> Path | None:
    for candidate in (base / "cifar10", base):
        if any(candidate.glob("cifar10_*.npz")):
            return candidate
    return None


def _require(paths: Sequence[Path], base: Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise _not_found("CIFAR-10", f"{', '.join(p.name for p in missing)} in {base}, which holds only part of it")


def _load_cifar_torchvision(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    _require([folder / n for n in names], folder)
    parts = [_read_cifar_batch(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if split == "test-lossless":
        images, labels = images[:_LOSSLESS_TEST_SIZE], labels[:_LOSSLESS_TEST_SIZE]
    return images, labels


def _read_npz(path: Path, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        if x_key not in f or y_key not in f:
            raise ValueError(f"{path}: expected arrays {x_key!r} and {y_key!r}, found {sorted(f.files)}")
        images, labels = f[x_key], f[y_key]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"{path}: expected {x_key!r} uint8 of shape (N, 32, 32, 3), "
                         f"got {images.dtype} {images.shape}")
    return images.transpose(0, 3, 1, 2), labels.astype(np.int64).reshape(-1)


def _load_cifar_npz(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "train":
        paths = [folder / "cifar10_train_0.npz", folder / "cifar10_train_1.npz"]
        _require(paths, folder)
        parts = [_read_npz(p, "x_train", "y_train") for p in paths]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if split == "test-lossless":
        path = folder / "cifar10_test_lossless_first1000.npz"
        _require([path], folder)
        return _read_npz(path, "x_test", "y_test")
    path = folder / "cifar10_test.npz"
    _require([path], folder)
    logger.warning(
        "%s was decoded from JPEG: its pixels are lossy (about 5.8/255 per value) and pretrained models "
        "lose about 10 accuracy points on it; use split='test-lossless' for the first 1000 exact test "
        "images", path,
    )
    return _read_npz(path, "x_test", "y_test")


def _load_cifar10(root: Path, split: str, download: bool, image_size: int | None) -> ImageTensorDataset:
    if split not in _CIFAR_SPLITS:
        raise ValueError(f"cifar10 split must be one of {_CIFAR_SPLITS}, got {split!r}")
    folder = _torchvision_cifar_dir(root)
    if folder is not None:
        logger.info("reading CIFAR-10 %s split from torchvision layout %s", split, folder)
        images, labels = _load_cifar_torchvision(folder, split)
    elif (folder := _npz_cifar_dir(root)) is not None:
        logger.info("reading CIFAR-10 %s split from npz layout %s", split, folder)
        images, labels = _load_cifar_npz(folder, split)
    else:
        looked = ("torchvision's cifar-10-batches-py/ (data_batch_1..5, test_batch) and cifar10_*.npz files in "
                  + ", ".join(str(p) for p in (root / "cifar-10-batches-py", root / "cifar10", root)))
        if not download:
            raise _not_found("CIFAR-10", looked)
        import torchvision

        try:
            for train in (True, False):
                torchvision.datasets.CIFAR10(str(root), train=train, download=True)
        except (OSError, RuntimeError) as exc:  # no network (URLError), unwritable root, corrupt download
            raise _not_found("CIFAR-10", looked, exc) from exc
        images, labels = _load_cifar_torchvision(root / "cifar-10-batches-py", split)
    dataset = ImageTensorDataset(torch.from_numpy(np.ascontiguousarray(images)),
                                 torch.from_numpy(labels), CIFAR10_CLASSES)
    if image_size is not None:
        dataset = ImageTensorDataset(_resize(dataset.images, image_size), dataset.labels, dataset.classes)
    return dataset


# ---------------------------------------------------------------------------- torchvision-backed sets

def _from_pil_dataset(dataset, classes: Sequence[str], image_size: int) -> ImageTensorDataset:
    """Decode a torchvision dataset of ``(PIL image, label)`` into resized uint8 tensors."""
    from torchvision.transforms.v2 import functional as TF

    images = torch.empty((len(dataset), 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.int64)
    for i in range(len(dataset)):
        image, label = dataset[i]
        images[i] = _resize(TF.pil_to_tensor(image.convert("RGB")), image_size)
        labels[i] = label
    return ImageTensorDataset(images, labels, classes)


def _load_svhn(root: Path, split: str, download: bool, image_size: int | None) -> ImageTensorDataset:
    import torchvision

    if split not in ("train", "test", "extra"):
        raise ValueError(f"svhn split must be one of ('train', 'test', 'extra'), got {split!r}")
    folder = root / "svhn"
    looked = f"{split}_32x32.mat in {folder}"
    if not download and not (folder / f"{split}_32x32.mat").is_file():
        raise _not_found("SVHN", looked)
    require_extra("scipy", "svhn", "reading SVHN's .mat files")  # before a download, not after it
    try:
        raw = torchvision.datasets.SVHN(str(folder), split=split, download=download)
    except (OSError, RuntimeError) as exc:  # a corrupt file (RuntimeError) or a failed download (URLError)
        raise _not_found("SVHN", looked, exc, downloading=download) from exc
    images = torch.from_numpy(np.ascontiguousarray(raw.data))
    return ImageTensorDataset(_resize(images, 32 if image_size is None else image_size),
                              torch.as_tensor(raw.labels, dtype=torch.int64),
                              tuple(str(i) for i in range(10)))


def _load_gtsrb(root: Path, split: str, download: bool, image_size: int | None) -> ImageTensorDataset:
    import torchvision

    if split not in ("train", "test"):
        raise ValueError(f"gtsrb split must be one of ('train', 'test'), got {split!r}")
    try:
        raw = torchvision.datasets.GTSRB(str(root), split=split, download=download)
    except (OSError, RuntimeError) as exc:  # not there (RuntimeError) or the download failed (URLError)
        raise _not_found("GTSRB", f"torchvision's GTSRB {split} files in {root / 'gtsrb'}",
                         exc if download else None) from exc
    return _from_pil_dataset(raw, tuple(str(i) for i in range(43)), 32 if image_size is None else image_size)


def _load_imagefolder(root: Path, split: str, download: bool, image_size: int | None) -> ImageTensorDataset:
    import torchvision

    if split != "train":
        raise ValueError(
            f"imagefolder reads the class folders directly under root; pass the folder of the split you "
            f"want as root and leave split at its default, got split={split!r}"
        )
    if download:
        raise ValueError("imagefolder cannot be downloaded; got download=True")
    if not root.is_dir():
        raise DataNotFoundError(f"imagefolder not found: {root} is not a directory of class sub-folders. "
                                "Point --data-dir DIR (root=DIR) or GUARD_DATA_DIR=DIR at one.")
    raw = torchvision.datasets.ImageFolder(str(root))
    return _from_pil_dataset(raw, raw.classes, 32 if image_size is None else image_size)


_LOADERS: dict[str, Callable[[Path, str, bool, int | None], ImageTensorDataset]] = {
    "cifar10": _load_cifar10,
    "svhn": _load_svhn,
    "gtsrb": _load_gtsrb,
    "imagefolder": _load_imagefolder,
}

#: names accepted by :func:`load_dataset`
DATASETS = tuple(_LOADERS)


def load_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                 download: bool = False, image_size: int | None = None) -> ImageTensorDataset:
    """Load a dataset into memory as an :class:`ImageTensorDataset`.

    ``root`` defaults to :func:`data_dir`; for ``"imagefolder"`` it is the folder of class sub-folders.
    ``image_size`` resizes to a square (CIFAR-10 keeps its native 32 px when ``None``; the other datasets
    default to 32). ``download=True`` fetches through torchvision when the files are not present.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}")
    _check_image_size(image_size)
    return _LOADERS[name](data_dir(root), split, bool(download), image_size)
