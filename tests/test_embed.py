"""explorer.stages.embed / explorer.stages.models: bundled weights (lite0/1/2), offline-only weights,
checkpoints, model keys, embed_paths through the store, the engines, devices."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

try:
    import _imagegen as gen
except ImportError:  # tests/ made a package
    from tests import _imagegen as gen

from explorer.stages import embed as E
from explorer.stages import models as M
from explorer.stages.engines import decode as D
from explorer.stages.embed import (
    DEFAULT_MODEL,
    ModelWeightsError,
    Preprocessor,
    embed_images,
    embed_paths,
    load_model,
    model_key,
)
from explorer.stages.images import load_image

TINY = "test_efficientnet"  # timm's own test model (its weights: conftest.py's tiny_ckpt)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Like embed_paths: one torch thread (torch's spinning threads crawl on a busy CPU)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture()
def empty_hubs(monkeypatch, tmp_path):
    """Point the HF hub and torch hub caches at empty folders."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    return tmp_path


# --------------------------------------------------------------------------- weights
@pytest.mark.cpu_check
def test_bundled_default_weights_are_real(no_network):
    model, cfg = load_model(num_classes=None)  # keep the ImageNet classifier
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["crop_pct"] == 0.875
    prep = Preprocessor(cfg)
    imgs = [Image.fromarray(gen.photo("chelsea")), Image.fromarray(gen.photo("coffee"))]
    with torch.inference_mode():
        logits = model(prep.to_tensor(np.stack([prep(im) for im in imgs])))
    top = logits.argmax(1).tolist()
    assert 281 <= top[0] <= 285, f"chelsea classified as {top[0]}, not a cat"
    assert top[1] in (504, 967, 968), f"coffee classified as {top[1]}"
    # without the classifier the model gives the pooled pre-classifier feature: 1280-d
    model.reset_classifier(0)
    feats = embed_images(imgs, model, cfg)
    assert feats.shape == (2, 1280) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and not np.allclose(feats[0], feats[1])
    assert E._resolve_name("efficientnet_lite0") == DEFAULT_MODEL
    # the bfloat16 path ("auto" on CPUs with native bf16) keeps the classes
    model2, _ = load_model(num_classes=None)
    runner = M.Runner(model2, 2, (224, 224), jit=False, precision="bfloat16")
    x = prep.to_tensor(np.stack([prep(im) for im in imgs]))
    assert runner(x).argmax(1).tolist() == top


def test_preprocessing_matches_timm_transform():
    import timm.data

    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3,
           "std": (0.5,) * 3, "crop_pct": 0.875, "crop_mode": "center"}
    tf = timm.data.create_transform(**cfg)
    prep = Preprocessor(cfg)
    src = gen.photo("astronaut")
    for shape in [(533, 400), (400, 533), (300, 451), (150, 120), (224, 224), (1000, 37)]:
        img = Image.fromarray(src).resize(shape[::-1])
        want = tf(img).unsqueeze(0)
        got = prep.to_tensor(prep(img)[None])
        assert got.shape == want.shape
        diff = (got - want).abs()
        # at most a rounding step in a few pixels (1 / 255 / 0.5 ~ 0.008)
        assert diff.mean() < 3e-3 and diff.max() < 0.05, shape


@pytest.mark.parametrize("cfg", [
    {"input_size": (3, 160, 200), "interpolation": "bilinear", "crop_pct": 0.9,
     "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_mode": "center"},
    {"input_size": (3, 96, 96), "interpolation": "bicubic", "crop_pct": 1.0,
     "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_mode": "squash"},
])
def test_other_data_configs_follow_timm(cfg):
    import timm.data

    tf = timm.data.create_transform(**cfg)
    prep = Preprocessor(cfg)
    img = Image.fromarray(gen.photo("rocket")).resize((300, 450))
    want = tf(img).unsqueeze(0)
    got = prep.to_tensor(prep(img)[None])
    assert got.shape == want.shape and (got - want).abs().max() < 1e-3


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        load_model("tf_efficientnet_lite")
    with pytest.raises(ValueError, match="unknown timm model"):
        load_model("no_such_model_at_all_xyz")


