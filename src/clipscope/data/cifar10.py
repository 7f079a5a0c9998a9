"""CIFAR-10 from the official python-pickle directory, and its augmentation and normalization.

The directory ``cifar-10-batches-py`` (as unpacked from ``cifar-10-python.tar.gz``)
holds ``data_batch_1`` … ``data_batch_5`` (50,000 training images) and
``test_batch`` (10,000): each a pickled dict with ``b'data'`` (uint8 array of
shape (n, 3072), channel-major R, G, B planes of 32×32) and ``b'labels'``
(n ints in 0..9). Nothing is downloaded.

The pickles are read with a restricted unpickler that only rebuilds numpy
arrays and plain containers, so a foreign file cannot run code.

Conventions that change a component's gradient (recorded by
:meth:`Cifar10Transform.describe`):

* training batches use :func:`augment` (random crop of the image padded by 4
  zeros, then horizontal flip with probability 1/2), drawn from an explicit
  ``torch.Generator``;
* probes use **no augmentation**: a component ``f_i`` must be the same
  function at every evaluation, so the probe sees the un-augmented images;
* :func:`normalize` maps uint8 to float32 ``(x/255 − mean)/std`` per channel
  with the constants of the reference training script (kuangliu/pytorch-cifar):
  mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010). (The true
  per-pixel std of the training set is about (0.2470, 0.2435, 0.2616); pass
  ``std=`` to use it.)
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Cifar10Transform",
    "augment",
    "find_cifar10_dir",
    "load_cifar10",
    "normalize",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
DIR_NAME = "cifar-10-batches-py"


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and builtin containers, nothing else."""

    _NUMPY = frozenset({"_reconstruct", "_frombuffer", "ndarray", "dtype", "scalar"})

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "numpy" and name in self._NUMPY:
            if name in ("ndarray", "dtype"):
                return getattr(np, name)
            core = getattr(np, "_core", None) or np.core
            home = core.numeric if name == "_frombuffer" else core.multiarray
            return getattr(home, name)
        if module in ("copyreg", "_codecs") and name in ("_reconstructor", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 pickle")


def find_cifar10_dir(data_dir: str | Path) -> Path:
    """Return ``data_dir`` or its ``cifar-10-batches-py`` sub-folder, the one with the batches."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 data directory {str(root)!r} does not exist")
    for cand in (root, root / DIR_NAME):
        if (cand / TEST_FILES[0]).is_file() or (cand / TRAIN_FILES[0]).is_file():
            return cand
    raise FileNotFoundError(
        f"no CIFAR-10 batches in {str(root)!r}: expected {DIR_NAME}/ with "
        f"{', '.join(TRAIN_FILES + TEST_FILES)} (the python version of CIFAR-10)"
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as fh:
        try:
            obj = _ArrayUnpickler(fh, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ValueError(f"{path}: not a CIFAR-10 python pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in ("data", "labels") if k not in obj]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; has {sorted(map(str, obj))}")
    data = np.asarray(obj["data"])
    labels = np.asarray(obj["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: data must be uint8 of shape (n, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: need {data.shape[0]} integer labels, got {labels.shape} {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data, labels


def load_cifar10(data_dir: str | Path, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10 images and labels from the python-pickle batches.

    Parameters
    ----------
    data_dir : path
        ``cifar-10-batches-py`` itself or a folder that contains it.
    train : bool
        ``data_batch_1..5`` in that order (50,000 images) or ``test_batch`` (10,000).

    Returns
    -------
    images : torch.Tensor
        uint8, shape (N, 3, 32, 32), un-normalized.
    labels : torch.Tensor
        int64, shape (N,).

    Raises
    ------
    FileNotFoundError
        naming the directory and every missing batch file.
    ValueError
        when a file is not a CIFAR-10 batch (wrong keys, shapes, dtypes, labels).
    """
    root = find_cifar10_dir(data_dir)
    names = TRAIN_FILES if train else TEST_FILES
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 directory {str(root)!r} lacks {', '.join(missing)}")
    parts = [_read_batch(root / n) for n in names]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lab for _, lab in parts]).astype(np.int64)
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def augment(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded image, then horizontal flip with probability 1/2.

    For image ``n``: offsets ``a_n, b_n ~ U{0..2·padding}`` and a flip bit
    ``s_n ~ Bernoulli(1/2)``; the output is ``pad(x_n)[:, a_n:a_n+H, b_n:b_n+W]``,
    reversed along the width when ``s_n = 1``. Draw order from ``generator``:
    all row offsets, all column offsets, then all flip bits (so results depend
    only on the generator's state, not on the global RNG). Works on any dtype;
    the output has the dtype and device of ``x``.

    >>> g = torch.Generator().manual_seed(0)
    >>> augment(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), g).shape
    torch.Size([2, 3, 32, 32])
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (N, C, H, W) tensor, got {getattr(x, 'shape', x)!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    n, c, h, w = x.shape
    dev = generator.device
    rows0 = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    cols0 = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    flip = torch.rand(n, generator=generator, device=dev) < 0.5
    rows0, cols0, flip = rows0.to(x.device), cols0.to(x.device), flip.to(x.device)
    padded = torch.nn.functional.pad(x, (padding,) * 4) if padding else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = rows0[:, None] + ar_h  # (n, h)
    cols = cols0[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (n, w)
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(
    x: torch.Tensor,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
) -> torch.Tensor:
    """Return float32 ``(x/255 − mean_c)/std_c`` for uint8 ``x`` (float ``x``: taken as in [0, 1]).

    >>> normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)).flatten()
    tensor([2.5141, 2.5968, 2.7537])
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != len(mean):
        raise ValueError(f"x must be (N, {len(mean)}, H, W), got {getattr(x, 'shape', x)!r}")
    if len(std) != len(mean) or any(s <= 0 for s in std):
        raise ValueError(f"std must be {len(mean)} positive numbers, got {std!r}")
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (xf - m) / s


class Cifar10Transform:
    """Batch transform ``x -> normalize(augment(x))`` (or ``normalize(x)``) with a ``describe()``.

    Parameters
    ----------
    augment : bool
        Random crop (padding 4) + horizontal flip. Training batches only; a
        probe must use ``Cifar10Transform(augment=False)``.
    mean, std : tuple of float
        Normalization constants.
    """

    def __init__(
        self,
        augment: bool = True,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        padding: int = 4,
    ) -> None:
        self.augment = bool(augment)
        self.mean, self.std, self.padding = tuple(mean), tuple(std), padding

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform a uint8 batch; ``generator`` is required when augmenting."""
        if self.augment:
            if generator is None:
                raise TypeError("augmentation needs an explicit torch.Generator")
            x = augment(x, generator, self.padding)
        return normalize(x, self.mean, self.std)

    def describe(self) -> dict[str, Any]:
        """Return what this transform does to the inputs (recorded with a run)."""
        return {
            "dataset": "cifar10",
            "augmentation": (
                {"random_crop_padding": self.padding, "horizontal_flip_p": 0.5}
                if self.augment
                else None
            ),
            "normalization": {"scale": "x/255", "mean": list(self.mean), "std": list(self.std)},
        }
