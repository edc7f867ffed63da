"""Can this process use its store? A probe object written, read back and deleted: what
`ttspool doctor` checks and what a worker asks before it takes a job, and the fix for
each way it fails (one text for both)."""

from __future__ import annotations

import time
import uuid

from storage.base import Storage, StorageError

_S3_FIXES = {
    "NoCredentialsError": "give this process S3 credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                          "AWS_PROFILE, or an instance role)",
    "PartialCredentialsError": "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "InvalidAccessKeyId": "use an access key the endpoint knows (AWS_ACCESS_KEY_ID, AWS_PROFILE), "
                          "and check TTSPOOL_S3_ENDPOINT_URL",
    "SignatureDoesNotMatch": "use the secret that belongs to the access key (AWS_SECRET_ACCESS_KEY)",
    "NoSuchBucket": "create the bucket, or name an existing one in TTSPOOL_STORAGE_URL",
    "InvalidBucketName": "name an existing bucket in TTSPOOL_STORAGE_URL (s3://bucket/prefix)",
}
_S3_RIGHTS = ("allow these credentials PutObject, GetObject and DeleteObject on the bucket "
              "(TTSPOOL_STORAGE_URL, TTSPOOL_S3_ENDPOINT_URL)")
_S3_UNREACHABLE = "check TTSPOOL_S3_ENDPOINT_URL (or the network to S3): nothing answered there"


def probe(store: Storage) -> None:
    """Write, read back and delete a small object; StorageError when any step fails."""
    key = f"ttspool-probe-{uuid.uuid4().hex}.txt"
    payload = f"ttspool probe {time.time()}".encode()
    store.put_bytes(key, payload, "text/plain")
    if store.get_bytes(key) != payload:
        raise StorageError(f"{store.base_url}: the probe object read back differently")
    store.delete(key)


def fix_for(url: str, err: Exception) -> str:
    """What to change when the store at `url` (TTSPOOL_STORAGE_URL) fails with `err`:
    a malformed URL, or a failed probe."""
    code = getattr(err, "code", "")
    if not isinstance(err, StorageError):  # the URL itself (storage.open_storage's ValueError)
        if url.startswith("/"):
            return f"TTSPOOL_STORAGE_URL=file://{url} (a folder is a file:// URL with its absolute path)"
        if url.startswith("file:"):
            return "a folder is a file:// URL with an absolute path and three slashes: file:///abs/dir"
        return "set TTSPOOL_STORAGE_URL to file:///abs/dir or s3://bucket[/prefix]"
    if url.startswith("s3:"):
        if code in _S3_FIXES:
            return _S3_FIXES[code]
        if code in ("AccessDenied", "AllAccessDisabled", "AccountProblem"):
            return _S3_RIGHTS
        if code.endswith(("ConnectionError", "TimeoutError")):
            return _S3_UNREACHABLE
        return f"create the bucket, and {_S3_RIGHTS}"
    return "create the folder and let this user write to it, or point TTSPOOL_STORAGE_URL at one (file:///abs/dir)"
