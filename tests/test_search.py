"""Search by concept (MiniLM + ImageNet classes), by CLIP (a tiny random model) and by image;
the concepts module's pieces (text encoder, class probabilities, cluster names)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from explorer.stages import concepts as C
from explorer.curation import search as S
from explorer import table
from tests import _collections as col
from tests import _imagegen as gen
from tests._cpucheck import made_per_answer, run_answer


# --------------------------------------------------------------------------- concepts
@pytest.mark.slow
def test_text_encoder_matches_the_reference_implementation():
    transformers = pytest.importorskip("transformers")
    import torch

    texts = ["a red dress", "a cat sitting on a mat", "coffee"]
    d = str(C.minilm_path())
    tok = transformers.AutoTokenizer.from_pretrained(d)
    ref_model = transformers.AutoModel.from_pretrained(d)
    b = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref_model(**b).last_hidden_state
    mask = b["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    got = C.text_encoder().encode(texts)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_text_encoder_puts_related_words_together():
    v = C.text_encoder().encode(["kitten", "a cat", "a truck"])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_class_names_are_the_imagenet_classes():
    names = C.class_names()
    assert len(names) == 1000 and names[0] == "tench" and "Egyptian cat" in names


def test_class_probabilities_and_top_concepts():
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(6, 4)).astype(np.float32), np.zeros(6, np.float32)
    X = rng.normal(size=(5, 4)).astype(np.float32)
    P = C.class_probabilities(X, W, b)
    np.testing.assert_allclose(P.sum(1), 1.0, rtol=1e-5)
    idx, p = C.top_concepts(P, 3)
    np.testing.assert_array_equal(idx[:, 0], P.argmax(1))
    assert (np.diff(p, axis=1) <= 0).all()
    with pytest.raises(ValueError, match="7"):
        C.top_concepts(P, 7)
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        C.class_probabilities(X[:, :3], W, b)


def test_cluster_names_use_concepts_and_a_shared_folder():
    names = C.class_names()
    cat, mug, tabby = names.index("Egyptian cat"), names.index("coffee mug"), names.index("tabby")
    labels = np.array([0, 0, 0, 1, 1, 1, -1])
    idx = np.array([[cat, tabby]] * 3 + [[mug, cat]] * 3 + [[mug, cat]])
    p = np.array([[0.7, 0.2]] * 3 + [[0.9, 0.05]] * 3 + [[0.5, 0.5]], np.float32)
    folders = ["pets", "pets", "garden", "a", "b", "c", "d"]
    out = C.name_clusters(labels, idx, p, groups={"folder": folders})
    assert out[0] == "pets: Egyptian cat, tabby"   # 2 of 3 share the folder
    assert out[1] == "coffee mug, Egyptian cat"    # no shared folder: concepts alone
    assert out[-1] == "noise"
    assert C.name_clusters(labels[:3], groups={"folder": folders[:3]})[0] == "pets"
    with pytest.raises(ValueError, match="one row per label"):
        C.name_clusters(labels, idx[:3], p[:3])


# --------------------------------------------------------------------------- a small build
def _small_build(tmp_path_factory):
    """A build's files (CSV, features, run record, thumbnails) of 4 photos x 4 crops,
    embedded with the real default model: as ``explorer build --app`` leaves them."""
    from explorer.stages import embed

    root = tmp_path_factory.mktemp("search")
    images, labels = col.photos(4, sources=("chelsea", "coffee", "rocket", "astronaut"),
                                size=128, seed=5)
    paths = col.write_folder(images, labels, root / "imgs", ext="jpg")
    rel = [p.relative_to(root / "imgs").as_posix() for p in paths]
    app = root / "app"
    thumbs = [f"static/thumbs/t{i}.jpg" for i in range(len(paths))]
    for t, a in zip(thumbs, images):
        (app / t).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(app / t)
    res = embed.embed_paths(paths, precision="float32", progress=False)  # the build's path
    feats = res.embeddings
    n = len(paths)
    df = table.make_table(paths=rel, images=thumbs, xy=np.zeros((n, 2)),
                          cluster=np.repeat(np.arange(4), 4), probability=np.ones(n),
                          outlier_score=np.zeros(n), width=[128] * n, height=[128] * n)
    csv = root / "app.csv"
    table.write_table(df, csv)
    np.save(table.sidecar(csv, "features.npy"), feats.astype(np.float16))
    table.write_json(table.sidecar(csv, "run.json"), {
        "image_dir": str(root / "imgs"), "image_dir_from_csv": "imgs", "app": str(app),
        "parameters": {"method": "timm", "model": None, "checkpoint": None},
        "model": res.model_info})
    return {"csv": csv, "paths": paths, "labels": labels, "root": root}


@pytest.fixture(scope="module")
def small_builds(tmp_path_factory):
    """``small_builds(answer)``: the small build made with the CPU check forced to ``answer``
    ("0", "1"; ``None``: the run's own setting), once per answer of the check."""
    return made_per_answer(lambda: _small_build(tmp_path_factory))


@pytest.fixture(scope="module")
def small_build(small_builds):
    return small_builds(run_answer())


def _precision(hits, labels_by_path, want):
    return np.mean([labels_by_path[h["path"]] == want for h in hits])


def test_search_by_concept_finds_the_cat_and_the_coffee(small_build, run_cache):
    """Words find the images of their concept; the class names' vectors are kept in the user
    cache (here the run's, see conftest.run_cache: the first process to search encodes them,
    the others read them back; with the write broken no file is there)."""
    csv = small_build["csv"]
    by_path = {p.relative_to(small_build["root"] / "imgs").as_posix(): lab
               for p, lab in zip(small_build["paths"], small_build["labels"])}
    hits = S.search(csv, "a cat", top=3)
    assert [set(h) >= {"path", "score", "concepts"} for h in hits] == [True] * 3
    assert _precision(hits, by_path, "chelsea") == 1.0
    assert any("cat" in c for c in hits[0]["concepts"])
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    coffee = S.search(csv, "a cup of coffee", top=3)
    assert _precision(coffee, by_path, "coffee") == 1.0
    # the concepts were computed from the stored features once and kept beside the CSV
    assert table.sidecar(csv, "concepts.npz").is_file()
    assert list((run_cache / "bulk-image-explorer").glob("minilm-imagenet-*.npy"))


@pytest.mark.cpu_check
def test_search_by_image_returns_the_same_photo_first(small_builds, cpu_bf16):
    small_build = small_builds(cpu_bf16)
    paths = small_build["paths"]
    hits = S.search(small_build["csv"], image=paths[5], top=4)
    assert hits[0]["path"] == paths[5].relative_to(small_build["root"] / "imgs").as_posix()
    assert hits[0]["score"] == pytest.approx(1.0, abs=0.01)
    labels = [small_build["labels"][h["index"]] for h in hits]
    assert labels.count(small_build["labels"][5]) >= 3


def test_search_takes_an_opened_build_and_reads_its_files_once(small_build, monkeypatch):
    import explorer

    reads = []
    real = table.read_table
    monkeypatch.setattr(table, "read_table", lambda *a, **k: reads.append(1) or real(*a, **k))
    build = explorer.open(small_build["csv"])
    assert build.run["model"]["model_key"].endswith("prep1") and build.n_rows == 16
    first = S.search(build, image=small_build["paths"][2], top=2)
    again = S.search(build, image=small_build["paths"][2], top=2)
    assert first == again and first[0]["index"] == 2 and reads == [1]
    assert build.labels_path.name == "app.labels.sqlite"
    assert build.store_path.name == "app.store" and build.layout is None
    with pytest.raises(ValueError, match="NAME.csv"):
        explorer.open(small_build["root"] / "app.run.json")
    with pytest.raises(ValueError, match="no build at"):
        explorer.open(small_build["root"] / "missing.csv")


def _low_texture_build(root, precision: str):
    """20 low-texture images embedded by the build's own path in ``precision``, written as a
    build leaves them (CSV, float16 features, run record with the model entry)."""
    from explorer.stages import embed

    paths = [gen.save(gen.low_texture(i, 128), root / "imgs" / f"lt{i:02d}.jpg", quality=92)
             for i in range(20)]
    # batches of 4: bf16 is emulated (slow) on CPUs without it; the query batch follows
    res = embed.embed_paths(paths, precision=precision, progress=False, batch_size=4)
    assert res.model_info["precision"] == precision and len(res.ok) == 20
    n = len(paths)
    df = table.make_table(paths=[p.name for p in paths], images=[""] * n, xy=np.zeros((n, 2)),
                          cluster=np.zeros(n, int), probability=np.ones(n),
                          outlier_score=np.zeros(n), width=[128] * n, height=[128] * n)
    csv = root / "low.csv"
    table.write_table(df, csv)
    np.save(table.sidecar(csv, "features.npy"), res.embeddings.astype(np.float16))
    table.write_json(table.sidecar(csv, "run.json"), {
        "image_dir": str(root / "imgs"), "parameters": {"method": "timm", "model": None,
                                                        "checkpoint": None},
        "model": res.model_info})
    return csv, paths


# the float32 case, the one "auto" picks whatever the CPU check says, runs under both answers
# of the check; an asked-for bf16 run only records the check's answer (test_embed checks
# that), and emulated bf16 costs about 30-80 CPU seconds here: once, under the run's setting
@pytest.mark.slow
@pytest.mark.parametrize("precision, cpu_bf16", [
    pytest.param("float32", "0", marks=pytest.mark.cpu_check, id="float32-cpu_bf16=0"),
    pytest.param("float32", "1", marks=pytest.mark.cpu_check, id="float32-cpu_bf16=1"),
    pytest.param("bfloat16", None, id="bfloat16")], indirect=["cpu_bf16"])
def test_every_low_texture_image_is_its_own_best_match(tmp_path, precision, cpu_bf16):
    """Search by image embeds the query through the build's path and model key, so each of 20
    flat skies, blank pages, line drawings and flat colours finds its own row first at cosine
    >= 0.999, whatever precision the build ran in. (Broken once: with the query embedded in
    float32 eager torch as before, the bfloat16 build's flat images fell to cosine ~0.95.)"""
    import explorer

    csv, paths = _low_texture_build(tmp_path, precision)
    build = explorer.open(csv)
    assert build.model["precision"] == precision
    q = S.image_vectors(build, paths)  # what search(image=...) embeds, all 20 at once
    for i in range(len(paths)):
        rows, sims = S.image_search(build.vectors, q[i], top=2)
        assert rows[0] == i and sims[0] >= 0.999, (i, rows.tolist(), sims.tolist())
    if precision == "float32":  # the same function through search() (bf16: slow here)
        hit = S.search(csv, image=paths[3], top=1)[0]
        assert hit["index"] == 3 and hit["score"] >= 0.999


def test_search_needs_exactly_one_query(small_build):
    with pytest.raises(ValueError, match="exactly one"):
        S.search(small_build["csv"])
    with pytest.raises(ValueError, match="exactly one"):
        S.search(small_build["csv"], "cat", image=small_build["paths"][0])
    with pytest.raises(ValueError, match="0"):
        S.search(small_build["csv"], "cat", top=0)
    with pytest.raises(ValueError, match="not found"):
        S.search(small_build["csv"], image=small_build["root"] / "nope.jpg")


def test_cli_search_json(small_build, capsys):
    from explorer.cli import main

    assert main(["search", str(small_build["csv"]), "coffee", "--top", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and {"path", "score"} <= set(out[0])
    assert out[0]["path"].startswith("coffee/")
    assert main(["search", str(small_build["csv"]), "--image", str(small_build["paths"][0])]) == 0
    text = capsys.readouterr().out
    assert small_build["paths"][0].name in text
    assert main(["search", str(small_build["csv"])]) == 1
    assert "exactly one" in capsys.readouterr().err


# --------------------------------------------------------------------------- CLIP
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}


def test_clip_search_with_weights_on_disk(small_build, tmp_path):
    import open_clip
    import torch

    cfg = tmp_path / "tiny-test-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    hits = S.search(small_build["csv"], "a cat", top=5, text_model=str(cfg), checkpoint=ckpt)
    assert len(hits) == 5 and all(-1.0 <= h["score"] <= 1.0 for h in hits)
    # the score is the cosine of this model's text and image vectors
    tok = open_clip.get_tokenizer("tiny-test-clip")
    with torch.no_grad():
        t = torch.nn.functional.normalize(model.encode_text(tok(["a cat"])), dim=-1)
        img = Image.open(small_build["root"] / "app" / "static/thumbs" /
                         f"t{hits[0]['index']}.jpg")
        _, _, prep = open_clip.create_model_and_transforms("tiny-test-clip")
        v = torch.nn.functional.normalize(model.encode_image(prep(img)[None]), dim=-1)
    assert hits[0]["score"] == pytest.approx(float(v @ t.T), abs=1e-4)
    # image vectors are cached beside the CSV: a second search embeds nothing
    assert len(list(table.sidecar(small_build["csv"], "clip").glob("*.npy"))) == 1
    S.search(small_build["csv"], "a dog", text_model=str(cfg), checkpoint=ckpt)
    assert len(list(table.sidecar(small_build["csv"], "clip").glob("*.npy"))) == 1
    with pytest.raises(ValueError, match="checkpoint"):
        S.search(small_build["csv"], "a cat", text_model=str(cfg), checkpoint=tmp_path / "no.pt")


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_build_writes_names_flags_and_concepts_and_search_finds_a_concept(tmp_path, capsys):
    from explorer.cli import main

    images, labels = col.photos(5, sources=("chelsea", "coffee", "rocket", "astronaut"),
                                size=128, seed=9)
    images.append(np.zeros((128, 128, 3), np.uint8))  # a black frame: dark, low information
    labels.append("black")
    col.write_folder(images, labels, tmp_path / "imgs", ext="png")
    # an exact copy of one file
    src = next((tmp_path / "imgs" / "coffee").glob("*.png"))
    (tmp_path / "imgs" / "copy.png").write_bytes(src.read_bytes())
    app = tmp_path / "proj"
    assert main(["build", str(tmp_path / "imgs"), "--app", str(app), "--seed", "1", "-q"]) == 0
    csv = tmp_path / "proj.csv"
    df = table.read_table(csv)
    for c in ("cluster_name", "blurry", "dark", "low_information", "exact_duplicate"):
        assert c in df.columns
    row = df.set_index("path")
    assert row.loc["black/black_20.png", "dark"] == 1
    assert row.loc["black/black_20.png", "low_information"] == 1
    assert df["exact_duplicate"].sum() == 1
    assert (df["cluster_name"] != "").all()
    run = json.loads(table.sidecar(csv, "run.json").read_text())
    assert run["features"]["name"] == "cnn" and "only" in run["features"]["reason"]
    assert table.sidecar(csv, "concepts.npz").is_file()
    assert main(["search", str(csv), "a cat", "--top", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["path"].split("/")[0] for h in hits] == ["chelsea"] * 3
