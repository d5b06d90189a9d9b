"""Data: sources (hub, json/jsonl/csv/tsv/txt/parquet/arrow), CPT and SFT packing, chat templates, mixing."""

from slimtune.data.chat import IGNORE_INDEX
from slimtune.data.dataset import TrainData, build_dataset, collate, count_target_tokens

__all__ = ["IGNORE_INDEX", "TrainData", "build_dataset", "collate", "count_target_tokens"]
