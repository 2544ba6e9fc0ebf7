"""Vectors: the refresher (dirty state -> text -> vector -> store), the vector store (Milvus), re-index between
model versions, the candidates API, and live recall. Imports ``models``, ``streams`` and ``core``; never ``training``."""
