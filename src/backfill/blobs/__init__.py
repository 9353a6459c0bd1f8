"""Blob store: the bytes of files, segments and outputs, over obstore."""

from backfill.blobs.base import Blobs
from backfill.blobs.obstore_blobs import ObjectBlobs, open_blobs

__all__ = ["Blobs", "ObjectBlobs", "open_blobs"]
