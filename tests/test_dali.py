"""--decode dali (an optional extra): the DALI pipeline, run with DALI's CPU operators, against the CPU path; rows
independent of the micro-batch; samples DALI cannot decode. Skipped where nvidia-dali is not installed."""
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from fastvit.config import TrainConfig  # noqa: E402
from fastvit.data import FileSource, ImageFolderSource, augment_batch, decode_image, micro_batch_plan  # noqa: E402
from fastvit.data.dali import DaliDecoder  # noqa: E402
from fastvit.data.keyed import MAX_REPLACEMENTS  # noqa: E402
from fastvit.data.sources import collate  # noqa: E402
from fastvit.train import train  # noqa: E402
from test_data import TINY, encode, make_folder  # noqa: E402

GREY = 1 / 255 / 0.225  # one grey level in normalised units (the smallest std)


def dali_batches(source, plan, seed, device="cpu"):
    """What --decode dali yields for ``plan``, with the decoder on ``device`` (the CPU: DALI's CPU operators)."""
    dali = FileSource(source.train_samples, source.train_samples, source.img_size, workers=0, decode="cpu")
    dali.decode = "dali"  # what --decode dali makes the loader workers return, decoded here
    keyed = dali.keyed(seed)
    loader = torch.utils.data.DataLoader(keyed, batch_sampler=plan, collate_fn=collate)
    return list(DaliDecoder(keyed, device, threads=1).batches(loader))


def test_dali_on_cpu_is_the_cpu_path_up_to_resampling(tmp_path):
    """Same samples, labels, replacements and flips as the CPU path; pixels within a few grey levels (DALI's
    antialiased linear resize is not torch's), far closer than the mirrored image."""
    make_folder(tmp_path, broken={("train", "owl", 0)})
    source = ImageFolderSource(str(tmp_path), img_size=16, workers=0)
    plan = list(micro_batch_plan(source.sampler(2), 2, 0, 0, 3, 6, 3, 1, 0))
    cpu = list(source.loader(iter(plan), 2))
    dali = dali_batches(source, plan, 2)
    assert sum(len(b) for _, _, b in cpu) >= 1
    for (xa, ya, ba), (xb, yb, bb) in zip(cpu, dali, strict=True):
        assert xb.shape == xa.shape and xb.dtype == torch.float32
        assert torch.equal(ya, yb) and ba == bb
        diff = (xa - xb).abs()
        assert diff.max() < 4 * GREY and diff.mean() < 0.3 * GREY
        assert (xa - xb.flip(-1)).abs().mean() > 10 * diff.mean()


def test_dali_rows_do_not_depend_on_the_micro_batch(tmp_path):
    """A global batch of 6 decoded as one micro-batch or as three of 2 gives the same rows bit for bit."""
    make_folder(tmp_path)
    source = ImageFolderSource(str(tmp_path), img_size=16, workers=0)
    whole = dali_batches(source, list(micro_batch_plan(source.sampler(5), 5, 0, 0, 2, 6, 6, 1, 0)), 5)
    split = dali_batches(source, list(micro_batch_plan(source.sampler(5), 5, 0, 0, 2, 6, 2, 1, 0)), 5)
    assert len(whole) == 2 and len(split) == 6
    for step in range(2):
        assert torch.equal(whole[step][0], torch.cat([x for x, _, _ in split[3 * step:3 * step + 3]]))
        assert torch.equal(whole[step][1], torch.cat([y for _, y, _ in split[3 * step:3 * step + 3]]))


def test_samples_dali_cannot_decode(tmp_path):
    """A GIF named .jpg (DALI has no GIF decoder; PIL reads it) is decoded by PIL and augmented by the torch code,
    uncounted;
    a JPEG cut after its header (past the workers' header check; undecodable by both) is replaced by the keyed
    substitute and counted. The other rows are what DALI gives them in a batch without these two."""
    make_folder(tmp_path, per_class=2)
    rng = np.random.default_rng(1)
    gif = tmp_path / "train" / "cat" / "9.jpg"
    gif.write_bytes(encode((rng.random((21, 27, 3)) * 255).astype(np.uint8), "GIF"))
    jpeg = encode((rng.random((30, 22, 3)) * 255).astype(np.uint8), "JPEG")
    cut = tmp_path / "train" / "dog" / "9.jpg"
    cut.write_bytes(jpeg[:len(jpeg) // 2])
    source = ImageFolderSource(str(tmp_path), img_size=16, workers=0)
    paths = source.train_samples.paths
    items = [(i, 3, pos) for pos, i in enumerate(range(len(paths)))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (x, y, bad), = dali_batches(source, [items], 7)
    at = {p: paths.index(str(p)) for p in (gif, cut)}
    keyed = source.keyed(7)
    u = keyed[items[at[gif]]][2][None]
    assert torch.equal(x[at[gif]], augment_batch([decode_image(gif.read_bytes())], u, 16)[0])
    assert [name for name, _ in bad] == [str(cut)] and "undecodable by DALI and on the CPU" in bad[0][1]
    sub = keyed.fetch(at[cut], 3, at[cut], decode_image, attempt=MAX_REPLACEMENTS + 1)
    assert y[at[cut]] == sub[1] != -1
    u = keyed[items[at[cut]]][2][None]
    assert torch.equal(x[at[cut]], augment_batch([sub[0]], u, 16)[0])
    good = [k for k in range(len(items)) if k not in at.values()]
    (x_good, y_good, bad_good), = dali_batches(source, [[items[k] for k in good]], 7)
    assert torch.equal(x[good], x_good) and torch.equal(y[good], y_good) and bad_good == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI's mixed decoder needs CUDA")
def test_dali_on_cuda_is_close_to_the_cpu_path_and_trains(tmp_path):
    make_folder(tmp_path, broken={("train", "owl", 0)})
    source = ImageFolderSource(str(tmp_path), img_size=16, workers=0)
    plan = list(micro_batch_plan(source.sampler(2), 2, 0, 0, 3, 6, 3, 1, 0))
    for (xa, ya, ba), (xb, yb, bb) in zip(source.loader(iter(plan), 2), dali_batches(source, plan, 2, "cuda"),
                                          strict=True):
        assert xb.is_cuda and torch.equal(ya, yb.cpu()) and ba == bb
        assert (xa - xb.cpu()).abs().max() < 8 * GREY
    result = train(TrainConfig(**dict(TINY, workers=1), data=str(tmp_path), out=str(tmp_path / "run"), steps=2,
                               global_batch=6, decode="dali", max_bad_frac=0.5))
    assert result["step"] == 2
