"""WebDataset shards: the writer (read back through the webdataset package as the reference), the indexed reader,
the windowed sampler, bad input, and training on shards (split invariance, exact resume)."""
import io
import json
import os
import re
import shutil
import tarfile
import warnings

import numpy as np
import pytest
import torch

from fastvit.config import TrainConfig
from fastvit.data import BadSampleWarning, FolderSamples, micro_batch_plan
from fastvit.data.shards import (ShardSampler, ShardSamples, ShardSource, _tar_bytes, count_classes, expand,
                                 is_shard_spec, main as write_main, parse_size, scan_shard, shard_index)
from fastvit.dist import Env, rank0_warnings
from fastvit.train import BadSampleLimit, train
from test_data import TINY, make_folder, rows

wds = pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """An ImageFolder (3 classes x 6 images per split, mixed sizes, JPEG and PNG, one truncated training JPEG)
    written as ~3 KB shards; returns (source root, shard root, writer exit code, broken file)."""
    root = tmp_path_factory.mktemp("shards")
    broken = make_folder(root / "src", broken={("train", "dog", 1)})
    code = write_main([str(root / "src"), str(root / "wds"), "--shard-size", "3KB", "--workers", "0"])
    return root / "src", root / "wds", code, broken[0]


def test_a_shard_fingerprint_names_its_samples_not_where_they_lie(written, tmp_path):
    """Shards copied to another folder have the fingerprint they had (a run's config.json compares it on resume);
    a sample of other bytes changes it."""
    _, wds_root, _, _ = written
    shutil.copytree(wds_root, tmp_path / "copy")
    here, there = (ShardSamples(sorted(str(p) for p in (root / "train").glob("*.tar"))) for root in (wds_root,
                                                                                                    tmp_path / "copy"))
    assert here.fingerprint == there.fingerprint
    there = ShardSamples(there.paths)
    there.sizes = there.sizes + (np.arange(len(there.sizes)) == 3)
    assert there.fingerprint != here.fingerprint


def test_a_copied_shard_keeps_its_index_and_a_rewritten_one_is_scanned(written, tmp_path, monkeypatch):
    """A copy (another mtime, as cp, rsync or gsutil give) is recognised by its size and first and last bytes: its
    index is used (and takes the copy's time), not rebuilt by every run; a shard of the same size whose bytes
    changed is scanned again. Naming samples reads each shard's index once."""
    import fastvit.data.shards as shards
    _, wds_root, _, _ = written
    source = sorted((wds_root / "train").glob("*.tar"))[0]
    copy = tmp_path / source.name
    shutil.copyfile(source, copy)
    shutil.copyfile(str(source) + ".idx.json", str(copy) + ".idx.json")
    os.utime(copy, ns=(1, 10**18))
    scans = []
    real_scan = shards.scan_shard
    monkeypatch.setattr(shards, "scan_shard", lambda path: scans.append(path) or real_scan(path))
    index = shard_index(str(copy))
    assert scans == [] and index["samples"] == shard_index(str(source))["samples"]
    assert json.loads((tmp_path / (source.name + ".idx.json")).read_text())["mtime_ns"] == 10**18
    samples = ShardSamples([str(copy)])
    names = [samples.name(i) for i in range(len(samples))] * 2
    assert scans == [] and names[0] == f"{copy}:{index['samples'][0][0]}"
    data = bytearray(copy.read_bytes())
    data[600] ^= 0xFF  # inside the first member's data: same size, other bytes
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(1, 2 * 10**18))
    shard_index(str(copy))
    assert scans == [str(copy)]


