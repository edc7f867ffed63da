"""Text preparation, torch-free, for producers and workers alike: character classes,
predicted speech length, and segmentation of long text into jobs."""
