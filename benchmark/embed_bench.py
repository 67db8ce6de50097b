"""embed.build's images/s against the model's ceiling and a plain loop, same model, batch and machine.

    python -m benchmark.embed_bench [--model default] [--n 4000] [--batch-size 256] [--workers 2]
    python -m benchmark.embed_bench --model random:ViT-L-14 --jpeg-size 512x384     # a GPU, street-view size

    ceiling     forward passes only, on tensors decoded and preprocessed beforehand
    plain loop  PIL open + open_clip preprocess + batched forward, one process, no workers
    embed.build the real stage (DataLoader workers, JPEG draft decoding, shard writing), end to end
    archives    the same stage reading the images from a zip archive in place (stored, as OSV-5M ships
                them), its embeddings compared with those from the files
    decode      decode + preprocess alone, one thread: plain PIL against draft (reduced-size) decoding,
                and the cosine of the model's embeddings of the two

Images: the first --n of the sample's train split, or with --jpeg-size those images re-encoded at that
size (quality 90) into a temporary dataset, so decoding costs what street-view photos cost.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path



def _subset(root: Path, n: int, jpeg_size: tuple[int, int] | None, work: Path) -> Path:
    """A dataset folder holding the first n train rows (images re-encoded when jpeg_size is set)."""
    import csv

    from PIL import Image

    out = work / "data"
    (out / "images" / "train").mkdir(parents=True)
    with open(root / "train.csv") as f:
        rows = list(csv.DictReader(f))[:n]
    with open(out / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "latitude", "longitude"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    src = {p.stem: p for p in (root / "images" / "train").rglob("*.jpg")}
    for r in rows:
        dst = out / "images" / "train" / f"{r['id']}.jpg"
        if jpeg_size:
            Image.open(src[r["id"]]).convert("RGB").resize(jpeg_size, Image.BICUBIC).save(dst, quality=90)
        else:
            shutil.copy(src[r["id"]], dst)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.embed_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=-1, help="-1: auto (embed.split.decode_workers)")
    ap.add_argument("--jpeg-size", default=None, help="WxH: re-encode the images at this size first")
    args = ap.parse_args(argv)
    import torch

    from embed.features import FeatureExtractor
    from embed.images import open_rgb
    from embed.models import load_backbone
    from embed.split import EmbedConfig, decode_workers, embed_split
    from geovote.bundled_sample import ensure_sample
    from geovote.data import read_split

    backbone = load_backbone(args.model)
    forward = FeatureExtractor(backbone, batch_size=args.batch_size)  # the one extractor all callers use
    cuda = forward.cuda
    size = tuple(int(v) for v in args.jpeg_size.split("x")) if args.jpeg_size else None
    work = Path(tempfile.mkdtemp(prefix="geovote-embed-bench-"))
    try:
        data = _subset(ensure_sample(), args.n, size, work)
        split = read_split(data, "train", rejects_path=work / "rejects.csv")
        paths = split.image_paths()
        tf = backbone.transform()

        def sync():
            if cuda:
                torch.cuda.synchronize()

        # ceiling: preprocessed tensors in memory, forward only
        tensors = torch.stack([tf(open_rgb(p, backbone.image_size)) for p in paths])
        if cuda:
            tensors = tensors.pin_memory()
        forward(tensors[:args.batch_size])  # warm-up
        sync()
        t0 = time.perf_counter()
        for s in range(0, len(tensors), args.batch_size):
            forward(tensors[s:s + args.batch_size])
        sync()
        ceiling = len(tensors) / (time.perf_counter() - t0)
        del tensors

        # plain loop: decode + preprocess + forward, in one process
        from PIL import Image

        t0 = time.perf_counter()
        for s in range(0, len(paths), args.batch_size):
            batch = [tf(Image.open(p).convert("RGB")) for p in paths[s:s + args.batch_size]]
            forward(torch.stack(batch))
        sync()
        plain = len(paths) / (time.perf_counter() - t0)

        # embed.build's stage, end to end (shards written)
        cfg = EmbedConfig(model=args.model, batch_size=args.batch_size, workers=args.workers,
                          shard_rows=max(args.batch_size, len(paths) // 4))
        t0 = time.perf_counter()
        embed_split(split, backbone, work / "shards", cfg, data, log=lambda *_: None)
        sync()
        ours = len(paths) / (time.perf_counter() - t0)

        # the same stage from a zip archive read in place (OSV-5M's layout: stored members)
        import zipfile

        import numpy as np

        from geovote.shards import read_embeddings

        zipped = work / "zipped"
        (zipped / "images" / "train").mkdir(parents=True)
        shutil.copy(data / "train.csv", zipped / "train.csv")
        with zipfile.ZipFile(zipped / "images" / "train" / "00.zip", "w", zipfile.ZIP_STORED) as zf:
            for path in paths:
                zf.write(path, f"train/{path.name}")
        zsplit = read_split(zipped, "train", rejects_path=work / "rejects-zip.csv")
        t0 = time.perf_counter()
        embed_split(zsplit, backbone, work / "shards-zip", cfg, zipped, log=lambda *_: None)
        sync()
        from_archive = len(paths) / (time.perf_counter() - t0)
        same = np.array_equal(read_embeddings(work / "shards").embedding,
                              read_embeddings(work / "shards-zip").embedding)

        # decode + preprocess alone, one thread: plain PIL against draft decoding
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        few = list(paths[:min(len(paths), 500)])
        t0 = time.perf_counter()
        plain_t = [tf(Image.open(p).convert("RGB")) for p in few]
        plain_decode = len(few) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        draft_t = [tf(open_rgb(p, backbone.image_size)) for p in few]
        draft_decode = len(few) / (time.perf_counter() - t0)
        torch.set_num_threads(threads)
        a, b = forward(torch.stack(plain_t)), forward(torch.stack(draft_t))
        a, b = (np.asarray(x.cpu() if hasattr(x, "cpu") else x, np.float64) for x in (a, b))
        cosine = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{backbone.name} ({backbone.image_size} px), {len(paths):,} images"
          f"{' re-encoded at ' + args.jpeg_size if size else ''}, batch {args.batch_size}, {where}")
    print(f"{'method':<40} {'images/s':>10} {'vs ceiling':>11}")
    rows = (("ceiling: forward only (pre-decoded)", ceiling), ("plain loop (PIL + preprocess)", plain),
            (f"embed.build ({decode_workers(args.workers)} workers)", ours))
    for name, rate in rows:
        print(f"{name:<40} {rate:>10,.0f} {rate / ceiling:>10.0%}")
    print(f"embed.build / plain loop: {ours / plain:.2f}x")
    print(f"embed.build from a zip archive read in place: {from_archive:,.0f} images/s, "
          f"{from_archive / ours:.2f}x from the files; embeddings {'identical' if same else 'DIFFERENT'}")
    print(f"decode + preprocess, one thread: plain PIL {plain_decode:,.0f} images/s, draft decoding "
          f"{draft_decode:,.0f} images/s ({draft_decode / plain_decode:.2f}x); embeddings' cosine min "
          f"{cosine.min():.4f}, median {np.median(cosine):.4f}")
    print(f"cores to decode for ViT-L/14 on an H100 (2,500 images/s) at this image size and model input: "
          f"{2500 / draft_decode:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