def test_model_without_local_weights_fails_fast_offline(no_network, empty_hubs):
    with pytest.raises(ModelWeightsError, match="--checkpoint"):
        load_model("resnet18")
    with pytest.raises(ModelWeightsError, match="--checkpoint"):
        embed_paths([], model=TINY, progress=False)  # even with nothing to embed


def test_weights_in_local_hf_cache_are_used(no_network, empty_hubs, tiny_ckpt):
    # lay out a hub cache entry as huggingface_hub does: refs/main -> snapshots/<sha>/file
    repo = empty_hubs / "hf" / "models--timm--test_efficientnet.r160_in1k"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snap / "pytorch_model.bin").write_bytes(tiny_ckpt.read_bytes())
    model, cfg = load_model(TINY)
    want = torch.load(tiny_ckpt, weights_only=True)
    got = model.state_dict()
    assert torch.equal(got["conv_stem.weight"], want["conv_stem.weight"])
    assert "classifier.weight" not in got  # embedding model
    assert cfg["input_size"] == (3, 160, 160)


def test_checkpoint_loads_and_bad_checkpoints_are_clear(tiny_ckpt, tmp_path, no_network):
    model, cfg = load_model(TINY, checkpoint=tiny_ckpt)
    want = torch.load(tiny_ckpt, weights_only=True)
    assert torch.equal(model.state_dict()["bn2.weight"], want["bn2.weight"])
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 160, 160)).shape == (1, model.num_features)
    full, _ = load_model(TINY, checkpoint=tiny_ckpt, num_classes=None)
    assert full.get_classifier().out_features == 1000
    # timm training checkpoints ({"state_dict": ..., "module." prefix}) work too
    wrapped = tmp_path / "train.pth.tar"
    import argparse

    torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1),
                "state_dict": {f"module.{k}": v for k, v in want.items()}}, wrapped)
    load_model(TINY, checkpoint=wrapped)

    with pytest.raises(ModelWeightsError, match="not found"):
        load_model(TINY, checkpoint=tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelWeightsError, match="cannot read checkpoint"):
        load_model(TINY, checkpoint=junk)
    import timm

    other = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), other)
    with pytest.raises(ModelWeightsError, match="do not fit"):
        load_model(TINY, checkpoint=other)
    with pytest.raises(ModelWeightsError, match="not found"):
        embed_paths([], model=TINY, checkpoint=tmp_path / "missing.pth", progress=False)


def test_parameters_are_validated(tmp_path):
    for kw, word in [({"batch_size": 0}, "batch_size"), ({"thumb_size": -1}, "thumb_size"),
                     ({"precision": "fp8"}, "precision"),
                     ({"jit": "yes"}, "jit"),
                     ({"workers": 0}, "workers"), ({"threads": 0}, "threads"),
                     ({"device": "tpu"}, "tpu"), ({"engine": "spark"}, "spark"),
                     ({"max_file_mb": 0}, "max_file_mb")]:
        with pytest.raises(ValueError, match=word):
            embed_paths([], progress=False, **kw)


# --------------------------------------------------------------------------- embed_paths
@pytest.fixture()
def folder(tmp_path):
    """10 good images (JPEG/PNG, one EXIF-rotated) and 3 bad files, in natural order."""
    root = tmp_path / "imgs"
    paths = gen.image_folder(root, 8, size=120)
    paths.append(gen.save(gen.variant(9, 90)[:, :60], root / "c" / "img8.png"))
    paths.append(gen.with_orientation(gen.variant(10, 120)[:80], root / "c" / "img9.jpg", 6))
    bad = [gen.empty(root / "c" / "x1.jpg"), gen.truncated(root / "c" / "x2.jpg"),
           gen.not_an_image(root / "c" / "x3.jpg")]
    return root, paths, bad


