"""Engines people can share: what a query reads, published to a folder and the Hugging Face hub, and
opened again by name.

    publish(engine, to)                  -> to/   the index (the FAISS files with the fp16 re-rank copy,
                                                  ids and coordinates), retrieve.json, the calibrations,
                                                  the caches, the model's weights when they are a folder,
                                                  engine.json (every file's size and sha256) and README.md
                                                  (a model card with the hub's YAML metadata)
    upload(to, "ORG/NAME", private)      -> the hub repo's URL (huggingface_hub.upload_folder)
    open_engine("hf-hub:ORG/NAME[@REV]") -> (index folder, model): only the files engine.json lists,
                                            into the hub cache (resumable, offline once there), each
                                            checked against its sha256 (refused by name when it differs)

No absolute path of the publisher's machine goes into a published engine: the dataset is named by its
folder's name, a model folder travels inside the engine (`model/`), and index.json's caches are renamed
for the scrubbed index.json they now belong to. Not published: the embedding shards, predictions, the
lock, anything half written.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from geovote.layout import EngineLayout, EngineMissing
from geovote.paths import file_sha256

MANIFEST = "engine.json"
CARD = "README.md"
HUB_PREFIX = "hf-hub:"
MODEL_DIR = "model"
MANIFEST_VERSION = 1
INDEX_FILES = ("index.faiss", "refine.faiss", "ids.npy", "latitude.npy", "longitude.npy")
TUNING_FILES = ("retrieve.json", "calibration.json", "calibration-albums.json")
CACHE_PREFIXES = ("cells-", "countries-", "spacing-")  # derived tables named by the index's digest
LICENSES = {"geovote-sample": "cc-by-4.0", "osv5m": "cc-by-sa-4.0"}  # the gallery data's licence


class ShareError(ValueError):
    """A published engine that cannot be made, found or trusted; the message names the file and what to do."""


def _dataset_kind(root: str | None) -> str | None:
    """What the gallery was: the bundled sample, OSV-5M (by its train.csv's OSV-5M columns), else None."""
    if not root:
        return None
    root = Path(root)
    if (root / "sample.json").is_file():
        return "geovote-sample"
    try:
        with open(root / "train.csv", encoding="utf-8") as f:
            header = f.readline()
    except OSError:
        return None
    return "osv5m" if "thumb_original_url" in header and "sequence" in header else None


def publish(engine: str | Path, to: str | Path, license: str | None = None, results: str | Path | None = None,
            repo: str | None = None, log=print) -> Path:
    """Write `engine`'s published form to the folder `to` (which must not exist: nothing is overwritten).
    `license`: the gallery's licence for the card (default: from the dataset, else "other");
    `results`: a benchmark.run results.json to quote in the card; `repo`: the hub repo it is meant for
    (the card's command names it)."""
    from index.search import index_digest

    layout = _layout(engine)
    index = layout.index
    if not (index / "index.json").is_file():
        raise EngineMissing(f"no index at {index}: build it with `python -m embed.build`")
    if not (index / "retrieve.json").is_file():
        raise ShareError(f"{index} was never tuned: run `python -m retrieve.tune` before publishing it")
    to = Path(to)
    if to.exists():
        raise ShareError(f"{to} exists: publish into a new folder (nothing is overwritten)")
    tmp = to.with_name(to.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "index").mkdir(parents=True)
    info = json.loads((index / "index.json").read_text())
    old_digest = index_digest((index / "index.json").read_bytes())
    manifest = info.get("embedding_manifest") or {}
    dataset = manifest.get("dataset")
    kind = _dataset_kind(dataset)
    model_name = (manifest.get("config") or {}).get("model")
    if not model_name:
        raise ShareError(f"{index}: its index does not say which model embedded it")
    model = _publish_model(model_name, tmp, log)
    # no path of this machine: the dataset by its folder's name, the model as published
    if dataset:
        manifest["dataset"] = Path(dataset).name
    manifest.setdefault("config", {})["model"] = model["name"]
    info["embedding_manifest"] = manifest
    index_json = (json.dumps(info, indent=1) + "\n").encode()
    (tmp / "index" / "index.json").write_bytes(index_json)
    new_digest = index_digest(index_json)
    for name in INDEX_FILES:
        if (index / name).is_file():
            shutil.copyfile(index / name, tmp / "index" / name)
    tuned = json.loads((index / "retrieve.json").read_text())
    validation = tuned.get("validation") or {}
    if validation.get("data"):
        validation["data"] = Path(validation["data"]).name
    (tmp / "index" / "retrieve.json").write_text(json.dumps(tuned, indent=2) + "\n")
    for name in TUNING_FILES[1:]:
        if (index / name).is_file():
            shutil.copyfile(index / name, tmp / "index" / name)
    for f in sorted(index.iterdir()):  # the caches of this build, renamed for the scrubbed index.json
        if f.name.startswith(CACHE_PREFIXES) and f.name.endswith(f"-{old_digest}.npy"):
            shutil.copyfile(f, tmp / "index" / f.name.replace(old_digest, new_digest))
    _check_no_paths(tmp, [str(layout.root.resolve()), str(Path(dataset).resolve()) if dataset else "",
                          str(Path(model_name).resolve()) if Path(model_name).is_dir() else "",
                          str(Path.home())])
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = f.relative_to(tmp).as_posix()
        files[rel] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    record = {"kind": "geovote-engine", "version": MANIFEST_VERSION, "model": model,
              "backbone": info.get("backbone"), "images": info.get("count"), "dim": info.get("dim"),
              "factory": info.get("factory"), "dataset": {"name": Path(dataset).name if dataset else None,
                                                          "kind": kind},
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    (tmp / MANIFEST).write_text(json.dumps(record, indent=1) + "\n")
    card = model_card(record, info, tuned, license or LICENSES.get(kind, "other"),
                      json.loads(Path(results).read_text()) if results else None, repo)
    (tmp / CARD).write_text(card)
    tmp.rename(to)
    total = sum(v["bytes"] for v in files.values())
    whole = sum(f.stat().st_size for f in layout.root.rglob("*") if f.is_file())
    per_image = total / max(info.get("count") or 1, 1)
    log(f"published {len(files)} files, {total / 2**20:,.1f} MiB ({per_image:,.0f} bytes an image), to {to}; "
        f"the engine folder holds {whole / 2**20:,.1f} MiB")
    return to


def _layout(engine: str | Path) -> EngineLayout:
    """An engine folder or its index folder."""
    engine = Path(engine)
    return EngineLayout.from_index(engine) if (engine / "index.json").is_file() else EngineLayout(engine)


def _publish_model(name: str, out: Path, log) -> dict:
    """How the published engine names its model: a folder (a finetune checkpoint, an open_clip folder)
    is copied in (`model/`: its weights travel with the engine; paths of this machine in its JSON files
    replaced by their last part); a name (`default`, the bundled model of the geovote package; an
    open_clip tag or `hf-hub:` repo) stays a name, resolved as --model does. A model named by a weights
    file (ARCH:/path/file.pt) cannot be published: the index names it by that path."""
    if Path(name).is_dir():
        shutil.copytree(name, out / MODEL_DIR)
        for f in (out / MODEL_DIR).rglob("*.json"):
            try:
                f.write_text(json.dumps(_scrub_paths(json.loads(f.read_text())), indent=1) + "\n")
            except (ValueError, UnicodeDecodeError):
                continue
        log(f"the model's weights travel with the engine: {name} -> {MODEL_DIR}/")
        return {"name": MODEL_DIR, "source": "engine folder"}
    if ":" in name and Path(name.split(":", 1)[1]).is_absolute():
        raise ShareError(f"the engine's model is a weights file of this machine ({name}), which its index "
                         "names by path: build the engine with an open_clip folder or a finetune checkpoint "
                         "folder (their weights travel with the engine), or a hub model, to publish it")
    return {"name": name, "source": "geovote package" if name == "default" else "by name, as --model"}


def _scrub_paths(value):
    """A JSON value with every absolute path string replaced by its last part."""
    if isinstance(value, dict):
        return {k: _scrub_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_paths(v) for v in value]
    if isinstance(value, str) and len(value) > 1 and Path(value).is_absolute():
        return Path(value).name
    return value


def _check_no_paths(folder: Path, paths: list[str]) -> None:
    """ShareError naming the file when a text file of the published folder holds one of `paths`."""
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.suffix not in (".json", ".md", ".txt", ".toml", ".yaml", ".csv"):
            continue
        text = f.read_text(errors="replace")
        for path in paths:
            if path and path != "/" and path in text:
                raise ShareError(f"not publishing: {f.relative_to(folder)} holds a path of this machine "
                                 f"({path})")


def published_model(root: Path) -> str | None:
    """The model of a published engine (its engine.json): the weights folder inside it, or a name."""
    try:
        record = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    model = record.get("model") or {}
    if model.get("source") == "engine folder":
        return str(Path(root) / MODEL_DIR)
    return model.get("name")


def model_card(record: dict, info: dict, tuned: dict, license: str, results: dict | None,
               repo: str | None = None) -> str:
    """README.md for the hub: YAML metadata the hub reads, then what the engine is and how to use it."""
    model = record["model"]
    data = record["dataset"]
    meta = {"license": license, "library_name": "geovote", "pipeline_tag": "image-feature-extraction",
            "tags": ["geolocation", "image-retrieval", "faiss", "geovote"]}
    if data["kind"] == "osv5m":
        meta["datasets"] = ["osv5m/osv5m"]
    if model["source"] == "by name, as --model" and model["name"].startswith("hf-hub:"):
        meta["base_model"] = model["name"][len("hf-hub:"):]
    autotune = info.get("autotune") or {}
    validation = tuned.get("validation") or {}
    albums = tuned.get("albums") or {}
    yaml = [f"{k}: {json.dumps(v)}" if not isinstance(v, list) else f"{k}:\n" + "\n".join(f"- {json.dumps(x)}"
                                                                                         for x in v)
            for k, v in meta.items()]  # JSON strings are YAML strings
    gallery = f"{data['name'] or '-'} ({data['kind'] or 'own photos or data'})"
    lines = ["---", *yaml, "---", "",
             f"# geovote engine: {record['images']:,} images of {data['name'] or 'a gallery'}", "",
             "A geovote retrieval engine: where on Earth was a photo taken, answered from its nearest images "
             "in this gallery, their vote, and calibrated probabilities.", "",
             "    pip install geovote",
             f"    geovote locate photo.jpg --index hf-hub:{repo or 'ORG/NAME'}", "",
             "Only the files queries read are here (the index, coordinates and ids, the tuned voting and "
             "calibration); `engine.json` lists each with its size and sha256, checked on download.", "",
             "| | |", "|---|---|",
             f"| gallery | {gallery}, licence {license} |",
             f"| model | `{model['name']}` ({model['source']}); backbone `{record['backbone']}` |",
             f"| index | FAISS `{record['factory']}`, {record['dim']}-d, {record['images']:,} vectors, "
             f"nprobe {info.get('nprobe')}, re-rank shortlist {info.get('shortlist')} |"]
    if autotune:
        lines.append(f"| measured at build | {json.dumps(autotune)} |")
    if validation:
        scores = ", ".join(f"{k}: {v['geoscore']:.0f}" for k, v in validation.items()
                           if isinstance(v, dict) and "geoscore" in v)
        lines.append(f"| tuned on | {validation.get('split')} ({validation.get('images')} images) and "
                     f"{validation.get('far')}; GeoScores {scores} |")
    if albums.get("fitted"):
        lines.append(f"| albums | fitted on {albums.get('albums')}; photos' spread "
                     f"{albums.get('spread_km')} km |")
    if results:
        lines += ["", f"`benchmark.run` on {results.get('split')} ({results.get('n')} images):", "",
                  "| method | GeoScore | median km |", "|---|---|---|"]
        lines += [f"| {m['name']} | {m['geoscore']:.0f} | {m['median_km']:,.0f} |"
                  for m in results["methods"]]
    return "\n".join(lines) + "\n"


def upload(folder: str | Path, repo: str, private: bool = False, log=print) -> str:
    """Upload a published folder to the hub repo `repo` (created if needed); large files go as the hub
    stores them (huggingface_hub's upload_folder). Returns the repo's URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ShareError(f"{folder} is not a published engine (no {MANIFEST}): run "
                         "`python -m retrieve.publish`")
    api = HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                      commit_message="geovote engine (retrieve.publish)")
    log(f"uploaded {folder} to {url}")
    return str(url)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """("ORG/NAME", revision or None) of "hf-hub:ORG/NAME[@REVISION]"."""
    body = spec[len(HUB_PREFIX):]
    repo, _, revision = body.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ShareError(f"{spec!r}: an engine on the hub is hf-hub:ORG/NAME[@REVISION]")
    return repo, revision or None


def open_engine(spec: str, cache_dir: str | None = None, log=None) -> tuple[Path, str | None]:
    """(index folder, model) of a published engine on the hub: engine.json first, then every file it
    lists, each from the hub cache when there (offline: HF_HUB_OFFLINE=1) and checked against its size
    and sha256 (the hash once per file version: geovote's record of what it checked, VERIFIED_DIR)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = parse_spec(spec)

    def fetch(name: str) -> Path:  # at `revision`: the branch asked for, then engine.json's own commit
        try:
            return Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir))
        except LocalEntryNotFoundError:
            raise ShareError(f"{spec}: {name} is not in the hub cache and the hub cannot be reached "
                             "(offline?): run once with a network") from None
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise ShareError(f"{spec}: no such engine on the hub ({type(e).__name__})") from None

    record_path = fetch(MANIFEST)
    revision = record_path.parent.name  # the snapshot's commit: every file from the same one
    try:
        record = json.loads(record_path.read_text())
        files = record["files"]
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
                and ".." not in Path(k).parts and not Path(k).is_absolute() for k, v in files.items()):
            raise ValueError("files")
    except (OSError, ValueError, KeyError, TypeError):
        raise ShareError(f"{spec}: its {MANIFEST} is unreadable or malformed") from None
    if record.get("version") != MANIFEST_VERSION:
        raise ShareError(f"{spec}: an engine of format {record.get('version')}, this geovote reads "
                         f"{MANIFEST_VERSION}: upgrade geovote")
    checked = _verified(repo)
    for name, want in files.items():
        path = fetch(name)
        real = path.resolve()
        st = real.stat()
        if st.st_size != want["bytes"]:
            raise ShareError(f"{spec}: {name} is {st.st_size:,} bytes, its manifest says {want['bytes']:,}: "
                             f"delete {real} and run again to download it anew")
        key = f"{real}:{st.st_size}:{st.st_mtime_ns}:{want['sha256']}"
        if key not in checked:
            if file_sha256(real) != want["sha256"]:
                raise ShareError(f"{spec}: {name} does not match its sha256 in {MANIFEST}: delete {real} and "
                                 "run again to download it anew")
            checked.add(key)
    _save_verified(repo, checked)
    root = record_path.parent
    if log:
        log(f"engine {spec}: {len(files)} files checked in {root}")
    return root / "index", published_model(root)


