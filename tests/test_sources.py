"""Sample data in the real layouts, and reading them back: layouts, labels, bad files."""
from __future__ import annotations

import hashlib
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.data.source import discover, known_class_names, parse_devkit
from pipeline.data.sample_data import generate, pick_classes
from pipeline.data.shards import plan_shards
from pipeline.config import WriterSettings
from pipeline.storage import Storage

pytestmark = pytest.mark.slow   # real services / Ray clusters


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_sample_layouts_look_like_imagenet(sample_sets):
    folders, kaggle = Path(sample_sets["folders"]), Path(sample_sets["kaggle"])
    devkit, tars = Path(sample_sets["devkit"]), Path(sample_sets["tars"])
    wnid = pick_classes(4)[0]
    assert wnid == "n01440764" and known_class_names()[wnid] == "tench, Tinca tinca"
    assert len(list((folders / "train" / wnid).glob(f"{wnid}_*.JPEG"))) == 6 + 2  # + png, empty
    assert len(list((folders / "val").glob("n*/ILSVRC2012_val_*.JPEG"))) == 12
    assert len(list((kaggle / "ILSVRC/Data/CLS-LOC/val").glob("ILSVRC2012_val_000000??.JPEG"))) == 12
    assert (kaggle / "LOC_val_solution.csv").read_text().startswith("ImageId,PredictionString\n")
    assert (kaggle / "LOC_synset_mapping.txt").read_text().startswith("n01440764 tench, Tinca tinca\n")
    assert (devkit / "ILSVRC2012_devkit_t12/data/meta.mat").exists()
    assert len(list((devkit / "val").glob("ILSVRC2012_val_*.JPEG"))) == 12
    with tarfile.open(tars / "ILSVRC2012_img_train.tar") as t:
        inner = t.getnames()
        assert inner == sorted(f"{w}.tar" for w in pick_classes(4))
        with tarfile.open(fileobj=t.extractfile(inner[0])) as c:
            assert all(n.startswith(f"{wnid}_") and n.endswith(".JPEG") for n in c.getnames())
    sizes = []
    for p in (folders / "train").rglob("*.JPEG"):
        try:
            with Image.open(p) as im:
                sizes.append(im.size)
        except OSError:
            pass
    assert min(min(s) for s in sizes) >= 160 and max(max(s) for s in sizes) <= 500
    assert len({w / h for w, h in sizes}) > 5   # varied aspect ratios


def test_sample_data_is_reproducible(tmp_path):
    a = generate(str(tmp_path / "a"), "tars", classes=3, train_per_class=2, val_per_class=1, seed=7)
    time.sleep(1.1)   # a clock that moved on must not change a byte (gzip and .mat headers)
    generate(str(tmp_path / "b"), "tars", classes=3, train_per_class=2, val_per_class=1, seed=7)
    generate(str(tmp_path / "c"), "tars", classes=3, train_per_class=2, val_per_class=1, seed=8)
    assert a["train_images"] == 6
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b") != tree_digest(tmp_path / "c")


def test_every_layout_gives_the_same_labels(sample_sets):
    """The same seed writes the same images; each layout's own label source must agree."""
    def val_labels(layout):
        src = discover(Storage(), sample_sets[layout])
        assert src.layout == layout
        return {Path(im.path).name: im.wnid for im in src.splits["val"]}, src

    reference, ref_src = val_labels("folders")
    for layout in ("kaggle", "devkit", "tars"):
        labels, src = val_labels(layout)
        assert labels == reference, layout
        assert src.classes == ref_src.classes
        assert len(src.splits["train"]) == len(ref_src.splits["train"]) == 4 * 6 + 5


def test_devkit_ids_are_not_wnid_order(sample_sets):
    root = Path(sample_sets["devkit"]) / "ILSVRC2012_devkit_t12/data"
    gt = (root / "ILSVRC2012_validation_ground_truth.txt").read_text()
    labels, names = parse_devkit(gt, (root / "meta.mat").read_bytes())
    from scipy.io import loadmat

    synsets = loadmat(root / "meta.mat", squeeze_me=True)["synsets"]
    leaves = sorted((int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in synsets if s["num_children"] == 0)
    assert [w for _, w in leaves] != sorted(w for _, w in leaves)   # a reader assuming order fails
    assert "n00001740" not in names   # the inner WordNet node is not a class
    assert len(labels) == 12 and set(labels.values()) <= {w for _, w in leaves}


def test_shard_plan_is_deterministic_and_mixes_classes(sample_sets):
    src = discover(Storage(), sample_sets["folders"])
    a = plan_shards(src, WriterSettings(), shard_size=8)
    b = plan_shards(discover(Storage(), sample_sets["folders"]), WriterSettings(), shard_size=8)
    assert [p.fingerprint for p in a] == [p.fingerprint for p in b]
    assert len(set(a[0].labels)) > 1   # shuffled across classes, not one class per shard
    c = plan_shards(src, WriterSettings(jpeg_quality=80), shard_size=8)
    assert a[0].fingerprint != c[0].fingerprint


def test_unknown_layout_and_split_are_user_errors(sample_sets):
    with pytest.raises(UserError, match="unknown split 'test'"):
        discover(Storage(), sample_sets["folders"], splits=["test"])
    with pytest.raises(UserError, match=r"--layout: unknown layout 'zip' \(choose from folders"):
        discover(Storage(), sample_sets["folders"], layout="zip")


def test_multipart_upload_for_large_files(s3, bucket, tmp_path):
    from pipeline.storage import S3Settings

    store = Storage(S3Settings(s3.endpoint, s3.access_key, s3.secret_key,
                               multipart_threshold=5 * 1024 * 1024))
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(12 * 1024 * 1024))
    s3_storage = store
    s3_storage.upload_file(big, f"s3://{bucket}/big.bin")
    etag = s3_storage.client.head_object(Bucket=bucket, Key="big.bin")["ETag"]
    assert etag.strip('"').endswith("-3")   # three parts
    s3_storage.download_file(f"s3://{bucket}/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
