"""CIFAR data for the training CLI: the python-pickle archives, synthetic CIFAR-shaped
data, the train/validation split, per-channel normalisation and batched augmentation.

Nothing is downloaded. CIFAR-10 is read from ``cifar-10-python.tar.gz`` or its extracted
folder ``cifar-10-batches-py/`` (``data_batch_1`` ... ``data_batch_5``, ``test_batch``);
CIFAR-100 from ``cifar-100-python.tar.gz`` or ``cifar-100-python/`` (``train``,
``test``, ``meta``; labels ``fine_labels``). Every batch file is a pickled dict with
``b'data'``: uint8 [N, 3072] (1024 red, 1024 green, 1024 blue values per image, rows in
order) and the labels. The pickles are read with a restricted unpickler that only
rebuilds plain containers and numpy arrays, so a tampered archive cannot run code.

Images stay uint8 [N, 3, 32, 32] in memory (150 MB for CIFAR's 60k images) and are
augmented a whole batch at a time on the training device (:class:`Augmenter`): 4-pixel
zero padding + random 32x32 crop and a horizontal flip with probability 1/2, the random
numbers drawn on the host from a seeded ``torch.Generator`` (saved in checkpoints).
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["DatasetError", "CifarData", "load_cifar", "synthetic_cifar", "split_train_val",
           "channel_stats", "Augmenter", "normalize", "DATASETS", "SYNTHETIC_SEED",
           "CIFAR_URL"]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
SYNTHETIC_SEED = 0  # synthetic data do not depend on --seed: runs differ in training only


@dataclass(frozen=True)
class _Layout:
    name: str
    archive: str
    folder: str
    train_files: tuple
    test_file: str
    label_key: bytes
    num_classes: int


DATASETS = {
    "cifar10": _Layout("CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                       b"labels", 10),
    "cifar100": _Layout("CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python",
                        ("train",), "test", b"fine_labels", 100),
}


class DatasetError(RuntimeError):
    """The dataset is missing or unreadable; the message says what to put where."""


@dataclass
class CifarData:
    """uint8 images [N, 3, 32, 32] and int64 labels [N] of the train and test sets."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    source: str


# --- the pickle archive -----------------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how python 3 pickles (protocol < 3) write bytes
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy 2's numpy.core deprecation shim
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch file")


def _unpickle(raw: bytes) -> dict:
    obj = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"batch file holds a {type(obj).__name__}, not a dict")
    # python-3 written files (e.g. made by tests) may use str keys
    return {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}


def _to_tensors(batch: dict, label_key: bytes, num_classes: int, what: str):
    import numpy as np

    if b"data" not in batch or label_key not in batch:
        raise ValueError(f"{what}: expected keys b'data' and {label_key!r}, "
                         f"found {sorted(batch)}")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{what}: b'data' must be uint8 [N, 3072], got {data.dtype} "
                         f"{list(data.shape)}")
    labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"{what}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what}: labels outside 0..{num_classes - 1}")
    x = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, 3, 32, 32)
    return x, torch.from_numpy(labels)


def _find_source(data_dir: Path, layout: _Layout) -> Path:
    """The extracted folder or the archive of ``layout`` in ``data_dir``."""
    candidates = [data_dir / layout.folder, data_dir / layout.archive]
    if (data_dir / layout.test_file).is_file():  # --data-dir is the extracted folder itself
        candidates.insert(0, data_dir)
    dirs = [c for c in candidates if c.is_dir()]
    for c in dirs:  # a complete extracted folder first
        if all((c / n).is_file() for n in layout.train_files + (layout.test_file,)):
            return c
    for c in candidates:  # then the archive
        if c.is_file():
            return c
    if dirs:  # an incomplete folder: reading it says what is missing
        return dirs[0]
    raise DatasetError(_missing_message(data_dir, layout))


def _missing_message(data_dir: Path, layout: _Layout) -> str:
    files = ", ".join(layout.train_files + (layout.test_file,))
    return (f"{layout.name} not found in --data-dir {data_dir}: put the python version of "
            f"{layout.name}, the archive {layout.archive} (from {CIFAR_URL}), or the folder "
            f"{layout.folder}/ it extracts to (holding {files}), into {data_dir}. "
            "Nothing is downloaded. Leave out --data-dir to train on synthetic "
            "CIFAR-shaped data instead.")


def _corrupt_message(src: Path, layout: _Layout, why: str) -> str:
    return (f"cannot read {layout.name} from {src}: {why}. The file looks truncated or "
            f"corrupt; replace it with a fresh copy of {layout.archive} (from {CIFAR_URL}) "
            f"or its extracted folder {layout.folder}/ in {src.parent}.")


def _read_members(src: Path, layout: _Layout) -> dict[str, bytes]:
    names = layout.train_files + (layout.test_file,)
    if src.is_dir():
        out = {}
        for n in names:
            p = src / n
            if not p.is_file():
                raise DatasetError(f"{layout.name} folder {src} lacks {n}: it must hold "
                                   f"{', '.join(names)} (extract {layout.archive} from "
                                   f"{CIFAR_URL} into {src.parent})")
            out[n] = p.read_bytes()
        return out
    out = {}
    with tarfile.open(src, mode="r:*") as tar:
        members = {}
        for m in tar:  # reads the whole archive: truncation shows up here
            base = m.name.rstrip("/")
            if m.isfile() and os.path.dirname(base).rpartition("/")[2] == layout.folder \
                    and os.path.basename(base) in names:
                members[os.path.basename(base)] = m
        missing = [n for n in names if n not in members]
        if missing:
            raise DatasetError(f"{src} is a tar archive but not {layout.name}'s: it lacks "
                               f"{layout.folder}/{', '.join(missing)}. Put {layout.archive} "
                               f"from {CIFAR_URL} there.")
        for n, m in members.items():
            f = tar.extractfile(m)
            out[n] = f.read()
            if len(out[n]) != m.size:
                raise EOFError(f"{m.name}: {len(out[n])} of {m.size} bytes")
    return out