@pytest.mark.cpu_check
def test_embed_paths_skips_bad_files_and_keeps_order(folder, tiny_ckpt):
    root, good, bad = folder
    paths = [good[0], bad[0], *good[1:5], bad[1], *good[5:], bad[2]]
    thumbs = {}
    res = embed_paths(paths, model=TINY, checkpoint=tiny_ckpt, batch_size=4, thumb_size=64,
                      sink=Sink(thumbs), progress=False, precision="float32")
    bad_idx = [1, 6, len(paths) - 1]
    assert res.ok.tolist() == [i for i in range(len(paths)) if i not in bad_idx]
    assert [e[0] for e in res.errors] == [str(b) for b in bad]
    assert [e[1] for e in res.errors] == ["empty file", "truncated file", "not an image"]
    assert res.embeddings.shape == (len(good), 256) and res.embeddings.dtype == np.float32
    assert res.n_cached == 0 and res.n_embedded == len(good)
    assert res.model_info["name"] == TINY and res.model_info["embedding_dim"] == 256
    assert res.model_info["precision"] == "float32"
    # sizes are original sizes, after EXIF rotation
    sizes = list(zip(res.width.tolist(), res.height.tolist()))
    assert sizes[:8] == [(120, 120)] * 8 and sizes[8] == (60, 90) and sizes[9] == (80, 120)
    # one thumbnail per good image, small, right aspect
    assert sorted(thumbs) == res.ok.tolist()
    assert all(max(t.size) <= 64 and t.mode == "RGB" for t in thumbs.values())
    assert thumbs[res.ok[9]].size == (43, 64)
    # the same vectors as embedding the decoded images directly (and in input order)
    model, cfg = load_model(TINY, checkpoint=tiny_ckpt)
    direct = embed_images([load_image(p).image for p in good], model, cfg)
    np.testing.assert_allclose(res.embeddings, direct, rtol=1e-3, atol=1e-4)
    assert len(set(res.hashes)) == len(good)
    # bfloat16 (torch runs it on any CPU, natively or emulated): close to float32, and the
    # run says so (no silent fallback: section 8 #9)
    bf = embed_paths(good, model=TINY, checkpoint=tiny_ckpt, batch_size=4, progress=False,
                     precision="bfloat16")
    assert bf.model_info["precision"] == "bfloat16"
    cos = (bf.embeddings * direct).sum(1) / (
        np.linalg.norm(bf.embeddings, axis=1) * np.linalg.norm(direct, axis=1))
    assert cos.min() > 0.98 and not np.array_equal(bf.embeddings, direct)
    assert bf.embeddings.dtype == np.float32


@pytest.mark.cpu_check
def test_the_cpu_check_is_forced_and_auto_is_float32_on_every_cpu(folder, tiny_ckpt,
                                                                   monkeypatch, cpu_bf16):
    """EXPLORER_CPU_BF16 forces the CPU check (tests/_cpucheck.py runs every cpu_check test
    under "0" and "1": this test proves each answer is the one in force); either way "auto"
    embeds in float32 with onnxruntime (bf16 lost too much on low-texture images), and an
    asked-for bf16 run says whether it ran natively. (Broken once: with "auto" back to bf16
    on native CPUs, the "1" case fails.)"""
    native = cpu_bf16
    assert native in ("0", "1") and os.environ[M.CPU_BF16_ENV] == native
    assert M.cpu_runs_bf16() is (native == "1")
    assert M.resolve_precision("auto", "cpu") == "float32"
    assert M.resolve_precision("auto", "mps") == "float32"
    _, good, _ = folder
    auto = embed_paths(good[:2], model=TINY, checkpoint=tiny_ckpt, progress=False)
    assert (auto.model_info["precision"], auto.model_info["runtime"]) == ("float32",
                                                                          "onnxruntime")
    assert "cpu_bf16_native" not in auto.model_info
    bf = embed_paths(good[:2], model=TINY, checkpoint=tiny_ckpt, progress=False,
                     precision="bfloat16")
    assert bf.model_info["precision"] == "bfloat16"
    assert bf.model_info["cpu_bf16_native"] is (native == "1")
    monkeypatch.setenv(M.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="EXPLORER_CPU_BF16.*'yes'"):
        M.cpu_runs_bf16()