def test_a_read_only_shard_s_index_is_kept_in_the_cache(written, tmp_path, monkeypatch):
    """Shards of another tool in a folder that cannot be written (shared read-only storage): the scan's index goes
    to fastvit's cache folder, and the next run reads it from there instead of scanning every shard again."""
    import fastvit.data.shards as shards
    _, wds_root, _, _ = written
    shard = tmp_path / "ro" / "a.tar"
    shard.parent.mkdir()
    shutil.copyfile(sorted((wds_root / "train").glob("*.tar"))[0], shard)  # no index beside it
    monkeypatch.setenv("FASTVIT_CACHE_DIR", str(tmp_path / "cache"))
    real_write = shards.write_index

    def read_only(where, index):
        if where.startswith(str(shard.parent)):
            raise PermissionError(13, "Permission denied", where)
        real_write(where, index)
    monkeypatch.setattr(shards, "write_index", read_only)
    scans = []
    real_scan = shards.scan_shard
    monkeypatch.setattr(shards, "scan_shard", lambda path: scans.append(path) or real_scan(path))
    first = shard_index(str(shard))
    assert scans == [str(shard)] and not (tmp_path / "ro" / "a.tar.idx.json").exists()
    assert [p.name.split("-")[0] for p in (tmp_path / "cache" / "shard-index").iterdir()] == ["a.tar"]
    assert shard_index(str(shard)) == first and scans == [str(shard)]
    # one cache folder for everything fastvit keeps: the autotune winners beside the shard indexes, and
    # $XDG_CACHE_HOME/fastvit where FASTVIT_CACHE_DIR is not set
    from fastvit import autotune
    assert autotune.cache_path().parent == tmp_path / "cache"
    monkeypatch.delenv("FASTVIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path() == tmp_path / "xdg" / "fastvit" / "autotune.json"
    assert list(shards._index_paths(str(shard)))[1].startswith(str(tmp_path / "xdg" / "fastvit" / "shard-index"))
    monkeypatch.setenv("FASTVIT_CACHE", str(tmp_path / "old"))  # the shard indexes' variable for a while
    with pytest.warns(FutureWarning, match="FASTVIT_CACHE is now FASTVIT_CACHE_DIR"):
        assert autotune.cache_path() == tmp_path / "old" / "autotune.json"


def test_writing_into_an_earlier_write_is_refused_or_replaced(tmp_path, capsys):
    """A second write into the same DST would leave the first one's extra shards beside its own: refused, or with
    --overwrite replaced, so the folder holds exactly the manifest's shards."""
    make_folder(tmp_path / "src")
    args = [str(tmp_path / "src"), str(tmp_path / "wds"), "--workers", "0", "--no-verify"]
    assert write_main(args + ["--shard-size", "3KB"]) == 0
    assert len(list((tmp_path / "wds" / "train").glob("*.tar"))) > 1
    with pytest.raises(SystemExit) as exit_info:
        write_main(args + ["--shard-size", "1MB"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert write_main(args + ["--shard-size", "1MB", "--overwrite"]) == 0
    manifest = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    for split in ("train", "val"):
        on_disk = sorted(p.name for p in (tmp_path / "wds" / split).glob("*.tar"))
        assert on_disk == [s["name"] for s in manifest["splits"][split]["shards"]] and len(on_disk) == 1


def test_shards_a_reader_would_take_with_a_new_write_are_refused_or_removed(tmp_path, capsys):
    """Any .tar in DST or its split folders would be read with the new shards (or, in a held-out split the new
    write has not, instead of its own): a one-split write into a folder of train/ and val/ shards, a foreign
    .tar in train/, an unfinished .tar.tmp are refused; --overwrite removes them all, so that the folder holds
    exactly the manifest's shards."""
    make_folder(tmp_path / "src")
    base = ["--workers", "0", "--no-verify"]
    assert write_main([str(tmp_path / "src"), str(tmp_path / "wds")] + base) == 0
    (tmp_path / "src" / "val").rename(tmp_path / "src" / "test")  # a new write of train/ and test/
    for leftover in ("train/old-0000.tar", "val/val-000009.tar.tmp", "stray.tar"):
        for src in (tmp_path / "src", tmp_path / "src" / "train"):  # two splits, and one split into DST itself
            with pytest.raises(SystemExit) as exit_info:
                write_main([str(src), str(tmp_path / "wds")] + base)
            assert exit_info.value.code == 2 and "--overwrite to remove them" in capsys.readouterr().err
        (tmp_path / "wds" / leftover).write_bytes(b"")
    assert write_main([str(tmp_path / "src"), str(tmp_path / "wds"), "--overwrite"] + base) == 0
    manifest = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    on_disk = sorted(str(p.relative_to(tmp_path / "wds")) for p in (tmp_path / "wds").rglob("*.tar*")
                     if not p.name.endswith(".idx.json"))
    assert on_disk == sorted(f"{split}/{s['name']}" for split in ("train", "test")
                             for s in manifest["splits"][split]["shards"])
    assert ShardSource(str(tmp_path / "wds"), None, 16, workers=0).test.samples.paths[0].startswith(
        str(tmp_path / "wds" / "test"))


def test_an_interrupted_verify_keeps_the_manifest_and_verify_runs_alone(written, tmp_path, monkeypatch, capsys):
    """The manifest is written before the verify pass: Ctrl-C there exits 130 naming ``--verify DST``, which then
    decodes every sample of the written shards and records the result in the manifest."""
    src, _, _, broken = written
    import fastvit.data.shards as shards

    def interrupted(folder, workers=0):
        raise KeyboardInterrupt
    monkeypatch.setattr(shards, "verify", interrupted)
    assert write_main([str(src), str(tmp_path / "wds"), "--workers", "0"]) == 130
    assert f"--verify {tmp_path / 'wds'} verifies them" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    assert manifest["verify"] is None and manifest["splits"]["train"]["samples"] == 18
    monkeypatch.undo()
    assert write_main(["--verify", str(tmp_path / "wds"), "--workers", "0"]) == 1
    out, err = capsys.readouterr()
    assert "undecodable: train/" in err and "verified: 35 sample(s) decode" in out
    after = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    assert after["verify"]["decoded"] == 35 and len(after["verify"]["undecodable"]) == 1
    assert {k: v for k, v in after.items() if k != "verify"} == {k: v for k, v in manifest.items() if k != "verify"}
    for bad in (["--verify", str(tmp_path / "wds"), str(src)], ["--verify", str(tmp_path / "nothing")], [str(src)]):
        with pytest.raises(SystemExit) as exit_info:
            write_main(bad)
        assert exit_info.value.code == 2, bad
    assert "no .tar shards there" in capsys.readouterr().err


def test_dst_must_be_a_folder_apart_from_src(tmp_path, capsys):
    """DST equal to SRC, inside it, or holding it would put shards beside the class folders (and --data SRC would
    then read as shards): refused naming both paths, before anything is written. A DST that is a file, or cannot be
    created, is a usage error too, not a traceback."""
    src = tmp_path / "src"
    make_folder(src)
    (tmp_path / "afile").write_text("x")
    tree = sorted(src.rglob("*"))
    overlaps = [(src, "is SRC"), (f"{src}/../src", "is SRC"), (src / "wds", "lies inside SRC"),
                (src / "train" / "wds", "lies inside SRC"), (tmp_path, "lies inside DST")]
    for dst, message in overlaps + [(tmp_path / "afile", "is a file"), (tmp_path / "afile" / "wds", "cannot create")]:
        with pytest.raises(SystemExit) as exit_info:
            write_main([str(src), str(dst), "--workers", "0", "--no-verify"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and repr(str(dst)) in err, err
        assert (dst, message) not in overlaps or repr(str(src)) in err, err
    assert sorted(src.rglob("*")) == tree and not is_shard_spec(str(src))


def test_splits_with_other_classes_are_refused_before_writing(tmp_path, capsys):
    """A val/ whose classes differ from train/'s is refused naming the difference before any shard is written (it
    was refused after all of train/, whose shards stayed without a manifest and made a rerun need --overwrite)."""
    src = tmp_path / "src"
    make_folder(src)
    shutil.move(src / "val" / "owl", src / "val" / "bat")
    with pytest.raises(SystemExit) as exit_info:
        write_main([str(src), str(tmp_path / "wds"), "--workers", "0", "--no-verify"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "must have the 3 classes of" in err
    assert "lacks 1 of them (owl) and has 1 other(s) (bat)" in err
    assert not (tmp_path / "wds").exists()


def test_manifest_paths_are_absolute_and_ignored_files_counted(tmp_path, monkeypatch, capsys):
    """From a relative SRC, the sources of skipped and undecodable samples are absolute, as the manifest's source;
    files ImageFolder does not list (other extensions, files beside the class folders) are counted per split and
    named in one line, not silently left out."""
    make_folder(tmp_path / "src", broken={("train", "dog", 1)})
    for name in ("cat/notes.txt", "dog/notes.txt", "owl/anim.gif", "README"):
        (tmp_path / "src" / "train" / name).write_text("x")
    (tmp_path / "src" / "train" / "owl" / "bad.bmp").write_bytes(b"BM" + bytes(10))  # listed, fails re-encoding
    monkeypatch.chdir(tmp_path)
    assert write_main(["src", "wds", "--shard-size", "1MB", "--workers", "0"]) == 1
    manifest = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    assert manifest["source"] == str(tmp_path / "src")
    train = manifest["splits"]["train"]
    assert [s["source"] for s in train["skipped"]] == [str(tmp_path / "src" / "train" / "owl" / "bad.bmp")]
    assert "it starts as a BMP file: damaged or cut short" in train["skipped"][0]["error"]
    assert [u["source"] for u in manifest["verify"]["undecodable"]] == [str(tmp_path / "src" / "train" / "dog" /
                                                                            "1.jpg")]
    assert train["ignored"] == {"count": 4, "extensions": {".txt": 2, "(none)": 1, ".gif": 1}}
    assert manifest["splits"]["val"]["ignored"] == {"count": 0, "extensions": {}}
    err = capsys.readouterr().err
    assert "ignored 4 file(s) in SRC, not written (.txt 2, (none) 1, .gif 1): ImageFolder reads only .jpg" in err


def test_writer_output_reads_back_through_webdataset(written):
    src, dst, code, broken = written
    assert code == 1  # one sample does not decode: reported, still written
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog", "owl"]
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        shards = sorted(p.name for p in (dst / split).glob("*.tar"))
        assert [s["name"] for s in entry["shards"]] == shards and len(shards) > 3
        assert entry["samples"] == 18 and entry["per_class"] == {"cat": 6, "dog": 6, "owl": 6}
        assert sum(s["samples"] for s in entry["shards"]) == 18
        assert all((dst / split / (name + ".idx.json")).is_file() for name in shards)
        largest = max(p.stat().st_size for p in (src / split).rglob("*.*"))
        for name in shards:  # a shard holds at most --shard-size bytes of tar members (headers too), or one sample
            sizes = [size for _, _, size, _ in scan_shard(str(dst / split / name))["samples"]]
            assert sum(sizes) < 3000 + largest and (sum(map(_tar_bytes, sizes)) <= 3000 or len(sizes) == 1)
        # the reference: webdataset's own reader yields exactly the source images and labels
        folder = FolderSamples(str(src / split))
        expected = sorted((folder.read(i), int(folder.labels[i])) for i in range(len(folder)))
        got = sorted((s.get("jpg", s.get("png")), int(s["cls"])) for s in
                     wds.WebDataset([str(dst / split / n) for n in shards], shardshuffle=False, empty_check=False))
        assert got == expected
        samples = ShardSamples(expand(str(dst / split)))
        assert sorted((samples.read(i), int(samples.labels[i])) for i in range(len(samples))) == expected
    undecodable = manifest["verify"]["undecodable"]
    assert [u["source"] for u in undecodable] == [broken] and manifest["verify"]["decoded"] == 35


def test_sampler_visits_every_sample_per_epoch_in_shard_windows():
    counts = [5, 3, 7, 1, 4, 6, 2, 5, 3, 8, 2, 4]
    sampler = ShardSampler(counts, seed=3, window=4)
    n = sum(counts)
    starts = np.concatenate([[0], np.cumsum(counts)])
    shard_of = np.searchsorted(starts, np.arange(n), side="right") - 1
    stream = [sampler.index(p) for p in range(2 * n)]
    assert sorted(stream[:n]) == sorted(stream[n:]) == list(range(n)) and stream[:n] != stream[n:]
    # positions come window by window: each run of a window's samples touches at most 4 shards
    order = []
    for i in stream[:n]:
        if not order or order[-1] != shard_of[i]:
            order.append(shard_of[i])
    first_window = set()
    for s in order:
        first_window.add(s)
        if len(first_window) == 4:
            break
    boundary = sum(counts[s] for s in first_window)
    assert {shard_of[i] for i in stream[:boundary]} == first_window
    assert [ShardSampler(counts, 3, 4).index(p) for p in range(n)] == stream[:n]  # a pure function of the seed
    # the plan of any rank / micro-batch split covers the same global batches
    for world, micro in ((1, 6), (2, 3), (3, 1)):
        plans = [list(micro_batch_plan(sampler, 3, 0, 0, 4, 6, micro, world, r)) for r in range(world)]
        for step in range(4):
            got = sorted((i, p) for plan in plans for items in plan for i, s, p in items if s == step)
            assert got == sorted((stream[6 * step + p], p) for p in range(6))


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_shard_input_gives_clear_errors(written, tmp_path):
    _, dst, _, _ = written
    with pytest.raises(ValueError, match=r"matches no file \(it expands to 3 name\(s\), the first"):
        expand(str(tmp_path / "x-{0..2}.tar"))
    first = sorted((dst / "train").glob("*.tar"))[0]
    pattern = str(first).replace(first.name, "train-{000000..000099}.tar")
    with pytest.raises(ValueError, match="shards do not exist"):
        expand(pattern)
    with pytest.raises(ValueError, match=r"holds no .tar shards \(its train/ and val/ do: name that folder\)"):
        expand(str(dst))  # --val-data DST for DST/val
    _tar(tmp_path / "nolabels.tar", [("a.jpg", b"x"), ("b.jpg", b"y")])
    with pytest.raises(ValueError, match="has no labels"):
        scan_shard(str(tmp_path / "nolabels.tar"))
    _tar(tmp_path / "some.tar", [("a.jpg", b"x"), ("a.cls", b"1"), ("b.jpg", b"y")])
    with pytest.raises(ValueError, match="1 of 2 samples have no .cls label \\(first: 'b'\\)"):
        scan_shard(str(tmp_path / "some.tar"))
    _tar(tmp_path / "negative.tar", [("a.jpg", b"x"), ("a.cls", b"1"), ("b.jpg", b"y"), ("b.cls", b"-1")])
    with pytest.raises(ValueError, match="sample 'b' has class index -1; class indices are 0 or more"):
        scan_shard(str(tmp_path / "negative.tar"))
    _tar(tmp_path / "huge.tar", [("a.jpg", b"x"), ("a.cls", b"1" * 25)])
    with pytest.raises(ValueError, match=r"sample 'a' has class index 1{25}; class indices are 0 or more and below "
                                         r"2\*\*31"):
        scan_shard(str(tmp_path / "huge.tar"))
    _tar(tmp_path / "noimage.tar", [("a.txt", b"x"), ("a.cls", b"1")])
    with pytest.raises(ValueError, match="samples have no image"):
        scan_shard(str(tmp_path / "noimage.tar"))
    _tar(tmp_path / "empty.tar", [])
    with pytest.warns(RuntimeWarning, match="empty.tar holds no samples; skipped"):
        samples = ShardSamples([str(tmp_path / "empty.tar"), str(first)])
    assert samples.paths == [str(first)]
    (tmp_path / "zero.tar").write_bytes(b"")  # a zero-byte file is an empty shard too
    with pytest.warns(RuntimeWarning, match="zero.tar holds no samples; skipped"):
        assert ShardSamples([str(tmp_path / "zero.tar"), str(first)]).paths == [str(first)]
    with pytest.raises(ValueError, match=r"wildcards \(\* \? \[...\]\) are not expanded: pass the folder"):
        expand(str(dst / "train" / "*.tar"))
    with pytest.raises(ValueError, match="pass the held-out shards with --val-data"):
        ShardSource(pattern, None, 16)
    with pytest.raises(ValueError, match="is a folder of shards without train/ and val/: pass the held-out shards "
                                         "with --val-data"):
        ShardSource(str(dst / "train"), None, 16)
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    shutil.copy(first, tmp_path / "only_train" / "train")
    with pytest.raises(ValueError, match="needs train/ and val/"):
        ShardSource(str(tmp_path / "only_train"), None, 16)
    assert parse_size("1GB") == 10 ** 9 and parse_size("64MiB") == 64 * 2 ** 20 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="--shard-size must look like 1GB"):
        parse_size("big")
    for small in ("1", "0", "1KB"):  # a unit left out: 1 byte, a shard per sample
        with pytest.raises(ValueError, match=rf"--shard-size {small} is \d+ bytes?, less than one sample .*e.g. 1GB"):
            parse_size(small)


def test_a_shard_cut_short_keeps_its_whole_samples_and_says_so(tmp_path):
    """A shard cut anywhere (inside a member's data, at a header boundary, inside a header) is indexed up to its
    last whole sample, with a warning (a sample whose image is cut is lost with the rest: drawn, it would count as
    unreadable against --max-bad-frac). Python's tarfile reads a missing or short header as the end of the archive:
    cut there, the shard lost its last samples without a word, or failed on the half sample left."""
    _tar(tmp_path / "whole.tar", [(f"{i:03d}.{ext}", data) for i in range(4)
                                  for ext, data in (("cls", str(i).encode()), ("jpg", bytes([i + 1]) * 700))])
    raw = (tmp_path / "whole.tar").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a whole shard: no warning
        assert [s[0] for s in scan_shard(str(tmp_path / "whole.tar"))["samples"]] == ["000", "001", "002", "003"]
    # members: header (512) + data padded to 512: a sample is cls (1024 bytes) then jpg (512 + 1024)
    sample = 1024 + 1536
    for cut, kept in ((2 * sample, 2),              # at the header of sample 2's .cls: nothing of it is left
                      (2 * sample + 1024, 2),       # at the header of its .jpg: a label without an image
                      (2 * sample + 1024 + 300, 2),  # inside that header
                      (2 * sample + 1024 + 900, 2),  # inside its image data: lost, not drawn as unreadable
                      (4 * sample, 4)):             # after the last member, without the end-of-archive blocks
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(raw[:cut])
        with pytest.warns(RuntimeWarning, match=f"cut{cut}.tar is damaged after {kept} samples"):
            samples = scan_shard(str(path))["samples"]
        assert [s[0] for s in samples] == [f"{i:03d}" for i in range(kept)]
        assert [s[3] for s in samples] == list(range(kept))
    for _ in range(2):  # the first call scans and saves the index, the second reads it: both say what is lost
        with pytest.warns(RuntimeWarning, match=f"cut{4 * sample}.tar is damaged after 4 samples"):
            assert len(shard_index(str(tmp_path / f"cut{4 * sample}.tar"))["samples"]) == 4
    assert (tmp_path / f"cut{4 * sample}.tar.idx.json").exists()
    # the trainer reads the index on every rank under dist.rank0_warnings: said by rank 0 alone, not once per rank
    for rank, said in ((0, 1), (1, 0)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with rank0_warnings(Env(rank, 2, torch.device("cpu"))):
                ShardSamples([str(tmp_path / f"cut{4 * sample}.tar")])
                warnings.warn("a rank's own")  # from elsewhere: every rank says it
        assert len([w for w in seen if "is damaged after 4 samples" in str(w.message)]) == said
        assert len([w for w in seen if "a rank's own" in str(w.message)]) == 1


def test_class_count_comes_from_the_manifest_and_a_stray_label_is_caught(written, tmp_path):
    """WebDataset carries no class list: with the writer's manifest above the shards, its classes set the head and
    a label past them is refused by name; without one the head is the largest label + 1, and a class index no
    training sample has (a mistyped .cls) is warned about instead of silently widening the head."""
    _, dst, _, _ = written
    assert ShardSource(str(dst), None, 16).num_classes == 3
    copy = tmp_path / "wds"
    shutil.copytree(dst, copy)
    _tar(copy / "train" / "zz-stray.tar", [("s.jpg", b"x"), ("s.cls", b"7")])
    with pytest.raises(ValueError, match=r"training sample .*zz-stray.tar:s has class index 7, but the shards' "
                                         r"manifest.json lists 3 classes \(1 such sample"):
        ShardSource(str(copy), None, 16)
    (copy / "manifest.json").unlink()
    with pytest.warns(RuntimeWarning, match=r"4 of the class indices 0..7 have no training sample \(the first: 3\)"):
        assert ShardSource(str(copy), None, 16).num_classes == 8
    (copy / "train" / "zz-stray.tar").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ShardSource(str(copy), None, 16).num_classes == 3


def test_a_huge_class_index_without_a_manifest_is_refused_by_name(tmp_path):
    """Without a manifest the head has the largest .cls + 1 classes. A mistyped one far above the classes the shards
    show is refused naming the sample (2000000000 had numpy allocate 16 GB to list the missing classes; 5000
    among 4 classes built a 5001-way head with a warning); ImageNet-21k's 21841 classes, a subset of it that shows
    every 7th class, and a modest stray label are taken, the last two with the warning."""
    def shards(name, labels):
        path = tmp_path / f"{name}.tar"
        _tar(path, [m for i, label in enumerate(labels) for m in ((f"k{i}.jpg", b"x"), (f"k{i}.cls", b"%d" % label))])
        return ShardSamples([str(path)])

    val = shards("val", [0, 1, 2, 3])
    for huge in (2000000000, 5000):
        with pytest.raises(ValueError, match=rf"training sample \S*train{huge}.tar:k6 has class index {huge}, but the "
                                             r"shards hold only 5 distinct class indices: a mistyped .cls\?"):
            count_classes(shards(f"train{huge}", [0, 1, 2, 3, 0, 1, huge]), val)
    with pytest.raises(ValueError, match=r"held-out sample \S*valhuge.tar:k4 has class index 5000"):
        count_classes(val, shards("valhuge", [0, 1, 2, 3, 5000]))
    with pytest.warns(RuntimeWarning,
                      match=r"995 of the class indices 0..999 have no training sample \(the first: 4\)"):
        assert count_classes(shards("stray", [0, 1, 2, 3, 999]), val) == 1000
    subset = shards("subset", range(0, 21841, 7))
    with pytest.warns(RuntimeWarning,
                      match=r"18720 of the class indices 0..21840 have no training sample \(the first: 1"):
        assert count_classes(subset, subset) == 21841
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_classes(shards("in21k", range(21841)), val) == 21841


def test_a_folder_of_shards_takes_its_val_folder_and_their_classes_must_agree(written, tmp_path):
    """A flat folder of .tar files (what the writer gives for a SRC without train/) is shards, with --val-data a
    pattern or another folder; held-out shards whose manifest numbers the classes otherwise (another writer run that
    found other classes) are refused, where their labels would silently name other classes."""
    _, dst, _, _ = written
    from fastvit.data import make_source
    source = make_source(str(dst / "train"), 16, workers=0, val_data=str(dst / "val"))
    assert isinstance(source, ShardSource) and source.num_classes == 3 and len(source.test) == 18
    other = tmp_path / "other"
    shutil.copytree(dst / "val", other / "val")
    manifest = json.loads((dst / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(dict(manifest, classes=["cat", "owl"])))
    with pytest.raises(ValueError, match=r"held-out shards' manifest.json lists other classes than the training "
                                         r"shards' \(index 1: 'owl' there, 'dog' in training; 2 vs 3 classes\)"):
        ShardSource(str(dst / "train"), str(other / "val"), 16)


def test_training_on_shards_folder_and_pattern_split_and_resume(written, tmp_path):
    """Shards as a folder and as a pattern + --val-data train identically; 1 x 6 and 3 micro-batches of 2 give the
    same losses; a run stopped at step 2 and resumed repeats the uninterrupted one bitwise, dropout on (the truncated
    JPEG is replaced and counted in all of them)."""
    _, dst, _, _ = written
    common = dict(TINY, steps=4, global_batch=6, seed=2, max_bad_frac=0.5)
    shards = sorted((dst / "train").glob("*.tar"))
    pattern = str(dst / "train" / f"train-{{000000..{len(shards) - 1:06d}}}.tar")
    val = str(dst / "val" / f"val-{{000000..{len(list((dst / 'val').glob('*.tar'))) - 1:06d}}}.tar")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        a = train(TrainConfig(**common, data=str(dst), out=str(tmp_path / "a"), micro_batch=6))
        train(TrainConfig(**common, data=pattern, val_data=val, out=str(tmp_path / "b"), micro_batch=2))

        def crash(step, row):
            if step == 2:
                raise KeyboardInterrupt

        # dropout on: the loader must leave the global generator (the dropout stream) alone
        resumed = dict(common, data=str(dst), out=str(tmp_path / "c"), micro_batch=6, save_every=2, dropout=0.1)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**resumed), on_step_end=crash)
        train(TrainConfig(**resumed))
        train(TrainConfig(**dict(resumed, out=str(tmp_path / "d"))))
        # the folder run resumed with the same shards as patterns: the same data (it was refused as another run);
        # fewer shards are another run's data
        later = dict(common, steps=5, data=pattern, val_data=val, out=str(tmp_path / "a"), micro_batch=6)
        assert train(TrainConfig(**later))["step"] == 5
        fewer = pattern.replace(f"..{len(shards) - 1:06d}", f"..{len(shards) - 2:06d}")
        with pytest.raises(ValueError, match="holds checkpoints of another run \\(--data"):
            train(TrainConfig(**dict(later, steps=6, data=fewer)))
        # the bad-sample limit names the shard tool that lists every undecodable sample, with the folder trained on
        with pytest.raises(BadSampleLimit, match=rf"Repair or remove them \(python -m fastvit.data.shards --verify "
                                                 rf"{re.escape(str(dst))} lists every undecodable sample\)"):
            train(TrainConfig(**dict(common, data=str(dst), out=str(tmp_path / "e"), max_bad_frac=0.0)))
    ra, rb, rc, rd = ([r for r in rows(tmp_path / x) if "loss" in r and r["step"] <= 4] for x in "abcd")
    assert [r["loss"] for r in rb] == pytest.approx([r["loss"] for r in ra], rel=1e-5)
    assert [(r["loss"], r["bad_samples"]) for r in rc] == [(r["loss"], r["bad_samples"]) for r in rd]
    assert [r["bad_samples"] for r in rd] == [r["bad_samples"] for r in ra]
    assert 0 <= a["top1"] <= 1
    assert json.loads((tmp_path / "d" / "config.json").read_text())["train"]["data"] == str(dst)
    assert [r["bad_samples"] for r in rb] == [r["bad_samples"] for r in ra] and ra[-1]["bad_samples"] >= 1
