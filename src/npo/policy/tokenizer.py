"""A character-level tokenizer for the built-in tiny model, made locally (no hub download).

It is a regular `PreTrainedTokenizerFast`, so `save_pretrained` / `AutoTokenizer.from_pretrained`
round-trip it exactly like a real model's tokenizer. Every character of the task's alphabet is
one token; `<bos>` is prepended to every encoded text, `<eos>` ends a response.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet` (deduplicated, order kept) plus 4 special tokens.

    >>> tok = build_char_tokenizer("0123456789+=")
    >>> tok.convert_ids_to_tokens(tok("12+3=")["input_ids"])
    ['<bos>', '1', '2', '+', '3', '=']
    >>> tok.decode(tok("12+3=")["input_ids"], skip_special_tokens=True)
    '12+3='
    """
    chars = list(dict.fromkeys(alphabet))
    if not chars:
        raise ValueError("alphabet is empty: the task must name the characters it uses")
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *chars))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split into single characters (newlines included) so the word-level model sees chars.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tok
