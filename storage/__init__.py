"""Object stores (local directory, S3) behind one small interface."""

from storage.base import Storage, StorageError, open_storage, safe_key

__all__ = ["Storage", "StorageError", "open_storage", "safe_key"]
