"""Resolve a data spec from the config into shards with known sample counts, and check them.

A spec is one of:
  - a dataset directory written by `dist-train make-shards` (its `dataset.json` names the
    split's shards and their sample counts),
  - a brace pattern such as `data/train-{000000..000007}.tar`, a glob, or a single file,
  - a directory of plain `.tar` shards without a manifest (all of them, sorted),
  - a list of any of these.
Each may be an `https://`, `http://` or `s3://` URL (a dataset directory: the URL its
`dataset.json` lies under), read through the node's shard cache (data/shard_cache.py).

Shards written elsewhere (e.g. by `webdataset.ShardWriter`) have no manifest: they are indexed
once by reading their tar headers and `.cls` members, which also checks each label against the
number of classes, so a wrong label stops the run before training starts, naming the shard and
the sample key.
"""

from __future__ import annotations

import glob
import json
import posixpath
from dataclasses import replace
from pathlib import Path

import braceexpand

from dist_train.data import remote
from dist_train.data.labels import MAX_LABEL_BYTES, LabelReader, class_counts
from dist_train.data.shard_cache import ShardCache
from dist_train.data.shard_format import IMAGE_EXTENSIONS, MANIFEST_NAME, Damage, Shard, ShardSet
from dist_train.data.tar_index import Spans, TarIndex, index_tar, index_tar_spans, index_tar_until_damage
from dist_train.errors import ConfigError, DataError


def resolve_shards(spec: str | list[str], split: str, num_classes: int, skip_damaged: bool = False,
                   cache: ShardCache | None = None, labels: LabelReader | None = None) -> ShardSet:
    """Expand `spec`, check that every shard exists, and learn every shard's sample count.

    `split` ("train" or "val") picks the split of a dataset directory. `num_classes` (0 when
    unknown) bounds labels of shards without a manifest. With `skip_damaged` (data.on_error=
    skip) every shard is scanned, manifest or not, and damaged samples and shards are left
    out and listed in `ShardSet.damage` instead of stopping the run. `cache` holds remote
    shards that must be read to be counted (those without a manifest). `labels` reads and
    checks labels (default: one integer label per sample, below `num_classes`).
    """
    labels = labels or LabelReader(num_classes)
    specs = spec if isinstance(spec, list) else [spec]
    if not specs or not all(isinstance(s, str) and s for s in specs):
        raise DataError(f"data.{split} is empty: give a dataset directory or shard pattern")
    shards: list[Shard] = []
    class_names: list[str] | None = None
    task = None
    for one in specs:
        if remote.is_remote(one):
            found, manifest = _resolve_remote(one, split, labels, skip_damaged, cache)
        else:
            found, manifest = _resolve_one(one, split, labels, skip_damaged)
        shards.extend(found)
        class_names = class_names or (list(manifest["classes"]) if manifest else None)
        task = task or (manifest.get("task", "multiclass") if manifest else None)
    urls = [s.url for s in shards]
    if len(set(urls)) != len(urls):
        raise DataError(f"data.{split} names a shard more than once")
    if not skip_damaged:
        return ShardSet(tuple(shards), class_names, task=task)
    usable, damage = [], []
    for shard in shards:
        scanned, found = scan_shard(shard.url, labels, expected=shard.samples)
        damage.extend(found)
        if scanned.samples:
            usable.append(scanned)
    return ShardSet(tuple(usable), class_names, tuple(damage), task)


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_NAME
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"{path}: not a readable dist-train manifest ({exc})") from None
    inside = directory.resolve()
    return _checked_manifest(text, str(path), lambda file: (directory / file).resolve().is_relative_to(inside))


