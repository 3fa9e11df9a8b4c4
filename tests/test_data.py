"""guard.data: the in-memory dataset, CIFAR-10 in both on-disk layouts, torchvision-backed sets, augmentation."""

from __future__ import annotations

import io
import logging
import os
import pickle
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guard._validation import MissingExtraError
from guard.cli import main
from guard.data import (CIFAR10_CLASSES, DATASETS, DataNotFoundError, ImageTensorDataset, data_dir, jpeg_roundtrip,
                        load_dataset, random_crop_flip, random_jpeg)
from guard.serving import free_ports

#: what every missing-data message offers
REMEDIES = ("--data-dir", "GUARD_DATA_DIR", "--download")


def _images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- data_dir

def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("GUARD_DATA_DIR", str(tmp_path / "env"))
    assert data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_dir() == tmp_path / "env"
    monkeypatch.delenv("GUARD_DATA_DIR")
    assert data_dir() == Path.home() / ".cache" / "guard" / "data"


# ------------------------------------------------------------------------------------ ImageTensorDataset

def test_dataset_items_are_float_images_and_int_labels():
    images, labels = _images(5), torch.tensor([0, 1, 2, 1, 0])
    ds = ImageTensorDataset(images, labels, ["a", "b", "c"])
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (3, 8, 8)
    assert torch.equal(x, images[3].float() / 255) and y == 1 and isinstance(y, int)
    assert len(ds) == 5 and ds.num_classes == 3 and ds.classes == ("a", "b", "c")


def test_subset_copies_in_order():
    ds = ImageTensorDataset(_images(6), torch.arange(6) % 3, ["a", "b", "c"])
    sub = ds.subset([4, 1, 1])
    assert torch.equal(sub.images, ds.images[[4, 1, 1]]) and sub.labels.tolist() == [1, 1, 1]
    sub.images.zero_()
    assert ds.images[4].any(), "subset must not share storage with its parent"
    with pytest.raises(IndexError, match=r"\[0, 5\].*got values in \[0, 6\]"):
        ds.subset([0, 6])


@pytest.mark.parametrize("images, labels, classes, error, match", [
    (np.zeros((2, 3, 4, 4), np.uint8), torch.zeros(2, dtype=torch.int64), ["a"], TypeError, "torch.Tensor"),
    (torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64), ["a"], TypeError, "torch.uint8.*float32"),
    (torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ["a"], ValueError,
     r"\(N, C, H, W\), got shape \(3, 4, 4\)"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32), ["a"], TypeError, "int64"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ["a"], ValueError,
     r"shape \(2,\).*got shape \(3,\)"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), ["a", "b"], ValueError,
     r"\[0, 1\].*got values in \[0, 2\]"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 0]), "ab", TypeError, "class-name strings"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 0]), [], ValueError, "at least one class"),
])
def test_dataset_rejects_bad_input(images, labels, classes, error, match):
    with pytest.raises(error, match=match):
        ImageTensorDataset(images, labels, classes)


# ------------------------------------------------------------------------------ CIFAR-10, torchvision layout

def _write_torchvision_layout(root: Path, per_batch: int = 4, n_test: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Fake cifar-10-batches-py/ with the real file names and format; returns (train, test) as (N, 3072)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5 * per_batch, 3072), dtype=np.uint8)
    for i in range(5):
        part = train[i * per_batch:(i + 1) * per_batch]
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": part, "labels": [(i * per_batch + j) % 10 for j in range(per_batch)],
                         "batch_label": f"training batch {i + 1} of 5"}, f, protocol=2)
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test, "labels": [9 - j % 10 for j in range(n_test)]}, f)
    return train, test


