"""The engine behind `retrieve.query`, `retrieve.tune` and the server: model + index + cells + voting.

The index folder carries everything a query needs besides the model (paths: geovote.layout):
    index.json            its embedding manifest names the model (`config.model`) and its weights (`backbone`)
    retrieve.json         voting parameters chosen on validation by `retrieve.tune` (defaults if absent)
    calibration.json      each candidate's distance distribution, fitted with them (retrieve.calibrate):
                          the answer is the candidate of highest expected GeoScore; without it, the
                          vote's peak answers, `confidence` is its raw vote share, no within_km or radius_km
    calibration-albums.json   the same for an album's candidates (retrieve.album), fitted on sequences;
                          retrieve.json's `albums` record has the photos' spread it was fitted with
    cells-<spec>-<digest>.npy   each training row's cell at every voting level, computed once and cached
    countries-<digest>.npy      each training row's country (reverse_geocoder, as OSV-5M), for regions
    spacing-<m>-<digest>.npy    each training row's distance to its m-th nearest other row, for the
                                candidates' features and the far pick's weights; cached
The caches carry the digest of the index build they came from (index.search.index_digest), and an engine
that outlives its index (a server during an update) takes up the new one (Engine.refresh) and never
writes its old tables into the new folder.

Queries are embedded by the one feature extractor (embed.features) and searched on the GPU when torch
sees one (device "auto"), on the CPU otherwise.
"""
from __future__ import annotations

import json
import threading
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from geovote.config import ConfigError, config_from_dict
from geovote.layout import EngineLayout
from index.search import GeoIndex
from retrieve.predict import SPACING_NEIGHBOURS, Prediction, VoteConfig, cell_table, vote


def load_params(path: str | Path) -> VoteConfig:
    """The voting parameters stored in a retrieve.json; any key VoteConfig lacks is an error naming it."""
    path = Path(path)
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); rerun `python -m retrieve.tune`") from None
    if not isinstance(stored, dict) or "params" not in stored:
        raise ConfigError(f"{path}: no `params` table; rerun `python -m retrieve.tune`")
    params = stored["params"]
    if isinstance(params, dict):  # a tuning from before the candidate table: its rules are gone, not an error
        params = {k: v for k, v in params.items() if k not in OBSOLETE_PARAMS}
    return config_from_dict(VoteConfig, params, f"{path} params")


OBSOLETE_PARAMS = {"hedge_below", "far_above"}  # rules the candidate table's one decision replaced