def _checked_manifest(text: str, where: str, inside) -> dict:
    try:
        manifest = json.loads(text)
        manifest["splits"]
        manifest["classes"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: nested thousands deep
        raise DataError(f"{where}: not a readable dist-train manifest ({str(exc)[:200]})") from None
    problem = _manifest_problem(manifest, inside)
    if problem:
        raise DataError(f"{where}: {problem}")
    return manifest


def _manifest_problem(manifest: dict, inside) -> str | None:
    """What is wrong with a manifest's classes and shard entries (None: nothing). A manifest
    from elsewhere must not name files outside its directory (`inside(file)` says), nor counts
    that are no counts."""
    classes, splits = manifest["classes"], manifest["splits"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "classes must be a list of names"
    if not isinstance(splits, dict):
        return "splits must map split names to their shards"
    for name, split in splits.items():
        entries = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            return f"split {name!r} has no list of shards"
        spans = split.get("spans", "x")
        if not isinstance(spans, str) or not spans or not inside(spans):
            return f"split {name!r}: spans file {str(spans)[:100]!r} is not a file inside the dataset's directory"
        for entry in entries:
            file, samples = entry.get("file"), entry.get("samples")
            if not isinstance(file, str) or not file or not inside(file):
                return f"split {name!r}: shard file {str(file)[:100]!r} is not a file inside the dataset's directory"
            if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
                return f"split {name!r}: shard {file!r} has samples={str(samples)[:40]}, not a count"
            counts = entry.get("class_counts", [])
            if not isinstance(counts, list) or not all(_is_count(c) for c in counts):
                return f"split {name!r}: shard {file!r} has class_counts={str(counts)[:40]}, not a list of counts"
    if manifest.get("task", "multiclass") not in ("multiclass", "multilabel"):
        return f"task {str(manifest.get('task'))[:40]!r} is not multiclass or multilabel"
    return None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _resolve_one(spec: str, split: str, labels: LabelReader, skip_damaged: bool) -> tuple[list[Shard], dict | None]:
    if "://" in spec or spec.startswith("pipe:"):
        raise DataError(
            f"{spec}: remote shards are not supported yet; copy them to a local or shared "
            "filesystem (sample counts are needed to give every process equal work)"
        )
    path = Path(spec)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return _from_manifest(path, split, skip_damaged)
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.tar"))
        if not files:
            raise DataError(f"{spec}: directory holds no .tar shards and no {MANIFEST_NAME}")
    elif any(c in spec for c in "*?["):
        files = sorted(glob.glob(spec))
        if not files:
            raise DataError(f"{spec}: no shard files match this pattern")
    else:
        files = list(braceexpand.braceexpand(spec))
    missing = [f for f in files if not Path(f).is_file()]
    if missing and not skip_damaged:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"missing shard file: {missing[0]}{more}")
    manifests: dict[Path, tuple[dict[str, dict], dict | None]] = {}
    shards = []
    first_manifest = None
    for f in files:
        if Path(f).parent not in manifests:
            manifests[Path(f).parent] = _manifest_entries(Path(f).parent)
        entries, manifest = manifests[Path(f).parent]
        first_manifest = first_manifest or manifest
        entry = entries.get(Path(f).name)
        if entry is not None:
            shards.append(_from_entry(f, entry))
        elif skip_damaged:  # scanned later; -1: count unknown
            shards.append(Shard(f, -1))
        else:
            samples, counts = index_labels(f, labels)
            shards.append(Shard(f, samples, class_counts=counts))
    return shards, first_manifest


def _from_entry(url: str, entry: dict, **extra) -> Shard:
    extra.setdefault("sha256", str(entry.get("sha256") or ""))  # checked: on download, or as the index is built
    return Shard(url, int(entry["samples"]), class_counts=tuple(entry.get("class_counts", ())), **extra)


def _resolve_remote(spec: str, split: str, labels: LabelReader, skip_damaged: bool,
                    cache: ShardCache | None) -> tuple[list[Shard], dict | None]:
    """Remote shards: a dataset directory's URL or a brace pattern of shard URLs. Every object
    is asked for its size now, so a missing one stops the run before it starts."""
    if skip_damaged:
        raise ConfigError(f"{spec}: data.on_error=skip scans shards on a local filesystem only; "
                          "use data.on_error=raise for remote shards")
    if any(c in spec for c in "*?["):
        raise ConfigError(f"{spec}: a remote glob needs a listing; give a brace pattern "
                          "(shard-{000000..000099}.tar) or the dataset directory's URL")
    entries: dict[str, dict] = {}
    if spec.rstrip("/").endswith(".tar") or "{" in spec:
        urls = list(braceexpand.braceexpand(spec))
        manifest = _remote_manifest(remote.parent(urls[0]), required=False)
        if manifest:
            entries = {remote.join(remote.parent(urls[0]), e["file"]): e
                       for one in manifest["splits"].values() for e in one["shards"]}
    else:
        manifest = _remote_manifest(spec, required=True)
        if split not in manifest["splits"]:
            raise DataError(f"{remote.join(spec, MANIFEST_NAME)}: has no {split!r} split")
        entries = {remote.join(spec, e["file"]): e for e in manifest["splits"][split]["shards"]}
        urls = list(entries)
    sizes = remote.sizes(urls)
    shards = []
    for url, size in zip(urls, sizes, strict=True):
        entry = entries.get(url, {})
        if entry.get("bytes") not in (None, size):
            raise DataError(f"{url}: {size} bytes on the server, {entry['bytes']} in its {MANIFEST_NAME} "
                            "(replaced since the manifest was written?)")
        shard = Shard(url, -1, bytes=size, sha256=str(entry.get("sha256") or ""))
        if entry:
            shards.append(_from_entry(url, entry, bytes=size, sha256=shard.sha256))
            continue
        if cache is None:  # no manifest: read it (through the cache) to count and check it
            raise DataError(f"{url}: remote shards without a {MANIFEST_NAME} need a shard cache to be counted")
        with cache.open_pinned(shard.as_remote_object()) as local:
            samples, counts = index_labels(local.name, labels, where=url)
        shards.append(replace(shard, samples=samples, class_counts=counts))
    return shards, manifest


def _remote_manifest(directory: str, required: bool) -> dict | None:
    url = remote.join(directory, MANIFEST_NAME)
    try:
        text = remote.read_bytes(url).decode("utf-8", "replace")
    except remote.AccessDenied:
        raise  # says so: "not found" would send the user looking for a file that is there
    except remote.MissingObject:
        if required:
            raise DataError(f"{directory}: no {MANIFEST_NAME} there ({url} not found); give the dataset "
                            "directory's URL, or shard URLs as a brace pattern") from None
        return None
    return _checked_manifest(text, url, inside_remote_directory)


def inside_remote_directory(file: str) -> bool:
    """Whether a remote manifest's file name stays inside its directory once joined to its URL.
    No `%` (the URL library would decode `%2e%2e/` to `../` after this check), `\\`, `?`, `#`
    or control characters: make-shards never writes them, and a server may read them as
    anything; then no absolute path, no `..` after normalising."""
    if not file.isprintable() or any(c in file for c in "%\\?#") or "://" in file:
        return False
    normal = posixpath.normpath(file)
    return not normal.startswith(("/", "..")) and normal != "."


def _from_manifest(directory: Path, split: str, skip_damaged: bool) -> tuple[list[Shard], dict]:
    manifest = read_manifest(directory)
    if split not in manifest["splits"]:
        raise DataError(f"{directory / MANIFEST_NAME}: has no {split!r} split")
    shards, row = [], 0
    spans = manifest["splits"][split].get("spans")
    for entry in manifest["splits"][split]["shards"]:
        path = directory / entry["file"]
        if not path.is_file() and not skip_damaged:
            raise DataError(f"missing shard file: {path} (listed in {MANIFEST_NAME})")
        where = {"spans_file": str(directory / spans), "spans_row": row} if spans else {}
        shards.append(_from_entry(str(path), entry, **where))
        row += int(entry["samples"])
    return shards, manifest


def _manifest_entries(directory: Path) -> tuple[dict[str, dict], dict | None]:
    """Shard entries by file name from a manifest beside the shards, and the manifest, if any."""
    if not (directory / MANIFEST_NAME).is_file():
        return {}, None
    manifest = read_manifest(directory)
    entries = {entry["file"]: entry for split in manifest["splits"].values() for entry in split["shards"]}
    return entries, manifest


def index_labels(path: str, labels: LabelReader, where: str = "") -> tuple[int, tuple[int, ...]]:
    """(samples, class counts) of one local tar shard, its labels checked, no image decoded.
    `where`: the shard's name in errors (its URL, for a cached copy of a remote shard)."""
    where = where or path
    try:
        entries = index_tar(path)
    except DataError as exc:
        raise DataError(str(exc).replace(path, where)) from None
    if not entries:
        raise DataError(f"{where}: {_no_samples(path)}; remove it, or set data.on_error=skip")
    problems, found = _sample_problems(path, entries, labels, stop_at_first=True)
    if problems:
        raise DataError(f"{where}: {problems[0][1]}")
    return len(entries), class_counts(found, labels.num_classes)


def _no_samples(path: str) -> str:
    """Why a shard holds no sample: it is empty, or it is not a tar file at all (an HTML login
    or error page that a server answered in its place, say)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.strip(b"\0"):
        return "empty shard (no samples)"
    if head.lstrip().startswith(b"<"):  # <!DOCTYPE html>, <html>, <?xml ...>: S3 and web servers' errors
        return f"not a tar shard but a web page (it begins {head[:32]!r}): an error or login page from the server?"
    return f"not a tar shard (it begins {head[:32]!r})"


def scan_shard(path: str, labels: LabelReader, expected: int = -1) -> tuple[Shard, list[Damage]]:
    """data.on_error=skip: the shard with its damaged samples left out, and what was left out.

    `expected`: the sample count a manifest gives (-1: unknown), to count what a missing or
    cut-short file loses.
    """
    if not Path(path).is_file():
        return Shard(path, 0), [Damage(path, "missing shard file", max(expected, 0))]
    try:
        entries, _, cut = index_tar_until_damage(path)
        problems, found = _sample_problems(path, entries, labels)
    except DataError as exc:  # not a tar at all, or unreadable
        return Shard(path, 0), [Damage(path, str(exc).removeprefix(f"{path}: "), max(expected, 0))]
    damage = [Damage(path, problem, 1) for _, problem in problems]
    if cut is not None:
        # Samples after the damage: a manifest knows how many; else the one cut, if any.
        lost = max(expected - len(entries), 0) if expected >= 0 else cut.lost
        damage.append(Damage(path, f"unreadable tar shard ({cut.reason}); read the samples before it", lost,
                             rest_unknown=expected < 0))
    if not entries and cut is None:
        damage.append(Damage(path, "empty shard (no samples)", 0))
    exclude = frozenset(key for key, _ in problems)
    return Shard(path, len(entries) - len(exclude), exclude, truncated=cut is not None,
                 class_counts=class_counts(found, labels.num_classes)), damage


def usable_index(shard: Shard, local_path: str = "") -> tuple[TarIndex, Spans]:
    """The index readers use, and each sample's span: the shard's samples less those
    `scan_shard` left out. `local_path`: where the shard's bytes are (a remote shard's cached copy)."""
    path = local_path or shard.url
    if not shard.damaged:
        try:
            return index_tar_spans(path)
        except DataError as exc:
            raise DataError(str(exc).replace(path, shard.url)) from None
    entries, spans, _ = index_tar_until_damage(path)
    kept = [i for i, (key, _) in enumerate(entries) if key not in shard.exclude]
    return [entries[i] for i in kept], [spans[i] for i in kept]


def shard_labels(shard: Shard, labels: LabelReader, local_path: str = "") -> list[int | tuple[int, ...]]:
    """The label of each sample `usable_index` gives, in its order (`.cls` / `.json` members read
    by offset, no image decoded). `local_path`: a remote shard's cached copy."""
    problems, found = _sample_problems(local_path or shard.url, usable_index(shard, local_path)[0], labels,
                                       stop_at_first=True)
    if problems:
        raise DataError(f"{shard.url}: {problems[0][1]}")
    return found


def _sample_problems(path: str, entries: TarIndex, labels: LabelReader, stop_at_first: bool = False
                     ) -> tuple[list[tuple[str, str]], list[int | tuple[int, ...]]]:
    """(key, problem) for each sample without an image, without a label, or with a bad label;
    and the labels of the others."""
    if len({key for key, _ in entries}) != len(entries):
        raise DataError(f"{path}: members of one sample are not stored together")
    problems, found = [], []
    with open(path, "rb") as f:
        for key, members in entries:
            problem = None
            member = labels.member(members)
            if not any(ext in members for ext in IMAGE_EXTENSIONS):
                problem = f"sample {key!r} has no image member ({'/'.join(IMAGE_EXTENSIONS)})"
            elif member is None:
                problem = f"sample {key!r} {labels.missing()}"
            else:
                offset, size = members[member]
                f.seek(offset)
                try:
                    # One byte past the limit at most: enough for the reader to refuse it whole.
                    found.append(labels.read(f.read(min(size, MAX_LABEL_BYTES + 1)), member, where=f"sample {key!r}"))
                except DataError as exc:
                    problem = str(exc)
            if problem:
                problems.append((key, problem))
                if stop_at_first:
                    break
    return problems, found