@pytest.mark.parametrize("use_subfolder", [False, True])
def test_cifar10_torchvision_layout(tmp_path, use_subfolder):
    train_raw, test_raw = _write_torchvision_layout(tmp_path)
    root = tmp_path / "cifar-10-batches-py" if use_subfolder else tmp_path
    train = load_dataset("cifar10", root, split="train")
    assert len(train) == 20 and train.classes == CIFAR10_CLASSES
    assert torch.equal(train.images, torch.from_numpy(train_raw.reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == [j % 10 for j in range(20)]
    test = load_dataset("cifar10", root, split="test")
    assert torch.equal(test.images, torch.from_numpy(test_raw.reshape(-1, 3, 32, 32)))
    assert test.labels.tolist() == [9, 8, 7, 6, 5, 4]
    lossless = load_dataset("cifar10", root, split="test-lossless")
    assert torch.equal(lossless.images, test.images[:1000])


def test_cifar10_torchvision_layout_refuses_code_in_pickle(tmp_path):
    _write_torchvision_layout(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Payload(), "labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*system"):
        load_dataset("cifar10", tmp_path, split="test")


def test_cifar10_torchvision_layout_missing_batch(tmp_path):
    _write_torchvision_layout(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.*download=True"):
        load_dataset("cifar10", tmp_path, split="train")


# ------------------------------------------------------------------------------------ CIFAR-10, npz layout

def _write_npz_layout(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for name, n, xk, yk in (("cifar10_train_0", 5, "x_train", "y_train"), ("cifar10_train_1", 3, "x_train", "y_train"),
                            ("cifar10_test", 7, "x_test", "y_test"),
                            ("cifar10_test_lossless_first1000", 4, "x_test", "y_test")):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.int64)
        np.savez(folder / f"{name}.npz", **{xk: x, yk: y})
        arrays[name] = (x, y)
    return arrays


@pytest.mark.parametrize("point_at", ["parent", "cifar10"])
def test_cifar10_npz_layout(tmp_path, point_at, caplog):
    arrays = _write_npz_layout(tmp_path / "cifar10")
    root = tmp_path if point_at == "parent" else tmp_path / "cifar10"
    train = load_dataset("cifar10", root, split="train")
    x = np.concatenate([arrays["cifar10_train_0"][0], arrays["cifar10_train_1"][0]])
    assert train.images.shape == (8, 3, 32, 32)
    # HWC on disk -> CHW in memory: pixel (n, h, w, c) lands at (n, c, h, w)
    assert torch.equal(train.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert train.labels.tolist() == arrays["cifar10_train_0"][1].tolist() + arrays["cifar10_train_1"][1].tolist()

    with caplog.at_level(logging.WARNING, logger="guard.data"):
        lossless = load_dataset("cifar10", root, split="test-lossless")
    assert not caplog.records and len(lossless) == 4
    exact = torch.from_numpy(arrays["cifar10_test_lossless_first1000"][0]).permute(0, 3, 1, 2)
    assert torch.equal(lossless.images, exact)

    with caplog.at_level(logging.WARNING, logger="guard.data"):
        lossy = load_dataset("cifar10", root, split="test")
    assert len(lossy) == 7
    assert any("JPEG" in r.getMessage() and "test-lossless" in r.getMessage() for r in caplog.records)


def test_cifar10_npz_missing_split_file_is_not_replaced(tmp_path):
    _write_npz_layout(tmp_path / "cifar10")
    (tmp_path / "cifar10" / "cifar10_test_lossless_first1000.npz").unlink()
    with pytest.raises(FileNotFoundError, match="cifar10_test_lossless_first1000.npz"):
        load_dataset("cifar10", tmp_path, split="test-lossless")


def test_cifar10_npz_wrong_contents(tmp_path):
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "cifar10_test.npz", x_test=np.zeros((2, 3, 32, 32), np.uint8),
             y_test=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\), got uint8 \(2, 3, 32, 32\)"):
        load_dataset("cifar10", tmp_path, split="test")


def test_cifar10_resized(tmp_path):
    arrays = _write_npz_layout(tmp_path / "cifar10")
    x = arrays["cifar10_test_lossless_first1000"][0].copy()
    x[0] = 77  # a constant image stays constant under resizing
    np.savez(tmp_path / "cifar10" / "cifar10_test_lossless_first1000.npz", x_test=x,
             y_test=arrays["cifar10_test_lossless_first1000"][1])
    ds = load_dataset("cifar10", tmp_path, split="test-lossless", image_size=16)
    assert ds.images.shape == (4, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert (ds.images[0] == 77).all()


def test_cifar10_missing_everywhere(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", tmp_path / "nothing", split="train")
    message = str(info.value)
    for expected in ("cifar-10-batches-py", str(tmp_path / "nothing" / "cifar10"), "download=True", *REMEDIES):
        assert expected in message
    assert isinstance(info.value, FileNotFoundError) and "\n" not in message


@pytest.fixture
def offline(monkeypatch):
    """torchvision's CIFAR-10 download pointed at a closed loopback port: the URLError of a machine without
    network, whether or not this one has it."""
    import torchvision

    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    url = f"http://127.0.0.1:{free_ports(1)[0]}/cifar-10-python.tar.gz"
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", url)
    return url


def test_failed_download_says_where_it_looked_and_how_to_provide_the_data(tmp_path, offline):
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("cifar10", tmp_path / "fresh", split="train", download=True)
    message = str(info.value)
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert "downloading it failed (URLError" in message and str(tmp_path / "fresh" / "cifar-10-batches-py") in message
    assert all(remedy in message for remedy in REMEDIES) and "\n" not in message


def test_cli_without_data_exits_2_with_the_data_error(tmp_path, capsys):
    missing = tmp_path / "missing"
    code = main(["train", "--model", "tiny_resnet", "--dataset", "cifar10", "--data-dir", str(missing),
                 "--epochs", "1", "--out", str(tmp_path / "model.pt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("guard train: error: CIFAR-10 not found: ") and str(missing / "cifar10") in err
    assert all(remedy in err for remedy in REMEDIES)
    assert not (tmp_path / "model.pt").exists()


def test_serve_without_data_or_network_exits_2_before_starting_a_server(tmp_path, capsys, offline):
    """The demo archive needs the pretrained ResNet-20 or CIFAR-10 (downloaded when missing): with neither, a
    one-line error naming both places, not a traceback."""
    root = tmp_path / "data"
    code = main(["serve", "--model-store", str(tmp_path / "store"), "--run-dir", str(tmp_path / "run"),
                 "--data-dir", str(root), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert str(root / "weights" / "resnet20-12fca82f.th") in err and str(root / "cifar-10-batches-py") in err
    assert "URLError" in err and all(remedy in err for remedy in REMEDIES)
    assert not list((tmp_path / "store").glob("*.mar")) and not (tmp_path / "run" / "server.json").exists()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"name": "mnist"}, ValueError, "unknown dataset 'mnist'.*cifar10"),
    ({"name": "cifar10", "split": "val"}, ValueError, "split must be one of.*test-lossless.*got 'val'"),
    ({"name": "cifar10", "split": 1}, TypeError, "split must be a str"),
    ({"name": "cifar10", "image_size": 0}, ValueError, "image_size must be a positive int"),
    ({"name": "svhn", "split": "valid"}, ValueError, "svhn split"),
    ({"name": "gtsrb", "split": "extra"}, ValueError, "gtsrb split"),
])
def test_load_dataset_rejects_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_dataset(root=tmp_path, **kwargs)


def test_datasets_listed():
    assert set(DATASETS) == {"cifar10", "svhn", "gtsrb", "imagefolder"}


# ---------------------------------------------------------------------------- torchvision-backed datasets

def test_imagefolder(tmp_path):
    colors = {"cats": (200, 10, 10), "dogs": (10, 10, 200)}
    for cls, color in colors.items():
        (tmp_path / cls).mkdir()
        for i, size in enumerate(((20, 12), (9, 9))):
            Image.new("RGB" if i else "L", size, color if i else 90).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset("imagefolder", tmp_path, image_size=8)
    assert ds.classes == ("cats", "dogs") and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images.shape == (4, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert (ds.images[0] == 90).all(), "grayscale images are converted to RGB"
    assert ds.images[1, :, 4, 4].tolist() == [200, 10, 10]
    assert ds.images[3, :, 4, 4].tolist() == [10, 10, 200]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset("imagefolder", tmp_path / "missing")
    with pytest.raises(ValueError, match="pass the folder of the split"):
        load_dataset("imagefolder", tmp_path, split="test")


@pytest.mark.parametrize("name, where", [("svhn", "svhn"), ("gtsrb", "gtsrb")])
def test_torchvision_sets_missing(tmp_path, name, where):
    with pytest.raises(DataNotFoundError, match=f"{where}.*download=True") as info:
        load_dataset(name, tmp_path, split="test")
    assert all(remedy in str(info.value) for remedy in REMEDIES)


def test_svhn_without_scipy_names_the_extra_before_reading(tmp_path, monkeypatch):
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").touch()
    monkeypatch.setitem(sys.modules, "scipy", None)  # what an install without guard[svhn] sees
    with pytest.raises(MissingExtraError, match=r"pip install 'guard\[svhn\]'"):
        load_dataset("svhn", tmp_path, split="test")


# ------------------------------------------------------------------------------------------- real CIFAR-10

def test_real_cifar10(data_root):
    """The shared npz copy: sizes, the canonical first labels and the published channel statistics."""
    train = load_dataset("cifar10", data_root, split="train")
    assert train.images.shape == (50000, 3, 32, 32)
    assert train.labels[:5].tolist() == [6, 9, 9, 4, 1]  # frog, truck, truck, deer, automobile
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    sums = sum(chunk.sum(dim=(0, 2, 3), dtype=torch.float64) for chunk in train.images.split(5000))
    mean = sums / (50000 * 32 * 32 * 255)
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64), atol=1e-3)
    lossless = load_dataset("cifar10", data_root, split="test-lossless")
    assert len(lossless) == 1000 and lossless.labels[:4].tolist() == [3, 8, 8, 0]  # cat, ship, ship, airplane


# ---------------------------------------------------------------------------------------- augmentation

def test_random_crop_flip_is_a_padded_crop_with_optional_flip(generator):
    images = _images(64)
    out = random_crop_flip(images, generator, padding=2)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    seen = set()
    for i in range(len(images)):
        matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert matches, f"image {i} is not a crop of its padded original"
        seen.update(matches)
    assert len({m[2] for m in seen}) == 2 and len({m[:2] for m in seen}) > 10, "offsets and flips must vary"


def test_random_crop_flip_deterministic_and_global_rng_untouched():
    images = _images(32).float() / 255
    state = torch.get_rng_state()
    a = random_crop_flip(images, torch.Generator().manual_seed(5))
    b = random_crop_flip(images, torch.Generator().manual_seed(5))
    c = random_crop_flip(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)
    # uint8 and float batches get the same crops from the same draws
    u = random_crop_flip(_images(32), torch.Generator().manual_seed(5))
    assert torch.equal(u.float() / 255, a)


def test_random_crop_flip_identity_without_padding_or_flip(generator):
    images = _images(4)
    assert torch.equal(random_crop_flip(images, generator, padding=0, flip=False), images)


@pytest.mark.parametrize("args, error, match", [
    ((torch.zeros(3, 8, 8),), ValueError, r"\(N, C, H, W\), got \(3, 8, 8\)"),
    ((torch.zeros(1, 3, 8, 8), 0), TypeError, "torch.Generator, got int"),
])
def test_random_crop_flip_rejects_bad_input(args, error, match):
    args = args if len(args) == 2 else (*args, torch.Generator())
    with pytest.raises(error, match=match):
        random_crop_flip(*args)


def _smooth(n: int, size: int = 16) -> torch.Tensor:
    """Images JPEG can keep close at high quality: smooth colour ramps with a little texture."""
    ramp = torch.linspace(0, 1, size)
    base = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        (ramp[None, :] + ramp[:, None]) / 2])
    shift = torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    return ((base * 0.6 + shift * 0.4) * 255).round().to(torch.uint8)


def test_jpeg_roundtrip_is_what_pil_decodes():
    images = _smooth(6)
    out = jpeg_roundtrip(images, 75)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for image, decoded in zip(images, out):
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=75)
        assert torch.equal(decoded, torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1))
    # float images in [0, 1] take the same 8-bit path and come back as floats
    assert torch.equal(jpeg_roundtrip(images.float() / 255, 75), out.float() / 255)
    # lower quality loses more; one quality per image
    error = [(jpeg_roundtrip(images, q).float() - images.float()).abs().mean() for q in (95, 50, 10)]
    assert error[0] < error[1] < error[2] and error[0] < 2
    per_image = jpeg_roundtrip(images, [95, 10] * 3)
    assert torch.equal(per_image[0], jpeg_roundtrip(images[:1], 95)[0])
    assert torch.equal(per_image[1], jpeg_roundtrip(images[1:2], 10)[0])


def test_random_jpeg_reencodes_a_fraction_reproducibly():
    images = _smooth(400, size=8)
    out = random_jpeg(images, torch.Generator().manual_seed(3), 0.5)
    changed = (out != images).flatten(1).any(1)
    assert 0.4 < changed.float().mean() < 0.6
    assert torch.equal(out, random_jpeg(images, torch.Generator().manual_seed(3), 0.5))
    assert torch.equal(random_jpeg(images, torch.Generator().manual_seed(3), 0.0), images)
    every = random_jpeg(images[:20], torch.Generator().manual_seed(3), 1.0, quality=(90, 90))
    assert torch.equal(every, jpeg_roundtrip(images[:20], 90))
    # the generator advances the same way whatever was picked, so later draws do not depend on p
    g0, g1 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    random_jpeg(images, g0, 0.0)
    random_jpeg(images, g1, 1.0)
    assert torch.equal(g0.get_state(), g1.get_state())


@pytest.mark.parametrize("call, match", [
    (lambda: jpeg_roundtrip(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 75), r"RGB images .* got \(2, 1, 8, 8\)"),
    (lambda: jpeg_roundtrip(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [75]), r"one per image, got \[75\] for 2"),
    (lambda: jpeg_roundtrip(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0), r"\[1, 100\]"),
    (lambda: random_jpeg(torch.zeros(1, 3, 8, 8), torch.Generator(), 1.5), r"probability in \[0, 1\], got 1.5"),
    (lambda: random_jpeg(torch.zeros(1, 3, 8, 8), torch.Generator(), 0.5, (80, 40)),
     r"quality must be a pair .* got \(80, 40\)"),
])
def test_jpeg_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