def album_spread_km(path: Path) -> float:
    """The photos' spread the album model was fitted with (retrieve.json's `albums` record)."""
    from retrieve.album import DEFAULT_SPREAD_KM

    try:
        return float(json.loads(Path(path).read_text())["albums"]["spread_km"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_SPREAD_KM


def save_params(index_dir: str | Path, params: VoteConfig, record: dict) -> Path:
    """Store the chosen parameters and how they were chosen, atomically."""
    path = EngineLayout.from_index(index_dir).params
    tmp = path.with_name(path.name + ".partial")
    try:
        text = json.dumps({"params": asdict(params), **record}, indent=2, allow_nan=False)
    except ValueError:
        raise ConfigError(f"not writing {path}: the tuning scores are not finite numbers") from None
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return path


def _cached(path: Path, ok, compute, still_current=lambda: True) -> np.ndarray:
    """The array cached at `path` when `ok(array)` holds, else `compute()`, saved there atomically when
    `still_current()` (the index it was computed from is still the one in the folder: a server opened
    before an update must not leave its old index's table in the new one) and the folder is writable,
    else kept in memory only. A cache that is not what it should be (truncated, another shape or type)
    is rebuilt, never trusted; the caller names the file after the index build (geovote.layout)."""
    if path.exists():
        try:
            table = np.load(path, mmap_mode="r")
            if ok(table):
                return table
        except (OSError, ValueError, EOFError):
            pass
    table = compute()
    if not still_current():
        return table
    tmp = path.with_name(path.name + ".partial.npy")
    try:
        np.save(tmp, table)
        tmp.replace(path)
    except OSError:
        pass
    return table


class IndexChanged(Exception):
    """The index on disk is no longer the one this engine opened, and cannot be taken up in its place
    (another model, or an update still under way); the message says what to do."""


class Engine:
    def __init__(self, index_dir: str | Path, model: str | None = None, params: VoteConfig | None = None,
                 load_model: bool = True, device: str = "auto", backbone=None, calibrated: bool = True):
        """`backbone`: an already loaded Backbone to use instead of loading `model` again. `calibrated`
        False: answer without the stored calibration, unread (tuning, which fits a new one)."""
        self.layout = EngineLayout.from_index(index_dir)
        self.index_dir = self.layout.index
        self._lock = threading.Lock()  # index, params and calibration are swapped and read together
        self._archived = None  # archived-images.parquet's ids and paths, read when a gallery image is asked
        self._device, self._calibrated = device, calibrated
        self.index = GeoIndex(self.index_dir, device=device)
        manifest = self.index.info.get("embedding_manifest") or {}
        from retrieve.share import published_model

        # a published engine (retrieve.share) carries its model's folder inside it
        self.model_name = (model or published_model(self.layout.root)
                           or (manifest.get("config") or {}).get("model"))
        self.backbone = backbone
        self.features = None
        if load_model or backbone is not None:
            from embed.features import FeatureExtractor
            from embed.models import load_backbone

            if self.backbone is None:
                if not self.model_name:
                    raise ValueError(f"{self.index_dir}: the index does not say which model embedded it; "
                                     "pass --model")
                self.backbone = load_backbone(self.model_name)
            self.index.check_queries(np.ones(self.index.dim), backbone=self.backbone.name)
            self.features = FeatureExtractor(self.backbone, device=device, batch_size=64)
        self._fixed_params = params
        self._tables: dict[tuple, np.ndarray] = {}  # (what, index digest, ...) -> table
        self._disk = self._on_disk()
        self.params, self.calibration, self.albums = self._read_tuning()

    def _read_tuning(self):
        """(voting parameters, calibration or None, AlbumTuning) as stored with the index now."""
        from retrieve.album import AlbumTuning

        params = self._fixed_params
        if params is None:
            params = load_params(self.layout.params) if self.layout.params.exists() else VoteConfig()
        calibration, albums = None, AlbumTuning()
        if self._calibrated and self.layout.calibration.exists():
            from retrieve.album import ALBUM_FEATURES
            from retrieve.calibrate import Calibration, CalibrationError
            from retrieve.candidates import FEATURES

            try:
                calibration = Calibration.load(self.layout.calibration, FEATURES)
            except CalibrationError as e:
                raise ConfigError(str(e)) from None
            if self.layout.album_calibration.exists():
                try:  # an album model this code cannot read leaves single photos answered as ever
                    albums = AlbumTuning(Calibration.load(self.layout.album_calibration, ALBUM_FEATURES),
                                         album_spread_km(self.layout.params))
                except CalibrationError as e:
                    import sys

                    print(f"warning: {e}: albums are decided uncalibrated", file=sys.stderr)
        return params, calibration, albums

    def _on_disk(self) -> tuple:
        """What says whether the engine on disk is still the one in memory: the index build's digest and
        the identity (inode, size, mtime) of retrieve.json and calibration.json, which tuning rewrites
        without touching the index."""
        from index.search import current_digest

        def ident(path: Path):
            try:
                st = path.stat()
            except OSError:
                return None
            return st.st_ino, st.st_size, st.st_mtime_ns

        return (current_digest(self.index_dir), ident(self.layout.params), ident(self.layout.calibration),
                ident(self.layout.album_calibration))

    def _still_current(self, index=None) -> bool:
        from index.search import current_digest

        return current_digest(self.index_dir) == (index or self.index).digest

    def refresh(self, log=None) -> bool:
        """Take up what is on disk when it is not what this engine opened (an update or a tuning ran while
        a server was up): the index (a new build), its voting parameters and calibration are reopened;
        tables cached for another build are dropped. True when it did. The check is a few stats and a
        hash of index.json; the swap waits only for a search in progress. IndexChanged when the new state
        cannot be taken up: still being replaced, unreadable, or built with another model (which needs a
        restart to load)."""
        from index.search import IndexError_

        disk = self._on_disk()
        if disk == self._disk:
            return False
        if disk[0] is None:
            raise IndexChanged(f"{self.index_dir} is being replaced (an update is under way); try again "
                               "shortly")
        index = self.index
        if disk[0] != index.digest:
            try:
                index = GeoIndex(self.index_dir, device=self._device)
            except IndexError_ as e:
                raise IndexChanged(f"{self.index_dir} changed and cannot be opened yet ({e}); try again "
                                   "shortly") from None
            if self.backbone is not None and index.backbone not in (None, self.backbone.name):
                raise IndexChanged(f"{self.index_dir} now holds embeddings of {index.backbone}, not of the "
                                   f"loaded {self.backbone.name}: restart the server to load that model")
        try:
            params, calibration, albums = self._read_tuning()
        except ConfigError as e:
            raise IndexChanged(f"{self.index_dir}: its tuning changed and cannot be read ({e}); try again "
                               "shortly, or rerun `python -m retrieve.tune`") from None
        with self._lock:
            self.index, self.params, self.calibration, self.albums = index, params, calibration, albums
            self._disk = disk
            self._archived = None  # an update may have embedded other archives
            for key in [k for k in self._tables if k[1] != index.digest]:
                del self._tables[key]
        if log:
            tuned = "calibrated" if calibration is not None else "uncalibrated: not tuned (yet)"
            log(f"the engine changed on disk: now answering from {index.count:,} images, {tuned}")
        return True

    def _table(self, key: tuple, path: Path, ok, compute, index) -> np.ndarray:
        """A table derived from `index` (a snapshot: a refresh may swap self.index meanwhile), computed
        once per build and cached in memory and on disk (_cached)."""
        if key not in self._tables:
            self._tables[key] = _cached(path, ok, compute, lambda: self._still_current(index))
        return self._tables[key]

    @property
    def tuned(self) -> bool:
        return self.layout.params.exists()

    def untuned_warning(self) -> str | None:
        """What a command tells its user when the voting settings were never tuned for this index."""
        if self.tuned:
            return None
        return (f"warning: {self.layout.params} is missing (tuning never ran or did not finish): answering "
                "with the default voting settings; run `python -m retrieve.tune`")

    def cells(self, params: VoteConfig | None = None, index=None) -> np.ndarray:
        """(N, L) cell table of the index's rows for `params` (cached in the index folder)."""
        params, index = params or self.params, index or self.index
        shape = (index.count, len(params.levels))
        return self._table(("cells", index.digest, params.cell_spec), self.layout.cells(params.cell_spec,
                                                                                       index.digest),
                           lambda t: t.shape == shape and t.dtype.kind in "iu",
                           lambda: cell_table(np.asarray(index.lat), np.asarray(index.lon), params), index)

    def spacing(self, index=None) -> np.ndarray:
        """(N,) each index row's gallery spacing in km (geovote.geo.spacing_km: the distance to its
        SPACING_NEIGHBOURS-th nearest other row), the feature log_gallery_spacing_km's input; cached."""
        from geovote.geo import spacing_km

        m, index = SPACING_NEIGHBOURS, index or self.index
        return self._table(("spacing", index.digest, m), self.layout.spacing(m, index.digest),
                           lambda t: t.shape == (index.count,) and t.dtype == np.float64,
                           lambda: spacing_km(np.asarray(index.lat), np.asarray(index.lon), m), index)

    def _rows_by_country(self, index) -> tuple[np.ndarray, np.ndarray]:
        """(country codes sorted, the rows in that order): one sort, then a country's rows are a slice"""
        key = ("by country", index.digest)
        if key not in self._tables:
            codes = np.asarray(self.countries(index))
            order = np.argsort(codes, kind="stable")
            self._tables[key] = (codes[order], order)
        return self._tables[key]

    def countries(self, index=None) -> np.ndarray:
        """(N,) each index row's ISO country code (bytes), computed once and cached in the index folder."""
        index = index or self.index

        def compute():
            from retrieve.region import country_codes

            codes = np.empty(index.count, "S2")
            for start in range(0, index.count, 1_000_000):  # bounded memory at 5M rows
                stop = min(index.count, start + 1_000_000)
                codes[start:stop] = np.char.encode(
                    country_codes(np.asarray(index.lat[start:stop]),
                                  np.asarray(index.lon[start:stop])).astype(str), "ascii")
            return codes

        rows = (index.count,)
        return self._table(("countries", index.digest), self.layout.countries(index.digest),
                           lambda t: t.shape == rows and t.dtype.kind == "S", compute, index)

    def region_rows(self, region, index=None) -> np.ndarray:
        """Sorted rows of `index` (default: the current one) inside `region` (retrieve.region), or
        RegionError when there are none. Not under the engine's lock: the first region of a large index
        computes every row's country, and batches go on meanwhile."""
        from retrieve.region import RegionError

        index = index or self.index
        key = ("region", index.digest, region)
        if key not in self._tables:
            if region.countries:  # each country's rows are a slice of the rows sorted by country
                codes, order = self._rows_by_country(index)
                keys = [c.encode("ascii") for c in dict.fromkeys(region.countries)]  # each once
                parts = [order[np.searchsorted(codes, k, "left"):np.searchsorted(codes, k, "right")]
                         for k in keys]
                rows = np.sort(np.concatenate(parts))
                rows = rows[region.in_box(index.lat[rows], index.lon[rows])]
            else:
                rows = np.flatnonzero(region.in_box(index.lat, index.lon))
            regions = [k for k in self._tables if k[0] == "region"]
            if len(regions) >= 16:  # a few regions are asked again and again; their rows are kept
                del self._tables[regions[0]]
            self._tables[key] = rows
        rows = self._tables[key]
        if rows.size == 0:
            raise RegionError(f"no training image of this engine lies in {region.describe()}: nothing to "
                              "answer from there")
        return rows

    def gallery_image(self, image_id: str):
        """The file of one of this engine's training images (the evidence behind an answer), or None
        (gallery_lookup says why)."""
        return self.gallery_lookup(image_id)[0]

    def gallery_lookup(self, image_id: str) -> tuple:
        """(the file of one of this engine's training images, or None; why not, or ""). Only an id the
        index holds, and only a file inside <dataset>/images/<split>/ of the embeddings it was built from
        (one sub-folder deep, as OSV-5M's archives and the sample unpack), or for a gallery of photos
        (embed.build --photos) the file at that relative path inside its folder, is ever returned: a
        link to a file elsewhere is named as such, not followed."""
        from retrieve.share import MANIFEST

        manifest = self.index.info.get("embedding_manifest") or {}
        root, split = manifest.get("dataset"), manifest.get("split", "train")
        # a published engine (retrieve.share, from the hub or not): its index.json is someone else's
        # word, so no file is ever looked up from it
        if (self.layout.root / MANIFEST).is_file() or (root and not Path(root).is_absolute()):
            return None, (f"a published engine: gallery image {image_id!r} is known by its id and place, "
                          "not a file here")
        if not root or not image_id or not str(image_id).isprintable():
            return None, f"no gallery image {image_id!r} in this engine"
        try:
            wanted = str(image_id).encode("utf-8")
        except UnicodeError:
            return None, "not a gallery image id (not UTF-8)"
        if not np.any(np.asarray(self.index.ids) == wanted):  # ~15 ms over 5M ids
            return None, f"no gallery image {image_id!r} in this engine"
        if manifest.get("images") == "photos" or (manifest.get("config") or {}).get("photos"):  # or older
            base = Path(root).resolve()
            path = (base / str(image_id)).resolve()  # a link or a ".." out of the folder: refused below
            if base not in path.parents:
                return None, (f"gallery image {image_id!r} is a link to a file outside the gallery folder "
                              f"{base}: not served")
            return (path, "") if path.is_file() else (None, f"gallery image {image_id!r} is no longer in "
                                                             f"{base}")
        member, why = self._archived_image(str(image_id), Path(root), split, manifest.get("images"))
        if member is not None:
            return member, ""
        base = (Path(root) / "images" / split).resolve()
        name = f"{image_id}.jpg"
        candidates = [base / name]
        if base.is_dir():
            candidates += [d / name for d in sorted(base.iterdir()) if d.is_dir()]
        for path in candidates:
            path = path.resolve()  # a link out of the gallery resolves outside `base`: refused
            if path.is_file() and base in path.parents and len(path.relative_to(base).parts) <= 2:
                return path, ""  # (also an image whose archive was extracted since the build)
        return None, why or f"the file of gallery image {image_id!r} is not in {base}"

    def _archived_image(self, image_id: str, root: Path, split: str, images: str | None) -> tuple:
        """(the gallery image as a member of its archive (geovote.archives.Member), "") when it was read
        from one at the build; (None, why) when that archive is gone or outside the dataset; (None, "")
        when it was not archived. From archived-images.parquet, read once per engine: ids sorted (UTF-8
        byte order, as pyarrow sorts them), looked up by bisection."""
        from geovote.archives import Member, split_path

        loaded = self._archived
        if loaded is None:
            import pyarrow.parquet as pq

            path = self.layout.archived_images(split)
            if path.is_file():
                t = pq.read_table(path)
                ids = np.char.encode(t.column("id").to_numpy(zero_copy_only=False).astype(str), "utf-8")
                loaded = (ids, t.column("path").combine_chunks())
            else:
                loaded = (np.zeros(0, "S1"), None)
            self._archived = loaded
        ids, paths = loaded
        wanted = image_id.encode("utf-8")
        at = int(np.searchsorted(ids, wanted))
        where = split_path(paths[at].as_py()) if at < len(ids) and ids[at] == wanted else None
        if where is None:
            return None, ""
        # OSV-5M's archives lie in <dataset>/images/<split>/, webdataset shards in the dataset's folder
        base = (root if images == "shards" else root / "images" / split).resolve()
        archive = (root / where[0]).resolve()
        if base != archive.parent and base not in archive.parents:
            return None, f"gallery image {image_id!r}: its archive is outside {base}: not served"
        if not archive.is_file():
            return None, f"gallery image {image_id!r}: its archive {archive} is gone"
        return Member(str(archive), where[1]), ""

    def embed_images(self, images: list) -> np.ndarray:
        """PIL images -> (N, dim) L2-normalised float32 embeddings."""
        return self.features.images(images)

    def search(self, emb: np.ndarray, k: int, subset=None, index=None):
        return (index or self.index).search(emb, k=k, backbone=self.backbone.name if self.backbone else None,
                                            subset=subset)

    def locate(self, emb: np.ndarray, params: VoteConfig | None = None, alternatives: bool = True,
               calibrated: bool = True, region=None):
        """(Prediction, SearchResult) for a batch of query embeddings. Calibrated (the engine has a
        calibration): the candidate table (retrieve.candidates) and the one decision of
        retrieve.calibrate (the candidate of highest expected GeoScore, with its probabilities);
        else the vote's peak. `alternatives=False` skips the runner-up peaks where nothing needs them
        (an uncalibrated answer nobody reads them in). `region` (retrieve.region.Region): only training
        images inside vote, and only candidates inside are kept (the neighbours all are). The index,
        voting parameters and calibration are taken together at the start, so a refresh meanwhile
        never mixes two builds in one answer."""
        from retrieve.calibrate import decide

        with self._lock:
            index, stored, calibration = self.index, self.params, self.calibration
        params = params or stored
        calibrate = calibrated and calibration is not None
        if not alternatives and not calibrate:
            params = replace(params, n_alternatives=0)
        pred, res, table = self._candidates(emb, params, index, calibrate or bool(region), region)
        if table is None:
            return pred, res
        return decide(calibration if calibrate else None, table, params.n_alternatives), res

    def locate_albums(self, emb: np.ndarray, albums: list, spread_km: float | None = None, region=None):
        """(retrieve.album.AlbumAnswers, SearchResult): each album (an array of rows of `emb`) answered
        once from all its photos (retrieve.album), and each photo alone. Needs a calibrated engine.
        `spread_km`: how far apart an album's photos may be (default: the tuned one)."""
        from retrieve.album import answer_albums
        from retrieve.calibrate import decide

        with self._lock:
            index, params, calibration, tuned = self.index, self.params, self.calibration, self.albums
        if calibration is None:
            raise ConfigError(f"{self.index_dir}: photos are located together from their calibrated "
                              "candidates, and this engine is not tuned: run `python -m retrieve.tune`")
        _, res, table = self._candidates(emb, params, index, True, region)
        within = calibration.within(table.features)
        single = decide(calibration, table, params.n_alternatives, within=within)
        spread = tuned.spread_km if spread_km is None else float(spread_km)
        return answer_albums(tuned.model, calibration, table, within, single, albums, spread,
                             params.n_alternatives, tuned.spread_km), res

    def candidates(self, emb: np.ndarray, region=None):
        """(Candidates, SearchResult): the table a calibrated engine's answer is chosen from
        (retrieve.candidates), for benchmark's best-candidate ceiling and for inspection."""
        with self._lock:
            index, params = self.index, self.params
        _, res, table = self._candidates(emb, params, index, True, region)
        return table, res

    def _candidates(self, emb, params, index, table: bool, region):
        """(the vote's Prediction, SearchResult, the candidate table or None)."""
        from retrieve.candidates import restrict

        res = self.search(emb, params.k, subset=self.region_rows(region, index) if region else None,
                          index=index)
        pred, cands = self.vote_on(res, params, index, table)
        return pred, res, restrict(cands, region) if region and cands is not None else cands

    def vote_on(self, res, params: VoteConfig, index=None, table: bool = True):
        """(the vote's Prediction, the candidate table or None) of a search's first params.k neighbours:
        what locate decides on, and what tuning fits the distance model to (on searches of its own)."""
        from retrieve.candidates import candidate_table

        index, k = index or self.index, params.k
        sim, lat, lon = res.similarity[:, :k], res.lat_deg[:, :k], res.lon_deg[:, :k]
        rows = np.maximum(res.rows[:, :k], 0)
        cells = np.asarray(self.cells(params, index))[rows]
        spacing = np.asarray(self.spacing(index))[rows] if table else None
        pred = vote(sim, lat, lon, cells, params, spacing, far_pick=table)
        return pred, (candidate_table(sim, lat, lon, pred, params, spacing) if table else None)


__all__ = ["Engine", "IndexChanged", "Prediction", "VoteConfig", "load_params", "save_params"]