VERIFIED_DIR = Path(os.environ.get("GEOVOTE_CACHE", Path.home() / ".cache" / "geovote")) / "verified"


def _verified_path(repo: str) -> Path:
    return VERIFIED_DIR / (repo.replace("/", "--") + ".json")


def _verified(repo: str) -> set:
    try:
        return set(json.loads(_verified_path(repo).read_text()))
    except (OSError, ValueError, TypeError):
        return set()


def _save_verified(repo: str, keys: set) -> None:
    path = _verified_path(repo)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(sorted(keys)))
        tmp.replace(path)
    except OSError:  # a read-only home: every open hashes again, nothing else changes
        pass


def resolve_engine(index: str | Path | None, engine: str | Path | None = None
                   ) -> tuple[EngineLayout, str | None]:
    """The engine a command was pointed at and the model to answer with (None: the one its index names):
    `--index hf-hub:ORG/NAME[@REV]` opens a published engine from the hub; a published folder names
    its own model; else geovote.layout.resolve."""
    from geovote.layout import resolve

    if index is not None and str(index).startswith(HUB_PREFIX):
        index_dir, model = open_engine(str(index))
        return EngineLayout.from_index(index_dir), model
    layout = resolve(index=index, engine=engine)
    return layout, published_model(layout.root)


__all__ = ["ShareError", "open_engine", "publish", "published_model", "resolve_engine", "upload"]
