"""Page retrieval: ingestion, ColQwen2 multi-vector embeddings, sharded index, text and hybrid search, serving."""
