"""Input kinds on real photos: a folder against the same photos in a zip, a tar and a tar.gz.

For each kind: opening the source (listing; a tar.gz is decompressed to a plain tar once),
reading every image's bytes through ``images.read_file`` (what the build's decoder does),
and, with ``--build``, a whole ``explorer build --method phash`` (thumbnails, map,
clusters). Prints medians; asserts nothing.

    python bench/inputs.py --data ../shared/data/clothing-small [--n 500] [--repeat 3] [--build]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from explorer.inputs import sources
from explorer.stages import images


def make_archives(paths: list[Path], root: Path, out: Path) -> dict[str, Path]:
    made = {"folder": root}
    with zipfile.ZipFile(out / "photos.zip", "w") as z:  # JPEGs stored, as zip tools do
        for p in paths:
            z.write(p, p.relative_to(root).as_posix())
    made["zip"] = out / "photos.zip"
    for kind, mode in (("tar", "w"), ("tar.gz", "w:gz")):
        dest = out / f"photos.{kind}"
        with tarfile.open(dest, mode) as t:
            for p in paths:
                t.add(p, p.relative_to(root).as_posix())
        made[kind] = dest
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/clothing-small")
    ap.add_argument("--n", type=int, default=500, help="photos to pack (default 500)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--build", action="store_true", help="also time a whole build per kind")
    a = ap.parse_args(argv)
    root = Path(a.data).resolve()
    paths = images.discover(root)[: a.n]
    total_mb = sum(p.stat().st_size for p in paths) / 2**20
    print(f"{len(paths)} photos, {total_mb:.1f} MB, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sub = tmp / "photos"
        for p in paths:  # the folder kind reads the same subset
            dest = sub / p.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, dest) if os.stat(p).st_dev == os.stat(tmp).st_dev else \
                dest.write_bytes(p.read_bytes())
        made = make_archives([sub / p.relative_to(root) for p in paths], sub, tmp)
        if a.build:  # the first build in a process pays for imports and JIT: not timed
            from explorer.stages.pipeline import build

            warm = tmp / "warm"
            for p in paths[:20]:
                (warm / p.name).parent.mkdir(parents=True, exist_ok=True)
                (warm / p.name).write_bytes(p.read_bytes())
            build(warm, out=tmp / "warm.csv", method="phash", progress=False)
        print(f"{'kind':8} {'size MB':>8} {'open s':>8} {'read s':>8} {'MB/s':>7}"
              + (f" {'build s':>8}" if a.build else ""))
        for kind, src in made.items():
            opens, reads = [], []
            for r in range(a.repeat):
                work = tmp / f"work-{kind}-{r}"  # a tar.gz is decompressed afresh each time
                t0 = time.perf_counter()
                s = sources.open_source(src, work_dir=work)
                opens.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for item in s.items:
                    images.read_file(item)
                reads.append(time.perf_counter() - t0)
            assert len(s.items) == len(paths), (kind, len(s.items))
            size = src.stat().st_size / 2**20 if src.is_file() else total_mb
            read = statistics.median(reads)
            line = (f"{kind:8} {size:8.1f} {statistics.median(opens):8.3f} {read:8.3f} "
                    f"{total_mb / read:7.0f}")
            if a.build:
                t0 = time.perf_counter()
                build(src, out=tmp / f"b-{kind}.csv", method="phash", progress=False)
                line += f" {time.perf_counter() - t0:8.1f}"
            print(line, flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
