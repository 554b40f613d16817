"""AA-CLIP tests (a package, so that test file names may repeat across model folders)."""
