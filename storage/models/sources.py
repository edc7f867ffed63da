"""Where model files come from: the Hugging Face hub, an S3 bucket, an HTTP mirror, a folder.

Each source gets one file into a `.partial` path it is given and reports bytes as they
arrive; the cache (storage.models.cache) verifies and renames. A source never runs or
unpickles anything it fetched.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Callable, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

from tasks.settings import redact_url

from .fetch_http import FetchError, HttpDownload, HttpPolicy, http_get_small, make_pool
from .manifest import MANIFEST_NAME, SIGNATURE_NAME

HF_REPO = "2Noise/ChatTTS"
OnBytes = Callable[[int], None]


class Source(Protocol):
    kind: str  # the metrics label: hf | s3 | http | local (never a URL: it may carry secrets)
    display: str  # safe to log

    def manifest(self) -> tuple[bytes, bytes | None] | None:
        """(manifest.json bytes, signature bytes or None), or None when the source has none."""
        ...

    def fetch(self, rel: str, partial: Path, size: int | None, on_bytes: OnBytes) -> None: ...


def _display_url(url: str) -> str:
    parts = urlsplit(redact_url(url))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class HttpSource:
    kind = "http"

    def __init__(self, base: str, policy: HttpPolicy) -> None:
        self._base = base.rstrip("/")
        self.display = _display_url(self._base)
        self._policy = policy
        self._pool = make_pool(policy)

    def _url(self, rel: str) -> str:
        return f"{self._base}/{quote(rel)}"

    def manifest(self) -> tuple[bytes, bytes | None] | None:
        raw = http_get_small(self._pool, self._url(MANIFEST_NAME), f"{self.display}/{MANIFEST_NAME}", self._policy)
        if raw is None:
            return None
        sig = http_get_small(self._pool, self._url(SIGNATURE_NAME), f"{self.display}/{SIGNATURE_NAME}", self._policy)
        return raw, sig

    def fetch(self, rel: str, partial: Path, size: int | None, on_bytes: OnBytes) -> None:
        HttpDownload(self._pool, self._url(rel), f"{self.display}/{rel}", partial, self._policy, on_bytes).run(size)


class LocalSource:
    kind = "local"

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise FileNotFoundError(f"model source {root} is not a directory")
        self._root = root
        self.display = str(root)

    def manifest(self) -> tuple[bytes, bytes | None] | None:
        path, sig = self._root / MANIFEST_NAME, self._root / SIGNATURE_NAME
        if not path.is_file():
            return None
        return path.read_bytes(), sig.read_bytes() if sig.is_file() else None

    def fetch(self, rel: str, partial: Path, size: int | None, on_bytes: OnBytes) -> None:
        src = self._root / rel
        if not src.is_file():
            raise FetchError(f"{self.display}: {rel} is missing")
        partial.unlink(missing_ok=True)
        try:
            # Same filesystem: no copy at all. The hash check still reads every byte.
            os.link(src, partial)
        except OSError:
            shutil.copyfile(src, partial)
        on_bytes(partial.stat().st_size)


class S3Source:
    kind = "s3"

    def __init__(self, url: str, policy: HttpPolicy, endpoint_url: str | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        parts = urlsplit(url)
        if not parts.netloc:
            raise ValueError(f"bad S3 source {url!r}: expected s3://bucket/prefix")
        self._bucket, self._prefix = parts.netloc, parts.path.strip("/")
        self.display = f"s3://{self._bucket}/{self._prefix}"
        config = Config(retries={"mode": "standard", "max_attempts": policy.attempts},
                        connect_timeout=policy.connect_timeout_s, read_timeout=policy.read_timeout_s)
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, config=config)
        # boto3's managed transfer splits big objects into ranged GETs run in parallel.
        self._transfer = TransferConfig(multipart_threshold=policy.parallel_min, multipart_chunksize=16 * 1024 * 1024,
                                        max_concurrency=policy.max_streams)

    def _key(self, rel: str) -> str:
        return f"{self._prefix}/{rel}" if self._prefix else rel

    def _get(self, rel: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.get_object(Bucket=self._bucket, Key=self._key(rel))["Body"].read()
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise FetchError(f"{self.display}/{rel}: {err.response.get('Error', {}).get('Code')}") from None
        except BotoCoreError as err:
            raise FetchError(f"{self.display}/{rel}: {type(err).__name__}") from None

    def manifest(self) -> tuple[bytes, bytes | None] | None:
        raw = self._get(MANIFEST_NAME)
        return None if raw is None else (raw, self._get(SIGNATURE_NAME))

    def fetch(self, rel: str, partial: Path, size: int | None, on_bytes: OnBytes) -> None:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.download_file(self._bucket, self._key(rel), str(partial), Config=self._transfer, Callback=on_bytes)
        except ClientError as err:
            raise FetchError(f"{self.display}/{rel}: {err.response.get('Error', {}).get('Code')}") from None
        except (BotoCoreError, Boto3Error) as err:
            raise FetchError(f"{self.display}/{rel}: {type(err).__name__}") from None


class SourceUnreachable(FetchError):
    """The model source (the hub, or a mirror) cannot be reached: say so in one line, and
    name the ways on without it."""

    def __init__(self, endpoint: str, why: str) -> None:
        super().__init__(
            f"the model source {redact_url(endpoint)} is unreachable ({why}). Without it: "
            "--model random-tiny tries the whole pipeline offline with random weights; "
            "TTSPOOL_MODEL_DIR=/path/to/ChatTTS loads a local copy of the official weights; "
            "TTSPOOL_MODEL_SOURCE=s3://bucket/prefix, https://mirror/path or /dir fetches from a mirror "
            "(docs/MODELS.md)")


class HfSource:
    """The official weights from the Hugging Face hub.

    huggingface_hub resumes its own `.incomplete` downloads and uses its fast transfer
    backend (hf_xet) when installed; hf_transfer is no longer used by huggingface_hub >= 1.0.
    """

    kind = "hf"

    def __init__(self, revision: str | None) -> None:
        self._revision = revision
        self.display = f"hf:{HF_REPO}@{revision or 'main'}"
        self._reached = False

    def _check_reachable(self, endpoint: str) -> None:
        """Fail at once, in one line, when the hub cannot be reached at all.

        huggingface_hub retries a failed connection five times with backoff (~25 s) and
        then raises a multi-line LocalEntryNotFoundError; one unretried request tells a
        machine without internet apart from a flaky network, which its retries are for.
        """
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        if constants.HF_HUB_OFFLINE:
            raise SourceUnreachable(endpoint, "HF_HUB_OFFLINE is set")
        try:
            get_session().head(endpoint, timeout=10)
        # The transport's error classes depend on the huggingface_hub release (httpx, httpx2).
        except Exception as err:
            raise SourceUnreachable(endpoint, f"{type(err).__name__}: {err}") from None
        self._reached = True

    def manifest(self) -> tuple[bytes, bytes | None] | None:
        return None

    def fetch(self, rel: str, partial: Path, size: int | None, on_bytes: OnBytes) -> None:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        # Stage in the model's own folder (partial is <model folder>/<rel>.partial), so the
        # file is moved, not copied, and prune removes the staging area with the model.
        staging = partial.parents[len(PurePosixPath(rel).parts) - 1] / ".hf"
        # HF_ENDPOINT: an internal Hub mirror; read here, not only at huggingface_hub import.
        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        if not self._reached:
            self._check_reachable(endpoint)
        try:
            got = Path(hf_hub_download(HF_REPO, rel, revision=self._revision, local_dir=staging,
                                       endpoint=endpoint))
        except LocalEntryNotFoundError as err:  # the connection went away after the check
            raise SourceUnreachable(endpoint, str(err.__cause__ or err).splitlines()[0]) from None
        except OSError as err:  # the hub's HTTP and not-found errors are OSErrors
            raise FetchError(f"{self.display}: {rel}: {type(err).__name__}: {err}") from None
        os.replace(got, partial)
        on_bytes(partial.stat().st_size)


def open_source(spec: str, revision: str | None, policy: HttpPolicy, s3_endpoint_url: str | None = None) -> Source:
    """`hf`, `s3://bucket/prefix`, `http(s)://host/path`, or a directory.

    The revision is the Hub revision for `hf`; for the others, a sub-folder of the source.
    """
    if spec == "hf":
        return HfSource(revision)
    sub = f"/{revision}" if revision else ""
    scheme = urlsplit(spec).scheme
    if scheme == "s3":
        return S3Source(spec.rstrip("/") + sub, policy, s3_endpoint_url)
    if scheme in ("http", "https"):
        return HttpSource(spec.rstrip("/") + sub, policy)
    if scheme in ("", "file"):
        root = Path(urlsplit(spec).path if scheme == "file" else spec).expanduser()
        return LocalSource(root / revision if revision else root)
    raise ValueError(f"unknown model source {spec!r}: expected hf, s3://..., http(s)://... or a directory")
