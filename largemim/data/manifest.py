"""The shard-set manifest: which shards a data set has and how many samples each holds.

Written next to the shards as ``manifest.json`` by the shard writers; read by the trainer to know the
data set's size (so epochs can be converted to steps) without opening every tar.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from largemim.files import write_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "largemim-shards/1"


@dataclass
class ShardInfo:
    url: str  # relative to the manifest's folder, or absolute
    samples: int


@dataclass
class Manifest:
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = MANIFEST_FORMAT

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> str:
        body = {"format": self.format, "total_samples": self.total_samples, "shards": [asdict(s) for s in self.shards]}
        return json.dumps(body, indent=1)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write atomically, so a crash never leaves a half-written manifest."""
        path = Path(folder) / MANIFEST_NAME
        write_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no shard manifest at {path}; count the shards there with tools/write_manifest.py (shards "
                "written by tools/make_shards.py come with one), or set data.num_samples in the config"
            ) from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: str | os.PathLike) -> Manifest:
        """A manifest's text, read from ``path`` (named in the errors)."""
        try:
            body = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); write it again with tools/make_shards.py") from None
        if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
            found = body.get("format") if isinstance(body, dict) else type(body).__name__
            raise ValueError(f"{path}: unknown manifest format {found!r}, expected {MANIFEST_FORMAT!r}")
        try:
            return cls(shards=[ShardInfo(url=str(s["url"]), samples=int(s["samples"])) for s in body["shards"]])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}: a shard entry is not {{'url': ..., 'samples': N}} ({type(e).__name__}: {e}); write the "
                "manifest again with tools/make_shards.py"
            ) from None