def load_cifar(data_dir, dataset: str = "cifar10") -> CifarData:
    """Read CIFAR-10/100 from ``data_dir`` (archive or extracted folder), never downloading.

    Raises :class:`DatasetError` with what to put where when the data are missing, and
    when the archive is truncated or corrupt.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {sorted(DATASETS)}")
    layout = DATASETS[dataset]
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DatasetError(f"--data-dir {data_dir} is not a directory. "
                           + _missing_message(data_dir, layout))
    src = _find_source(data_dir, layout)
    try:
        raw = _read_members(src, layout)
        parts = {n: _to_tensors(_unpickle(b), layout.label_key, layout.num_classes,
                                f"{src}:{n}") for n, b in raw.items()}
    except DatasetError:
        raise
    except ImportError as e:
        raise DatasetError(f"reading the CIFAR pickle files needs numpy ({e}); "
                           "pip install numpy") from e
    except (tarfile.TarError, EOFError, zlib.error, OSError, pickle.UnpicklingError,
            ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise DatasetError(_corrupt_message(src, layout, f"{type(e).__name__}: {e}")) from e
    xs = [parts[n][0] for n in layout.train_files]
    ys = [parts[n][1] for n in layout.train_files]
    tx, ty = parts[layout.test_file]
    return CifarData(torch.cat(xs), torch.cat(ys), tx, ty, layout.num_classes, str(src))


# --- synthetic data -----------------------------------------------------------------------

def synthetic_cifar(size: int, num_classes: int = 10, test_size: int | None = None,
                    seed: int = SYNTHETIC_SEED) -> CifarData:
    """CIFAR-shaped uint8 data: ``size`` training and ``test_size`` (default size // 5,
    at least 1) test images.

    Each class has a fixed random low-frequency colour pattern; an image is its class's
    pattern plus noise, so the task is learnable (losses fall) but not trivial. Made
    from ``seed`` alone, the same on every rank and every run.
    """
    if size < 1:
        raise ValueError(f"synthetic size must be >= 1, got {size}")
    test_size = max(1, size // 5) if test_size is None else test_size
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((num_classes, 3, 4, 4), generator=g) * 160 + 48
    templates = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear",
                                                align_corners=False)

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = torch.empty((n, 3, 32, 32), dtype=torch.uint8)
        for s in range(0, n, 4096):  # chunks keep the float temporaries small
            e = min(n, s + 4096)
            noise = torch.randn((e - s, 3, 32, 32), generator=g) * 48
            x[s:e] = (templates[y[s:e]] + noise).clamp_(0, 255).to(torch.uint8)
        return x, y

    train_x, train_y = make(size)
    test_x, test_y = make(test_size)
    return CifarData(train_x, train_y, test_x, test_y, num_classes,
                     f"synthetic ({size} train + {test_size} test images, seed {seed})")


# --- split, normalisation, augmentation ----------------------------------------------------

def split_train_val(x: torch.Tensor, y: torch.Tensor, val_size: int):
    """The last ``val_size`` images are the validation set (CIFAR's batches are already
    shuffled), the rest the training set."""
    n = x.shape[0]
    if not 0 <= val_size < n:
        raise ValueError(f"--val-size must be in [0, {n - 1}] for {n} training images, "
                         f"got {val_size}")
    k = n - val_size
    return (x[:k], y[:k]), (x[k:], y[k:])


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images, on the 0..1 scale."""
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    for i in range(0, x.shape[0], 4096):
        c = x[i:i + 4096].to(torch.float64).div_(255)
        s += c.sum(dim=(0, 2, 3))
        s2 += c.square().sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def normalize(x_u8: torch.Tensor, mean, std, dtype=torch.float32,
              memory_format=torch.contiguous_format) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> (x / 255 - mean) / std in ``dtype``."""
    m = torch.tensor(mean, dtype=dtype, device=x_u8.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=x_u8.device).view(1, 3, 1, 1)
    x = x_u8.to(dtype).div_(255).sub_(m).div_(s)
    return x.contiguous(memory_format=memory_format)


class Augmenter:
    """4-pixel zero padding + random 32x32 crop and random horizontal flip, batched.

    The offsets and flips of a batch are drawn on the host from ``generator`` (three
    small draws per batch, no device sync) and applied on the batch's device with one
    gather, so the whole batch is augmented at once.
    """

    def __init__(self, generator: torch.Generator, pad: int = 4, flip: bool = True):
        self.generator = generator
        self.pad = int(pad)
        self.flip = bool(flip)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.pad
        dy = torch.randint(0, 2 * p + 1, (b,), generator=self.generator)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=self.generator)
        flip = (torch.rand((b,), generator=self.generator) < 0.5) if self.flip else \
            torch.zeros(b, dtype=torch.bool)
        dev = x.device
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        rows = (dy.view(b, 1) + torch.arange(h)).to(dev)                 # [B, H]
        cols = dx.view(b, 1) + torch.arange(w)                           # [B, W]
        cols = torch.where(flip.view(b, 1), cols.flip(1), cols).to(dev)  # flipped: read backwards
        bi = torch.arange(b, device=dev).view(b, 1, 1)
        out = padded.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)]  # [B,H,W,C]
        return out.permute(0, 3, 1, 2).contiguous()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