@pytest.mark.cpu_check
def test_embed_paths_is_deterministic(folder, tiny_ckpt):
    _, good, _ = folder
    a = embed_paths(good, model=TINY, checkpoint=tiny_ckpt, batch_size=4, progress=False,
                    precision="float32")
    b = embed_paths(good, model=TINY, checkpoint=tiny_ckpt, batch_size=4, progress=False,
                    workers=1, precision="float32")
    assert np.array_equal(a.embeddings, b.embeddings)
    assert a.hashes == b.hashes
    assert a.model_info["runtime"] == "onnxruntime"  # "auto" runtime in float32
    assert a.model_info["model_key"].split("|")[3] == "onnx"
    # torch, eager and traced + frozen, gives the same vectors (up to float rounding)
    e = embed_paths(good, model=TINY, checkpoint=tiny_ckpt, batch_size=4, progress=False,
                    runtime="torch")
    assert e.model_info["runtime"] == "torch" and e.model_info["jit"] is False  # small run
    c = embed_paths(good, model=TINY, checkpoint=tiny_ckpt, batch_size=4, progress=False,
                    jit=True)
    assert c.model_info["jit"] is True and c.model_info["runtime"] == "torch"
    np.testing.assert_allclose(c.embeddings, e.embeddings, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(a.embeddings, e.embeddings, rtol=1e-3, atol=1e-4)


class Sink:
    """Collects thumbnails; ``want`` says which indices need one (default: all)."""

    def __init__(self, got=None, want=lambda i: True):
        self.got = {} if got is None else got
        self.want = want

    def need(self, i, h):
        return self.want(i)

    def __call__(self, i, h, thumb):
        self.got[i] = thumb


def test_store_second_run_embeds_only_new_files(folder, tiny_ckpt, tmp_path, monkeypatch):
    _, good, _ = folder
    store = tmp_path / "demo.store"
    first = embed_paths(good[:7], model=TINY, checkpoint=tiny_ckpt, batch_size=4,
                        store=store, progress=False)
    assert first.n_cached == 0 and first.n_decoded == 7

    embedded = []
    for cls in (M.Runner, M.OnnxRunner):
        def counting(self, x, real_call=cls.__call__):
            out = real_call(self, x)
            embedded.append(len(out))
            return out

        monkeypatch.setattr(cls, "__call__", counting)
    sink = Sink(want=lambda i: i >= 5)
    second = embed_paths(good, model=TINY, checkpoint=tiny_ckpt, batch_size=4,
                         store=store, sink=sink, progress=False)
    assert second.n_cached == 7 and second.n_embedded == 3
    assert sum(embedded) == 3
    assert sorted(sink.got) == list(range(5, 10))
    np.testing.assert_array_equal(second.embeddings[:7], first.embeddings)
    assert second.width.tolist() == first.width.tolist() + [120, 60, 80]
    assert second.height.tolist()[7:] == [120, 90, 120]
    np.testing.assert_array_equal(second.phash[:7], first.phash)
    np.testing.assert_allclose(second.stats[:7], first.stats)

    # everything stored, files unchanged, no thumbnail wanted: no read, no decode, no model
    decoded = []
    monkeypatch.setattr(D, "decode_image", lambda *a, **k: decoded.append(1))
    monkeypatch.setattr(D, "read_file", lambda *a, **k: pytest.fail("file read"))
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    third = embed_paths(good, model=TINY, checkpoint=tiny_ckpt, store=store, progress=False)
    assert third.n_cached == len(good) and third.n_read == 0 and not decoded
    np.testing.assert_array_equal(third.embeddings, second.embeddings)
    assert third.height.tolist() == second.height.tolist()
    np.testing.assert_array_equal(third.phash, second.phash)


def test_vectors_false_leaves_them_in_the_store_only(folder, tiny_ckpt, tmp_path):
    from explorer.stages.store import Store

    _, good, _ = folder
    res = embed_paths(good[:5], model=TINY, checkpoint=tiny_ckpt, store=tmp_path / "s",
                      progress=False, vectors=False)
    assert res.embeddings is None and len(res.ok) == 5 and res.width.tolist()[0] > 0
    ref = embed_paths(good[:5], model=TINY, checkpoint=tiny_ckpt, progress=False)
    with Store(tmp_path / "s") as st:
        mid = st.model_id(res.model_info["model_key"])
        got = st.read(mid, st.rows(mid, res.hashes))
    np.testing.assert_allclose(got, ref.embeddings, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="store"):
        embed_paths(good[:1], model=TINY, checkpoint=tiny_ckpt, progress=False, vectors=False)


def test_a_changed_file_is_read_again(folder, tiny_ckpt, tmp_path):
    _, good, _ = folder
    store = tmp_path / "s.store"
    a = embed_paths(good[:3], model=TINY, checkpoint=tiny_ckpt, store=store, progress=False)
    gen.save(gen.variant(30, 120), good[1])  # replaced in place: new content, new mtime
    b = embed_paths(good[:3], model=TINY, checkpoint=tiny_ckpt, store=store, progress=False)
    assert b.n_read == 1 and b.n_cached == 2 and b.hashes[1] != a.hashes[1]
    assert not np.array_equal(b.embeddings[1], a.embeddings[1])


def test_store_is_per_model_key(folder, tiny_ckpt, tmp_path):
    _, good, _ = folder
    store = tmp_path / "c.store"
    embed_paths(good[:4], model=TINY, checkpoint=tiny_ckpt, store=store, progress=False)
    # another checkpoint = another model key: nothing reused
    other = tmp_path / "other.pth"
    sd = torch.load(tiny_ckpt, weights_only=True)
    sd["conv_stem.weight"] = sd["conv_stem.weight"] * 2
    torch.save(sd, other)
    res = embed_paths(good[:4], model=TINY, checkpoint=other, store=store, progress=False)
    assert res.n_cached == 0
    # the same weights under another file name: the same key (content, not name: L3)
    copy = tmp_path / "renamed.pth"
    copy.write_bytes(tiny_ckpt.read_bytes())
    res = embed_paths(good[:4], model=TINY, checkpoint=copy, store=store, progress=False)
    assert res.n_cached == 4


@pytest.mark.cpu_check
def test_model_key_covers_weights_content_precision_and_jit(tiny_ckpt, tmp_path):
    keys = {model_key(TINY, tiny_ckpt, p, j) for p in ("float32", "bfloat16")
            for j in (False, True, "onnx")}
    assert len(keys) == 6
    with pytest.raises(ValueError, match="'tensorrt'"):
        model_key(TINY, tiny_ckpt, "float32", "tensorrt")
    copy = tmp_path / "copy.pth"
    copy.write_bytes(tiny_ckpt.read_bytes())
    assert model_key(TINY, copy, "float32") == model_key(TINY, tiny_ckpt, "float32")
    assert model_key() != model_key("tf_efficientnet_lite1")


@pytest.mark.cpu_check
def test_jit_auto_follows_what_the_store_holds(folder, tiny_ckpt, tmp_path):
    """A few new images next to many traced vectors reuse them (no eager/jit split, L4)."""
    _, good, _ = folder
    store = tmp_path / "j.store"
    a = embed_paths(good[:8], model=TINY, checkpoint=tiny_ckpt, store=store, jit=True,
                    progress=False)
    assert a.model_info["jit"] is True
    b = embed_paths(good, model=TINY, checkpoint=tiny_ckpt, store=store, progress=False)
    assert b.n_cached == 8 and b.model_info["jit"] is True


@pytest.mark.cpu_check
def test_runtime_auto_keeps_the_kind_of_vectors_the_store_holds(folder, tiny_ckpt, tmp_path):
    """A store filled by torch stays torch (no re-embedding after onnxruntime is installed);
    a fresh store on the CPU gets onnxruntime; asking for onnx keys its own vectors."""
    _, good, _ = folder
    store = tmp_path / "r.store"
    a = embed_paths(good[:6], model=TINY, checkpoint=tiny_ckpt, store=store, runtime="torch",
                    progress=False, precision="float32")
    assert a.model_info["runtime"] == "torch"
    b = embed_paths(good, model=TINY, checkpoint=tiny_ckpt, store=store, progress=False,
                    precision="float32")
    assert b.n_cached == 6 and b.model_info["runtime"] == "torch"
    c = embed_paths(good, model=TINY, checkpoint=tiny_ckpt, store=store, runtime="onnx",
                    progress=False, precision="float32")
    assert c.n_cached == 0 and c.model_info["runtime"] == "onnxruntime"
    np.testing.assert_allclose(c.embeddings, b.embeddings, rtol=1e-3, atol=1e-4)
    fresh = embed_paths(good[:3], model=TINY, checkpoint=tiny_ckpt,
                        store=tmp_path / "fresh.store", progress=False,
                        precision="float32")
    assert fresh.model_info["runtime"] == "onnxruntime"


@pytest.mark.cpu_check
def test_runtime_onnx_is_refused_where_it_cannot_run(folder, tiny_ckpt):
    _, good, _ = folder
    with pytest.raises(ValueError, match="'gpu'"):
        embed_paths(good[:2], model=TINY, checkpoint=tiny_ckpt, runtime="gpu", progress=False)
    with pytest.raises(ValueError, match="bfloat16"):
        embed_paths(good[:2], model=TINY, checkpoint=tiny_ckpt, runtime="onnx",
                    precision="bfloat16", progress=False)


def test_the_onnx_export_is_cached_and_a_bad_cache_file_is_replaced(folder, tiny_ckpt,
                                                                    tmp_path, monkeypatch):
    _, good, _ = folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a = embed_paths(good[:3], model=TINY, checkpoint=tiny_ckpt, progress=False,
                    precision="float32")
    files = list((tmp_path / "cache" / "bulk-image-explorer" / "onnx").glob("*.onnx"))
    assert len(files) == 1 and a.model_info["runtime"] == "onnxruntime"
    exports = []
    real = M.OnnxRunner._export
    monkeypatch.setattr(M.OnnxRunner, "_export",
                        staticmethod(lambda *x: exports.append(1) or real(*x)))
    b = embed_paths(good[:3], model=TINY, checkpoint=tiny_ckpt, progress=False,
                    precision="float32")
    assert exports == [] and np.array_equal(a.embeddings, b.embeddings)  # read from the cache
    files[0].write_bytes(b"not an onnx graph")
    c = embed_paths(good[:3], model=TINY, checkpoint=tiny_ckpt, progress=False,
                    precision="float32")
    assert exports == [1] and np.array_equal(a.embeddings, c.embeddings)
    assert files[0].read_bytes() != b"not an onnx graph"  # written anew


def test_a_model_that_does_not_export_keeps_torch(folder, tiny_ckpt, tmp_path, monkeypatch):
    _, good, _ = folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no cached export

    def no_export(*a, **k):
        raise RuntimeError("the model does not export to ONNX: test")

    monkeypatch.setattr(M.OnnxRunner, "_export", staticmethod(no_export))
    res = embed_paths(good[:3], model=TINY, checkpoint=tiny_ckpt, progress=False,
                      precision="float32")
    assert res.model_info["runtime"] == "torch" and len(res.embeddings) == 3
    with pytest.raises(RuntimeError, match="does not export"):
        embed_paths(good[:3], model=TINY, checkpoint=tiny_ckpt, runtime="onnx", progress=False,
                    precision="float32")


def test_files_over_the_size_limit_are_refused_unread(folder, tiny_ckpt, tmp_path, monkeypatch):
    _, good, _ = folder
    big = tmp_path / "big.jpg"
    with open(big, "wb") as fh:  # a sparse 3 MB file that claims to be a JPEG
        fh.write(b"\xff\xd8\xff")
        fh.truncate(3 * 2**20)
    real = D.read_file
    monkeypatch.setattr(D, "read_file", lambda p, m=None: pytest.fail("big file read")
                        if str(p) == str(big) else real(p, m))
    res = embed_paths([good[0], big], model=TINY, checkpoint=tiny_ckpt, max_file_mb=1,
                      progress=False)
    assert res.ok.tolist() == [0]
    assert res.errors[0][0] == str(big) and res.errors[0][1].startswith("file too large")


def test_loader_engine_gives_the_thread_engine_vectors(folder, tiny_ckpt, tmp_path):
    """The DataLoader engine (worker processes, used on CUDA) run on CPU."""
    _, good, bad = folder
    paths = [*good, *bad]
    kw = dict(model=TINY, checkpoint=tiny_ckpt, batch_size=4, progress=False, precision="float32")
    threads = embed_paths(paths, **kw)
    procs = embed_paths(paths, loader=True, workers=2, store=tmp_path / "l.store", **kw)
    assert procs.model_info["loader"] is True
    assert procs.ok.tolist() == threads.ok.tolist() and procs.errors == threads.errors
    np.testing.assert_allclose(procs.embeddings, threads.embeddings, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(procs.phash, threads.phash)


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_decode_jpeg_batch_sizes_thumbnails_and_bad_bytes(folder):
    _, good, bad = folder
    model_cfg = load_model(DEFAULT_MODEL)[1]
    prep = Preprocessor(model_cfg)
    datas = [good[0].read_bytes(), good[9].read_bytes(), b"\xff\xd8\xff not a jpeg"]
    sizes, x, thumbs = E.decode_jpeg_batch(datas, prep, 64, "cpu")
    # the original sizes after EXIF rotation (img9.jpg is stored 120 x 80, orientation 6)
    assert sizes == [(120, 120), (80, 120), None] and thumbs[2] is None
    assert thumbs[0].shape == (64, 64, 3) and thumbs[1].shape == (64, 43, 3)
    assert x.shape == (2, prep.height, prep.width, 3) and x.dtype == torch.uint8
    # the same pixels as the PIL path, up to resampling differences
    ref = prep(load_image(good[9]).image)
    assert np.abs(x[1].numpy().astype(int) - ref.astype(int)).mean() < 4


def test_gpu_decode_path_on_cpu_gives_the_cpu_vectors(folder, tmp_path):
    """gpu_decode (torchvision.io.decode_jpeg on the model's device), run on the CPU: the
    JPEGs go through it, the PNG and the bad files through the PIL path."""
    _, good, bad = folder
    paths = [*good, *bad]
    kw = dict(batch_size=4, progress=False, precision="float32", jit=False)
    thumbs = {}
    ref = embed_paths(paths, **kw)
    got = embed_paths(paths, loader=True, workers=2, gpu_decode=True, sink=Sink(thumbs),
                      store=tmp_path / "g.store", **kw)
    assert got.model_info["gpu_decode"] is True
    assert got.ok.tolist() == ref.ok.tolist() and got.errors == ref.errors
    assert got.width.tolist() == ref.width.tolist()
    assert got.height.tolist() == ref.height.tolist()
    assert _cos(got.embeddings, ref.embeddings).min() >= 0.99
    # thumbnails of the device-decoded JPEGs are made here (the PNG's in a worker process)
    assert set(thumbs) == {i for i in got.ok.tolist() if paths[i].suffix == ".jpg"}
    assert all(max(t.size) <= 256 and t.mode == "RGB" for t in thumbs.values())
    hamming = [bin(int(a) ^ int(b)).count("1") for a, b in zip(got.phash, ref.phash)]
    assert np.median(hamming) <= 6  # near-duplicate detection sees the same image
    # the CPU threads engine decodes with PIL whatever is asked (so --device auto can ask)
    cpu = embed_paths(paths[:1], gpu_decode=True, progress=False)
    assert cpu.model_info["gpu_decode"] is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_on_cuda_agrees_with_cpu(folder):
    _, good, _ = folder
    cpu = embed_paths(good, device="cpu", precision="float32", progress=False)
    gpu = embed_paths(good, device="cuda", gpu_decode=True, progress=False)
    assert gpu.model_info["gpu_decode"] is True and gpu.model_info["device"] == "cuda"
    assert gpu.width.tolist() == cpu.width.tolist()
    assert _cos(gpu.embeddings, cpu.embeddings).min() >= 0.99


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_bigger_lite_backbones_load_bundled_weights(name, no_network):
    model, cfg = load_model(name, num_classes=None)
    prep = Preprocessor(cfg)
    img = Image.fromarray(gen.photo("chelsea"))
    with torch.inference_mode():
        top = model(prep.to_tensor(prep(img)[None])).argmax(1).item()
    assert 281 <= top <= 285, f"{name}: chelsea classified as {top}, not a cat"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_vectors_agree_with_cpu(folder):
    _, good, _ = folder
    cpu = embed_paths(good, device="cpu", precision="float32", progress=False)
    gpu = embed_paths(good, device="cuda", progress=False)
    assert gpu.model_info["device"] == "cuda" and gpu.model_info["loader"] is True
    a, b = cpu.embeddings, gpu.embeddings
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.99


def test_interrupted_run_keeps_finished_vectors(folder, tiny_ckpt, tmp_path):
    _, good, _ = folder
    store = tmp_path / "i.store"

    class Boom(Sink):
        def __call__(self, i, h, thumb):
            if i == 9:
                raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        embed_paths(good, model=TINY, checkpoint=tiny_ckpt, batch_size=2, store=store,
                    sink=Boom(), progress=False, workers=1)
    res = embed_paths(good, model=TINY, checkpoint=tiny_ckpt, batch_size=2, store=store,
                      progress=False)
    assert 2 <= res.n_cached < len(good)


def test_progress_bar_shows_the_count(folder, tiny_ckpt, capsys):
    _, good, _ = folder
    res = embed_paths(good[:3], model=TINY, checkpoint=tiny_ckpt, progress=True)
    assert res.embeddings.shape == (3, 256)
    err = capsys.readouterr().err
    assert "Embedding" in err and "3/3" in err


def test_empty_input():
    res = embed_paths([], progress=False)
    assert res.embeddings.shape[0] == 0 and res.ok.tolist() == [] and res.errors == []


def test_no_import_circle_between_embed_and_the_engines():
    """embed calls ray_engine; ray_engine and the shared decoder import only what sits below
    both (engines/decode.py, models.py), never embed. (Broken once: with ray_engine importing
    ``Item`` from embed again, this fails.)"""
    import ast

    import explorer

    root = Path(explorer.__file__).parent
    for rel in ("stages/ray_engine.py", "stages/engines/decode.py", "stages/models.py"):
        tree = ast.parse((root / rel).read_text(encoding="utf-8"))
        found = {(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        found |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in found if m.split(".")[-1] == "embed"}, (rel, sorted(found))
    assert E.Item is __import__("explorer.stages.engines.decode", fromlist=["Item"]).Item


@pytest.mark.cpu_check
def test_as_built_follows_the_model_key_of_the_run_record(folder, tiny_ckpt):
    """A query is embedded as the build embedded its images: precision and graph from the
    recorded model key (older records: their precision/runtime/jit entries), on the CPU; a
    key this machine no longer makes is refused."""
    key = "tf_efficientnet_lite0|w:abc|bfloat16|jit|prep1"
    kw = E.as_built({"model": {"name": "tf_efficientnet_lite0", "model_key": key,
                               "batch_size": 256}, "parameters": {"checkpoint": None}})
    assert (kw["precision"], kw["runtime"], kw["jit"], kw["device"], kw["batch_size"]) == (
        "bfloat16", "torch", True, "cpu", 8)
    onnx = E.as_built({"model": {"model_key": "x|w:a|float32|onnx|prep1"}})
    assert onnx["runtime"] == "onnx" and onnx["model"] == DEFAULT_MODEL
    old = E.as_built({"execution": {"precision": "bfloat16"}, "model": {"name": "m"}})
    assert (old["precision"], old["runtime"], old["jit"]) == ("bfloat16", "torch", False)
    with pytest.raises(ValueError, match="fp8"):
        E.as_built({"model": {"model_key": "m|w:a|fp8|eager|prep1"}})
    _, good, _ = folder
    built = embed_paths(good[:2], model=TINY, checkpoint=tiny_ckpt, progress=False,
                        precision="float32", runtime="torch")
    run = {"model": built.model_info, "parameters": {"checkpoint": str(tiny_ckpt)}}
    again = E.embed_as_built(good[:2], run)
    np.testing.assert_allclose(again.embeddings, built.embeddings, rtol=1e-5, atol=1e-6)
    stale = {**run, "model": {**built.model_info,
                              "model_key": built.model_info["model_key"].replace("w:", "w:0")}}
    with pytest.raises(ValueError, match="rebuild"):
        E.embed_as_built(good[:2], stale)
