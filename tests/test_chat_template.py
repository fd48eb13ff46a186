"""A model's chat format rendered into task.prompt_template (`npo prompt-template`)."""

from __future__ import annotations

import pytest
import yaml
from helpers import CHAT_TEMPLATE, QWEN_JINJA, write_tiny_hf_model
from typer.testing import CliRunner

from npo.cli import app
from npo.config import load_config
from npo.policy.chat import chat_prompt_template
from npo.policy.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen") / "model"
    texts = [CHAT_TEMPLATE, "What is 3 + 4? 7"]
    return write_tiny_hf_model(folder, texts, chat_template=QWEN_JINJA)


def test_qwen_format_with_and_without_a_system_message(qwen_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_dir)
    assert chat_prompt_template(tok) == CHAT_TEMPLATE
    system = "<|im_start|>system\nReason step by step.<|im_end|>\n"
    assert chat_prompt_template(tok, "Reason step by step.") == system + CHAT_TEMPLATE


def test_a_bos_the_tokenizer_adds_itself_is_not_written_twice():
    tok = build_char_tokenizer("0123456789+=[]")  # prepends <bos> to every text
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
        "{% if add_generation_prompt %}={% endif %}"
    )
    text = chat_prompt_template(tok)
    assert text == "[{prompt}]="
    ids = tok(text.replace("{prompt}", "1+2"))["input_ids"]
    assert ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (None, "has no chat template"),
        ("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}", "found 0 copies"),
    ],
)
def test_unusable_templates_are_refused(template, message):
    tok = build_char_tokenizer("0123456789")
    tok.chat_template = template
    with pytest.raises(ValueError, match=message):
        chat_prompt_template(tok)


def test_cli_prints_yaml_that_a_config_takes_as_is(qwen_dir, tmp_path):
    done = CliRunner().invoke(app, ["prompt-template", str(qwen_dir), "--system", "Be brief."])
    assert done.exit_code == 0, done.output
    printed = yaml.safe_load(done.stdout)["task"]["prompt_template"]
    assert printed == "<|im_start|>system\nBe brief.<|im_end|>\n" + CHAT_TEMPLATE
    config = tmp_path / "c.yaml"
    data = {"task": {"kind": "math", "train_path": "t.jsonl", "eval_path": "e.jsonl"}}
    data["task"] |= yaml.safe_load(done.stdout)["task"]
    config.write_text(yaml.safe_dump(data))
    assert load_config(config).task.prompt_template == printed

    refused = CliRunner().invoke(app, ["prompt-template", str(tmp_path)])
    assert refused.exit_code == 2
    assert "no tokenizer_config.json, not a model folder" in " ".join(refused.stderr.split())
