"""Image decoding and the keyed image augmentations, written once for the CPU loader workers and the GPU path.

Training: random resized crop (torchvision's algorithm: 10 tries of scale 0.08-1 and log-uniform ratio 3/4-4/3,
else a centre crop), horizontal flip, ImageNet normalisation. Its randomness is not torch's RNG but 24 keyed
uniforms per sample (``fastvit.data.keyed.keyed_uniform``), turned into crop boxes by ``crop_boxes`` from the image
sizes alone, so the CPU path (PIL decode in a worker, then ``augment_batch`` on one image) and the GPU path
(``torchvision.io.decode_jpeg`` on CUDA, then ``augment_batch`` on the whole batch) crop the same boxes and flip the
same samples. The crop is resized in float32 (bilinear, antialiased) on the tensor's device.

Evaluation: resize the shorter side to size / 0.875, centre crop, normalise.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10
UNIFORMS = 2 * ATTEMPTS + 4  # (area, log-ratio) per attempt, then top, left, flip, one spare
EVAL_CROP = 0.875


def decode_pil(data: bytes) -> torch.Tensor:
    """An encoded image (JPEG, PNG, WebP, ...) as a (3, H, W) uint8 tensor, through PIL (grey, palette, CMYK and
    alpha images converted to RGB). Raises whatever PIL raises on a broken file."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def crop_boxes(u, heights, widths):
    """(B, UNIFORMS) uniforms and image sizes -> (B, 4) int64 boxes (top, left, height, width) and (B,) bool flips:
    torchvision's RandomResizedCrop.get_params, driven by the given uniforms instead of torch's RNG."""
    u = np.asarray(u, dtype=np.float64)
    H, W = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    boxes = np.zeros((len(u), 4), dtype=np.int64)
    found = np.zeros(len(u), dtype=bool)
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for k in range(ATTEMPTS):
        area = H * W * (SCALE[0] + u[:, 2 * k] * (SCALE[1] - SCALE[0]))
        aspect = np.exp(log_lo + u[:, 2 * k + 1] * (log_hi - log_lo))
        w = np.round(np.sqrt(area * aspect)).astype(np.int64)
        h = np.round(np.sqrt(area / aspect)).astype(np.int64)
        ok = ~found & (w > 0) & (w <= W) & (h > 0) & (h <= H)
        boxes[ok, 2], boxes[ok, 3] = h[ok], w[ok]
        found |= ok
    # fallback: the largest centre crop whose ratio is within RATIO
    ratio = W / H
    h = np.where(ratio < RATIO[0], np.round(W / RATIO[0]), H).astype(np.int64)
    w = np.where(ratio > RATIO[1], np.round(H * RATIO[1]), W).astype(np.int64)
    boxes[~found, 2], boxes[~found, 3] = h[~found], w[~found]
    top = np.floor(u[:, 2 * ATTEMPTS] * (H - boxes[:, 2] + 1)).astype(np.int64)
    left = np.floor(u[:, 2 * ATTEMPTS + 1] * (W - boxes[:, 3] + 1)).astype(np.int64)
    boxes[:, 0] = np.where(found, top, (H - boxes[:, 2]) // 2)
    boxes[:, 1] = np.where(found, left, (W - boxes[:, 3]) // 2)
    return boxes, u[:, 2 * ATTEMPTS + 2] < 0.5


def _resize(image: torch.Tensor, size) -> torch.Tensor:
    """(3, h, w) uint8 or float -> (3, *size) float32 in [0, 255], bilinear with antialiasing."""
    return F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def normalise(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) float in [0, 255] -> ImageNet-normalised."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1) * 255
    return (x - mean) / std


def augment_batch(images, u, size: int) -> torch.Tensor:
    """Decoded (3, H_i, W_i) uint8 images of any sizes (one device) and their (B, UNIFORMS) keyed uniforms ->
    a (B, 3, size, size) float32 batch: random resized crop, flip, normalise."""
    boxes, flips = crop_boxes(u, [im.shape[1] for im in images], [im.shape[2] for im in images])
    crops = torch.stack([_resize(im[:, t:t + h, l:l + w], (size, size)) for im, (t, l, h, w) in zip(images, boxes)])
    flips = torch.from_numpy(flips).to(crops.device)
    crops = torch.where(flips.view(-1, 1, 1, 1), crops.flip(-1), crops)
    return normalise(crops)


def eval_transform(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size): shorter side to round(size / 0.875), centre crop, normalise."""
    _, H, W = image.shape
    short = int(round(size / EVAL_CROP))
    h, w = (short, max(short, W * short // H)) if H <= W else (max(short, H * short // W), short)
    resized = _resize(image, (h, w))
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))  # torchvision's centre
    return normalise(resized[:, top:top + size, left:left + size])
