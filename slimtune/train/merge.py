"""Merging lives in `slimtune.export.merge` (below train in the layering); these names stay for train/'s callers."""

from slimtune.export.merge import (
    CHAT_TEMPLATE_FILE, ONTO, load_merged, make_saveable, merge_to_folder, save_model_folder, trained_chat_template,
)

__all__ = ["CHAT_TEMPLATE_FILE", "ONTO", "load_merged", "make_saveable", "merge_to_folder", "save_model_folder",
           "trained_chat_template"]
