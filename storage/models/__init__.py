"""Model files: where they come from (hub, S3, HTTP mirror, folder), how they are fetched
(ranged, resumable, verified), what they are (manifests, signatures) and the node's cache.
Torch-free: building and loading a model lives with the engine (workers/engine)."""
