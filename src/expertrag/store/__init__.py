from expertrag.store.docstore import DocStore, StoredPassage, UpsertCounts
from expertrag.store.manifest import Manifest, read_manifest, verify_files, write_manifest

__all__ = ["DocStore", "Manifest", "StoredPassage", "UpsertCounts", "read_manifest", "verify_files",
           "write_manifest"]
