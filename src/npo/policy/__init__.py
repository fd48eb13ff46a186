"""Policy: model + tokenizer loading (built-in tiny model or a local HF folder)."""

from npo.policy.model import init_policy, load_policy, save_policy, stop_token_ids
from npo.policy.tokenizer import build_char_tokenizer

__all__ = ["build_char_tokenizer", "init_policy", "load_policy", "save_policy", "stop_token_ids"]
