"""Rewards: retrieval NDCG (ndcg), rule answer metrics (answer), LLM judge (judge), their combination (score)."""
