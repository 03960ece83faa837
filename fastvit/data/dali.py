"""``--decode dali``: NVIDIA DALI decodes, crops, resizes, flips and normalises each micro-batch, on the GPU.

Loader workers read the encoded bytes and the image size from its header; the crop boxes and flips come from the
same keyed uniforms as on the other paths (``fastvit.data.augment.crop_boxes``), and one DALI pipeline run per
micro-batch decodes only the box of each image (``decoders.image_slice``: nvJPEG through DALI's mixed decoder, with
the GPU's hardware JPEG engine where it has one; PNG, WebP and the rest too), resizes it (linear, antialiased,
rounded to uint8 as the other paths do), flips and normalises it. What DALI cannot decode goes the way of
``--decode gpu`` (PIL, else a keyed substitute; then ``augment_batch`` on the GPU).

Every output row depends on its sample alone: DALI's operators work per sample, EXIF orientation is ignored (as PIL
and torchvision do here, so the header's size is the decoded size) and every image the hardware decoder accepts
goes to it (``hw_decoder_load=1``), whatever else is in the batch. A failed run invalidates a DALI pipeline, so
after one the batch is split in halves and each half run on a fresh pipeline until the undecodable samples are
found. The same pipeline on the CPU (``device='cpu'``) is what the tests run.

An optional extra (``pip install -e ".[dali]"``: the ``nvidia-dali-cuda130`` wheel), imported only when chosen.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from fastvit.data.augment import IMAGENET_MEAN, IMAGENET_STD, augment_batch, crop_boxes
from fastvit.data.gpu import GpuDecoder


def build_pipeline(batch_size: int, size: int, device: torch.device, threads: int):
    """A DALI pipeline run synchronously on named inputs ``encoded`` (uint8 bytes), ``anchor`` and ``shape`` (int32
    (x, y) and (width, height) of the crop box, in pixels) and ``mirror`` (int32 0/1): (B, 3, size, size) float32
    ImageNet-normalised crops."""
    from nvidia.dali import Pipeline, fn, types
    cuda = device.type == "cuda"
    device_id = (torch.cuda.current_device() if device.index is None else device.index) if cuda else None
    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id,
                    exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        anchor = fn.external_source(name="anchor", dtype=types.INT32)
        shape = fn.external_source(name="shape", dtype=types.INT32)
        mirror = fn.external_source(name="mirror", dtype=types.INT32)
        where = dict(device="mixed", hw_decoder_load=1.0) if cuda else dict(device="cpu")
        images = fn.decoders.image_slice(encoded, anchor, shape, output_type=types.RGB, axis_names="WH",
                                         normalized_anchor=False, normalized_shape=False, adjust_orientation=False,
                                         **where)
        images = fn.resize(images, size=[size, size], antialias=True, interp_type=types.INTERP_LINEAR)
        images = fn.crop_mirror_normalize(images, mirror=mirror, mean=[255 * m for m in IMAGENET_MEAN],
                                          std=[255 * s for s in IMAGENET_STD], output_layout="CHW",
                                          dtype=types.FLOAT)
        pipe.set_outputs(images)
    pipe.build()
    return pipe


class DaliDecoder(GpuDecoder):
    """Turns the loader's encoded micro-batches into augmented batches on ``device`` through DALI (CUDA in training;
    the CPU runs the same pipeline with DALI's CPU operators, for the tests)."""

    decoder = "by DALI"

    def __init__(self, dataset, device, threads: int | None = None):
        super().__init__(dataset, device)
        self.threads = threads or min(4, os.cpu_count() or 1)
        self._pipe, self._capacity = None, 0

    def _run(self, encoded, boxes, flips) -> torch.Tensor:
        """One pipeline run on samples that all decode (raises RuntimeError otherwise, leaving no pipeline)."""
        if self._pipe is None or len(encoded) > self._capacity:
            self._capacity = max(len(encoded), self._capacity)
            self._pipe = build_pipeline(self._capacity, self.dataset.img_size, self.device, self.threads)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            (out,) = self._pipe.run(stream, encoded=[e.numpy() for e in encoded],
                                    anchor=[np.array([l, t], np.int32) for t, l, _, _ in boxes],
                                    shape=[np.array([w, h], np.int32) for _, _, h, w in boxes],
                                    mirror=[np.array(f, np.int32) for f in flips])
        except RuntimeError:
            self._pipe = None  # DALI: "Current pipeline object is no longer valid"
            raise
        from nvidia.dali.plugin.pytorch import feed_ndarray
        size = self.dataset.img_size
        batch = torch.empty((len(encoded), 3, size, size), dtype=torch.float32, device=self.device)
        return feed_ndarray(out.as_tensor(), batch, cuda_stream=stream)

    def _augment(self, encoded, boxes, flips):
        """(the micro-batch's rows, indexes of the samples DALI could not decode; their rows are zeros)."""
        try:
            return self._run(encoded, boxes, flips), []
        except RuntimeError:
            if len(encoded) == 1:
                size = self.dataset.img_size
                return torch.zeros((1, 3, size, size), device=self.device), [0]
        half = len(encoded) // 2
        first, failed = self._augment(encoded[:half], boxes[:half], flips[:half])
        second, more = self._augment(encoded[half:], boxes[half:], flips[half:])
        return torch.cat([first, second]), failed + [half + i for i in more]

    def batches(self, loader):
        for encoded, labels, u, bad, keys in loader:
            boxes, flips = crop_boxes(u, [k.height for k in keys], [k.width for k in keys])
            batch, failed = self._augment(encoded, boxes, flips)
            if failed:
                labels = labels.clone()
            for i in failed:  # decoded elsewhere, then cropped from its own (or its substitute's) size
                image, label, more = self.decode_elsewhere(encoded[i], keys[i])
                batch[i] = augment_batch([image], u[i:i + 1], self.dataset.img_size)[0]
                if label is not None:
                    labels[i] = label
                bad = bad + more
            yield batch, labels, bad
