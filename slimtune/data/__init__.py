"""Data: sources (hub, json/jsonl/txt/parquet), CPT packing, SFT chat formatting with loss masks, mixing, batches."""

from slimtune.data.chat import IGNORE_INDEX
from slimtune.data.dataset import TrainData, build_dataset, collate, count_target_tokens

__all__ = ["IGNORE_INDEX", "TrainData", "build_dataset", "collate", "count_target_tokens"]
