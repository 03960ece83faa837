"""``--decode gpu``: loader workers only read the encoded bytes; JPEGs are decoded on the GPU in one batched
``torchvision.io.decode_jpeg(..., device='cuda')`` call per micro-batch, and the keyed crop / flip / normalise of
``fastvit.data.augment`` runs there on the decoded images. PNG / WebP samples, and JPEGs the GPU decoder rejects
(CMYK, progressive corner cases), are decoded by PIL instead; a sample neither can decode is replaced by a keyed
substitute as on the CPU path (different substitutes from the workers', as their attempt numbers start after
``MAX_REPLACEMENTS``)."""
from __future__ import annotations

import torch

from fastvit.data.augment import JPEG_MAGIC, augment_batch, decode_image, decode_jpeg
from fastvit.data.keyed import MAX_REPLACEMENTS


def is_jpeg(data: torch.Tensor) -> bool:
    return len(data) > 2 and bytes(data[:2].tolist()) == JPEG_MAGIC


class GpuDecoder:
    """Turns the loader's encoded micro-batches into augmented batches on ``device`` (CUDA in training; any device
    torchvision's decode_jpeg supports, so the CPU can check the same code)."""

    decoder = "on the GPU"  # for the reason of a bad sample

    def __init__(self, dataset, device):
        """``dataset``: the loader's ``fastvit.data.sources.KeyedImages`` (its ``fetch`` finds substitutes)."""
        self.dataset, self.device = dataset, torch.device(device)

    def _gpu_decode(self, encoded: list) -> list:
        """Decoded (3, H, W) uint8 CUDA tensors, None where the GPU decoder failed."""
        try:
            return decode_jpeg(encoded, self.device)
        except RuntimeError:  # one bad image fails the batched call: find it one by one
            out = []
            for data in encoded:
                try:
                    out.append(decode_jpeg(data, self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def decode(self, encoded: list, labels: torch.Tensor, keys: list):
        """(decoded images on the device, labels, bad) for one micro-batch of encoded images."""
        images = [None] * len(encoded)
        jpeg = [i for i, data in enumerate(encoded) if is_jpeg(data)]
        for i, image in zip(jpeg, self._gpu_decode([encoded[i] for i in jpeg]) if jpeg else []):
            images[i] = image
        labels, bad = labels.clone(), []
        for i in (i for i, image in enumerate(images) if image is None):
            images[i], label, more = self.decode_elsewhere(encoded[i], keys[i])
            if label is not None:
                labels[i] = label
            bad += more
        return images, labels, bad

    def decode_elsewhere(self, data: torch.Tensor, key):
        """(image on the device, label of a substitute or None, bad) for a sample this decoder left undecoded:
        ``decode_image`` on the CPU, else a keyed substitute as on the CPU path."""
        try:
            image, label, bad = decode_image(data.numpy().tobytes()), None, []
        except Exception:  # noqa: BLE001  not decodable by either: a keyed substitute, as on the CPU path
            bad = [(self.dataset.samples.name(key.index), f"undecodable {self.decoder} and on the CPU")]
            image, label, more, _ = self.dataset.fetch(key.index, key.step, key.pos, decode_image,
                                                       attempt=MAX_REPLACEMENTS + 1)
            bad += more
        return image.to(self.device, non_blocking=True), label, bad

    def batches(self, loader):
        for encoded, labels, u, bad, keys in loader:
            images, labels, more = self.decode(encoded, labels, keys)
            yield augment_batch(images, u, self.dataset.img_size), labels, bad + more
