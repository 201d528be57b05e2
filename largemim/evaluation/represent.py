"""Representation check: how linearly separable and how clustered an encoder's features are.

Features are the class token and the mean of the patch tokens after the final norm, concatenated.
Two read-outs on a labelled set: weighted cosine kNN (DINO's, k=20, T=0.07) and a linear probe
(multinomial logistic regression on standardised features, fitted full-batch with L-BFGS). MAE
features are known to be weak under kNN and much better under a linear probe, so both are reported.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import webdataset as wds

from largemim.data.augment import EvalTransform, image_bytes
from largemim.data.readers import open_shard
from largemim.data.sources import expand_shards
from largemim.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class LabelledSet:
    images: torch.Tensor  # (N, 3, H, W), normalised; fp16 (half the host memory on every rank, and its
    # rounding, ~1e-3, is far below the 8-bit source's step of ~0.02 after normalisation)
    labels: torch.Tensor  # (N,) int64


def load_labelled(pattern: str, max_samples: int, transform: EvalTransform, *, progress: bool = True) -> LabelledSet:
    """The first ``max_samples`` samples of the shards (in shard order): image + ``cls`` label. An
    undecodable image, a bad label or a damaged tar is skipped, counted and named in one warning.
    ``progress`` shows the decode on stderr (give it to one rank: every rank decodes the same images)."""
    images, labels = [], []
    skipped: list[str] = []

    def skip(exn: Exception) -> bool:  # webdataset's handler for a damaged tar: go on with the next one
        skipped.append(str(exn))
        return True

    samples = contextlib.closing(_samples(expand_shards(pattern), skip))  # the last reader ends with the loop
    with samples, progress_bar(total=max_samples, enabled=progress, desc=f"decoding {pattern}", unit="img") as bar:
        for sample in samples.thing:
            data, cls = image_bytes(sample), sample.get("cls")
            if data is None or cls is None:
                continue
            try:
                image, label = transform(data), int(cls)
            except Exception as exn:  # noqa: BLE001 - one bad sample must not stop the run's start-up
                skipped.append(f"{sample.get('__url__')}: sample {sample.get('__key__')!r}: {exn}")
                continue
            images.append(image.half())
            labels.append(label)
            bar.update(1)
            if len(images) >= max_samples:
                break
    if skipped:
        log.warning("%s: skipped %d unreadable sample(s) or shard(s), e.g. %s", pattern, len(skipped), skipped[0])
    if not images:
        raise ValueError(f"no labelled sample (an image and a .cls member) in {pattern!r}")
    return LabelledSet(torch.stack(images), torch.tensor(labels))


def _samples(urls: list[str], skip: Callable[[Exception], bool]) -> Iterator[dict]:
    """The shards' samples in order, each shard read as the training shards are (:func:`open_shard`:
    ``s3://``, ``gs://``, curl, ``pipe:``, with the step signals shielded); a shard that cannot be read
    is passed to ``skip`` and the next one read."""
    for url in urls:
        reader = None
        try:
            reader = open_shard(url)
            named = lambda exn: skip(ValueError(f"{url}: {exn}"))  # noqa: B023, E731 - this shard's
            files = wds.tariterators.tar_file_iterator(reader.stream, handler=named)
            yield from wds.tariterators.group_by_keys(({**f, "__url__": url} for f in files), handler=named)
            reader.finish()  # a reader's exit status
        except Exception as exn:  # noqa: BLE001 - a damaged or unreachable shard must not stop the start-up
            skip(ValueError(f"{url}: {exn}"))
        finally:
            if reader is not None:
                reader.abandon()


@torch.no_grad()
def encoder_features(encode: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int = 256):
    """``encode`` maps (B, 3, H, W) to tokens (B, 1 + L, D); returns (N, 2D) float32 on the CPU."""
    out = []
    for i in range(0, len(images), batch):
        tokens = encode(images[i : i + batch].float()).float()
        out.append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1).cpu())
    return torch.cat(out)


def knn_accuracy(train_f, train_y, test_f, test_y, k: int = 20, temperature: float = 0.07) -> float:
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for i in range(0, len(test_f), 512):
        sim = test_f[i : i + 512] @ train_f.T
        top, idx = sim.topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(top), classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
        correct += (votes.argmax(1) == test_y[i : i + 512]).sum().item()
    return correct / len(test_f)


def linear_probe_accuracy(
    train_f, train_y, test_f, test_y, weight_decay: float = 1e-4, iters: int = 200, history_bytes: float = 1e9
) -> float:
    mean, std = train_f.mean(0, keepdim=True), train_f.std(0, keepdim=True) + 1e-6
    xtr, xte = ((train_f - mean) / std).double(), ((test_f - mean) / std).double()
    classes = int(max(train_y.max(), test_y.max())) + 1
    head = torch.nn.Linear(xtr.shape[1], classes).double()
    # L-BFGS keeps 2 x history copies of the head: 100 (torch's default) while that fits history_bytes
    # (a ViT-g probe on 1000 classes would need 4.5 GB), fewer for wide features and many classes.
    per_copy = 8 * sum(p.numel() for p in head.parameters())
    history = int(max(5, min(100, history_bytes // (2 * per_copy))))
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=iters, history_size=history, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(xtr), train_y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (head(xte).argmax(1) == test_y).float().mean().item()


def evaluate_features(train_f, train_y, test_f, test_y, k: int = 20) -> dict[str, float]:
    return {
        "knn": knn_accuracy(train_f, train_y, test_f, test_y, k=k),
        "linear": linear_probe_accuracy(train_f, train_y, test_f, test_y),
    }


PIXEL_SIDE = 32  # the raw-pixel baseline's images are average-pooled to at most this many pixels a side


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Flattened pixels, pooled to at most PIXEL_SIDE a side: 3072 features, not 150,528 at 224 px (whose
    fp64 probe would need tens of GB)."""
    side = min(PIXEL_SIDE, images.shape[-2], images.shape[-1])
    out = []
    for i in range(0, len(images), 512):  # in float32 a chunk at a time, not the whole set at once
        chunk = images[i : i + 512].float()
        if (side, side) != tuple(chunk.shape[-2:]):
            chunk = F.adaptive_avg_pool2d(chunk, side)
        out.append(chunk.flatten(1))
    return torch.cat(out)


def pixel_baseline(train: LabelledSet, test: LabelledSet, k: int = 20) -> dict[str, float]:
    return evaluate_features(pixels(train.images), train.labels, pixels(test.images), test.labels, k=k)


def check_encoder(encode, train: LabelledSet, test: LabelledSet, k: int = 20, fit: bool = True) -> dict[str, float]:
    """kNN and linear-probe accuracy of the encoder's features. Every rank must call it (a forward pass is
    collective under ZeRO-3); only where ``fit`` are the read-outs fitted, elsewhere the result is {}."""
    train_f, test_f = encoder_features(encode, train.images), encoder_features(encode, test.images)
    return evaluate_features(train_f, train.labels, test_f, test.labels, k=k) if fit else {}
