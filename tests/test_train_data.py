"""sdkernels.train.data: the CIFAR python-pickle loader, synthetic data, augmentation."""
from __future__ import annotations

import io
import pickle
import tarfile

import pytest
import torch

np = pytest.importorskip("numpy")

from sdkernels.train import data as D  # noqa: E402


def _batch(n: int, offset: int, label_key=b"labels", num_classes=10, protocol=2) -> tuple:
    """A CIFAR batch file as the python version stores it, and the images it encodes.

    Image i has value (offset + i + 7 c + 3 h + 5 w) mod 256 at channel c, row h, column w;
    b'data' rows hold the 1024 red, then green, then blue values in row-major order.
    """
    i = np.arange(n).reshape(n, 1, 1, 1)
    c = np.arange(3).reshape(1, 3, 1, 1)
    h = np.arange(32).reshape(1, 1, 32, 1)
    w = np.arange(32).reshape(1, 1, 1, 32)
    img = ((offset + i + 7 * c + 3 * h + 5 * w) % 256).astype(np.uint8)
    labels = [(offset + k) % num_classes for k in range(n)]
    d = {b"batch_label": b"training batch", label_key: labels,
         b"data": img.reshape(n, 3072), b"filenames": [b"x.png"] * n}
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = [l % 20 for l in labels]
    return pickle.dumps(d, protocol=protocol), img, labels


def _write_cifar10(root, sizes=(3, 4, 2, 5, 1), test=6, archive=True, protocol=2):
    files, imgs, labels = {}, [], []
    off = 0
    for k, n in enumerate(sizes, start=1):
        raw, img, lab = _batch(n, off, protocol=protocol)
        files[f"data_batch_{k}"] = raw
        imgs.append(img)
        labels += lab
        off += 40
    raw, test_img, test_lab = _batch(test, 200, protocol=protocol)
    files["test_batch"] = raw
    files["batches.meta"] = pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]})
    if archive:
        path = root / "cifar-10-python.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name, raw in files.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        path = root / "cifar-10-batches-py"
        path.mkdir()
        for name, raw in files.items():
            (path / name).write_bytes(raw)
    return path, np.concatenate(imgs), labels, test_img, test_lab


@pytest.mark.parametrize("archive", [True, False], ids=["tar.gz", "extracted"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_archive_images_and_labels(tmp_path, archive, protocol):
    _, imgs, labels, test_img, test_lab = _write_cifar10(tmp_path, archive=archive,
                                                         protocol=protocol)
    d = D.load_cifar(tmp_path, "cifar10")
    assert d.num_classes == 10
    assert d.train_x.dtype == torch.uint8 and d.train_x.shape == (15, 3, 32, 32)
    assert torch.equal(d.train_x, torch.from_numpy(imgs))
    assert d.train_y.tolist() == labels
    assert torch.equal(d.test_x, torch.from_numpy(test_img))
    assert d.test_y.tolist() == test_lab
    # spot-check the pixel layout against the formula, independently of the helper
    assert int(d.train_x[4, 2, 10, 3]) == (40 + 1 + 14 + 30 + 15) % 256  # batch 2, image 1


def test_data_dir_may_be_the_extracted_folder(tmp_path):
    folder, imgs, *_ = _write_cifar10(tmp_path, archive=False)
    d = D.load_cifar(folder, "cifar10")
    assert torch.equal(d.train_x, torch.from_numpy(imgs))


def test_cifar100_fine_labels(tmp_path):
    raw_tr, img_tr, lab_tr = _batch(7, 0, b"fine_labels", 100)
    raw_te, img_te, lab_te = _batch(3, 90, b"fine_labels", 100)
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        for name, raw in (("train", raw_tr), ("test", raw_te), ("meta", pickle.dumps({}))):
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    d = D.load_cifar(tmp_path, "cifar100")
    assert d.num_classes == 100
    assert torch.equal(d.train_x, torch.from_numpy(img_tr)) and d.train_y.tolist() == lab_tr
    assert torch.equal(d.test_x, torch.from_numpy(img_te)) and d.test_y.tolist() == lab_te


def test_truncated_archive_gets_a_clear_error(tmp_path):
    path, *_ = _write_cifar10(tmp_path, sizes=(50, 50, 50, 50, 50), test=50)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.DatasetError) as e:
        D.load_cifar(tmp_path, "cifar10")
    msg = str(e.value)
    assert "truncated or corrupt" in msg and "cifar-10-python.tar.gz" in msg
    assert str(path) in msg and "cifar-10-batches-py" in msg


def test_corrupt_pickle_gets_a_clear_error(tmp_path):
    folder, *_ = _write_cifar10(tmp_path, archive=False)
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[:100])
    with pytest.raises(D.DatasetError, match="truncated or corrupt"):
        D.load_cifar(tmp_path, "cifar10")


