"""Feature extraction and Re-ID evaluation of a model on every query set of a data set."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from amg.data.layout import ReIDDataset, Sample
from amg.data.preload import preload_images
from amg.data.transforms import normalize
from amg.errors import InputError
from amg.model.vit import ReIDViT
from amg.train.metrics import RankMetrics, evaluate_rank, pairwise_distance


@torch.inference_mode()
def extract_features(model: ReIDViT, images: torch.Tensor, camids: Sequence[int],
                     batch_size: int = 256) -> torch.Tensor:
    """Retrieval features `[N, D]` for preloaded uint8 images, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    needs_camids = model.sie_embed is not None
    camid_tensor = torch.as_tensor(list(camids), device=device)
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = normalize(images[start:start + batch_size].to(device))
        cams = camid_tensor[start:start + batch_size] if needs_camids else None
        chunks.append(model(batch, cams).float().cpu())
    return torch.cat(chunks)


# normalised images [batch, 3, H, W] and camera ids (or None) -> features: a compiled model
# (ONNX Runtime, OpenVINO, INT8...) that only takes its own batch size
FixedBatchFeatures = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@torch.inference_mode()
def extract_fixed_batch_features(features: FixedBatchFeatures, batch: int, images: torch.Tensor,
                                 camids: Sequence[int], needs_camids: bool) -> torch.Tensor:
    """Retrieval features `[N, D]` from a model compiled for `batch` images at a time; the last
    chunk is padded by repeating its last image, and the padding's features dropped."""
    camid_tensor = torch.as_tensor(list(camids))
    chunks = []
    for start in range(0, len(images), batch):
        chunk, cams = images[start:start + batch], camid_tensor[start:start + batch]
        real = len(chunk)
        if real < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - real, *chunk.shape[1:])])
            cams = torch.cat([cams, cams[-1:].expand(batch - real)])
        output = features(normalize(chunk), cams if needs_camids else None)
        chunks.append(torch.as_tensor(output).float().cpu()[:real])
    return torch.cat(chunks)


class Evaluator:
    """Holds a data set's decoded test images, so several models are evaluated without re-reading."""

    def __init__(self, dataset: ReIDDataset, img_size: tuple[int, int],
                 progress: Callable[[str], None] | None = None) -> None:
        self.dataset = dataset
        self.img_size = tuple(img_size)
        self.gallery = dataset.gallery
        self.gallery_images = preload_images(dataset.gallery, self.img_size, progress)
        self.query_images = {
            name: preload_images(samples, self.img_size, progress)
            for name, samples in dataset.query_sets.items()
        }

    def evaluate(self, model: ReIDViT, metric: str = "euclidean",
                 compiled: tuple[FixedBatchFeatures, int] | None = None) -> dict[str, RankMetrics]:
        """Rank metrics of every query set; features by `model`, or by `compiled` (its
        features function and batch size: what a runtime runs of `model`)."""
        if tuple(model.config.img_size) != self.img_size:
            raise InputError(f"model input {model.config.img_size} differs from evaluator's {self.img_size}")

        def extract(images: torch.Tensor, camids: np.ndarray) -> torch.Tensor:
            if compiled is None:
                return extract_features(model, images, camids)
            return extract_fixed_batch_features(*compiled, images, camids, model.sie_embed is not None)

        gallery_features = extract(self.gallery_images, _camids(self.gallery))
        results = {}
        for name, samples in self.dataset.query_sets.items():
            query_features = extract(self.query_images[name], _camids(samples))
            distances = pairwise_distance(query_features, gallery_features, metric)
            results[name] = evaluate_rank(
                distances, _array(s.pid for s in samples), _array(s.pid for s in self.gallery),
                _camids(samples), _camids(self.gallery),
            )
        return results


def _array(values) -> np.ndarray:
    return np.fromiter(values, dtype=np.int64)


def _camids(samples: Sequence[Sample]) -> np.ndarray:
    return _array(s.camid for s in samples)
