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
            body = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no shard manifest at {path}; write shards with tools/make_shards.py (it writes one), "
                "or set data.num_samples in the config"
            ) from None
        if body.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{path}: unknown manifest format {body.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        return cls(shards=[ShardInfo(**s) for s in body["shards"]])