def test_pickle_that_would_run_code_is_refused(tmp_path):
    folder, *_ = _write_cifar10(tmp_path, archive=False)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(D.DatasetError, match="unexpected object builtins.print"):
        D.load_cifar(tmp_path, "cifar10")


def test_missing_data_says_what_to_put_where(tmp_path):
    with pytest.raises(D.DatasetError) as e:
        D.load_cifar(tmp_path, "cifar10")
    msg = str(e.value)
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py" in msg
    assert str(tmp_path) in msg and "Nothing is downloaded" in msg
    with pytest.raises(D.DatasetError, match="cifar-100-python.tar.gz"):
        D.load_cifar(tmp_path, "cifar100")
    with pytest.raises(D.DatasetError, match="not a directory"):
        D.load_cifar(tmp_path / "nope", "cifar10")


def test_incomplete_extracted_folder_names_the_missing_file(tmp_path):
    folder, *_ = _write_cifar10(tmp_path, archive=False)
    (folder / "data_batch_5").unlink()
    with pytest.raises(D.DatasetError, match="lacks data_batch_5"):
        D.load_cifar(tmp_path, "cifar10")


def test_wrong_tar_archive(tmp_path):
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("something/else")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(D.DatasetError, match="lacks cifar-10-batches-py/"):
        D.load_cifar(tmp_path, "cifar10")


def test_synthetic_data_and_split():
    d = D.synthetic_cifar(100, 10)
    assert d.train_x.shape == (100, 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (20, 3, 32, 32)
    assert int(d.train_y.min()) >= 0 and int(d.train_y.max()) < 10
    again = D.synthetic_cifar(100, 10)
    assert torch.equal(d.train_x, again.train_x) and torch.equal(d.train_y, again.train_y)
    (tx, ty), (vx, vy) = D.split_train_val(d.train_x, d.train_y, 10)
    assert tx.shape[0] == 90 and vx.shape[0] == 10 and torch.equal(vx, d.train_x[90:])
    with pytest.raises(ValueError, match="--val-size"):
        D.split_train_val(d.train_x, d.train_y, 100)


def test_channel_stats_and_normalize():
    x = torch.randint(0, 256, (17, 3, 32, 32), dtype=torch.uint8)
    mean, std = D.channel_stats(x)
    f = x.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), f.mean(dim=(0, 2, 3)))
    assert torch.allclose(torch.tensor(std, dtype=torch.float64),
                          f.std(dim=(0, 2, 3), unbiased=False))
    z = D.normalize(x, mean, std)
    assert z.dtype == torch.float32
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_augmenter_is_pad_crop_flip_per_image():
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    aug = D.Augmenter(torch.Generator().manual_seed(5))
    state = aug.state_dict()
    out = aug(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    # replay the draws and build every image the slow way
    g = torch.Generator()
    g.set_state(state["generator"])
    dy = torch.randint(0, 9, (64,), generator=g)
    dx = torch.randint(0, 9, (64,), generator=g)
    flip = torch.rand((64,), generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(64):
        ref = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        if flip[i]:
            ref = ref.flip(-1)
            flips += 1
        assert torch.equal(out[i], ref), i
    assert 0 < flips < 64
    assert (out == 0).any()  # some zero padding shows
    # restoring the state replays the same augmentation
    aug.load_state_dict(state)
    assert torch.equal(aug(x), out)
