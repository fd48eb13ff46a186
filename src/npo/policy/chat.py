"""A model's chat format as a `task.prompt_template`, rendered once from its tokenizer.

The config then holds the literal text every prompt is wrapped in: a run does not depend
on the tokenizer's Jinja template or the library version that renders it, and the text is
there to read. `npo prompt-template MODEL` prints it as YAML.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

PLACEHOLDER = "{prompt}"


def chat_prompt_template(tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> str:
    """The tokenizer's chat template around one user turn holding `{prompt}`, ending with the
    assistant's turn opened (the generation prompt). A leading BOS is dropped when the
    tokenizer adds one to every text itself, so prompts do not get two.

    ValueError when the tokenizer has no chat template, or its template does not keep the
    user's text verbatim.
    """
    if not tokenizer.chat_template:
        raise ValueError(
            "the tokenizer has no chat template (a base model?): write task.prompt_template "
            "in the format the model was trained on"
        )
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": PLACEHOLDER})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(PLACEHOLDER) != 1:
        raise ValueError(
            f"the chat template does not keep the user's text verbatim (found "
            f"{text.count(PLACEHOLDER)} copies of {PLACEHOLDER}): write task.prompt_template "
            "by hand"
        )
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id
