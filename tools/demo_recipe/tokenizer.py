"""Byte-level BPE tokenizer for the demo pair, saved as a Hugging Face fast tokenizer with a chat template."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# --- special tokens: ids 0, 1, 2 are unk, bos, eos as in Llama-2's tokenizer

UNK, BOS, END = "<unk>", "<s>", "<|end|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, END, SYSTEM, USER, ASSISTANT)
UNK_ID, BOS_ID, END_ID = 0, 1, 2

# One turn: "<|role|>\n" content "<|end|>\n". <|end|> is the EOS, so generation stops after a turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def render_turn(role: str, content: str) -> str:
    """The text CHAT_TEMPLATE produces for one message (used to build the chat-formatted training data)."""
    assert role in ("system", "user", "assistant"), role
    return f"<|{role}|>\n{content}{END}\n"


# --- training

def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: <unk> never appears
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # Like Llama's tokenizer, a plain encode starts with BOS; the chat template writes its own BOS and
    # transformers tokenizes rendered templates without special tokens, so it is not doubled.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    for token, expected in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
        assert tokenizer.token_to_id(token) == expected, (token, tokenizer.token_to_id(token))
    return tokenizer


# --- saving in the HF layout

def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (chat template inside, so no extra .jinja file is needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        # The generic fast class: loads with transformers 4.x and 5.x alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": END,
        "unk_token": UNK,
        "pad_token": UNK,  # never produced by a byte-level BPE, so padding cannot be confused with text
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_hf_tokenizer(out_dir: Path, samples: list[str]) -> dict[str, object]:
    """Load with AutoTokenizer and check it is fast, round-trips text and renders the chat template."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out_dir))
    assert hf.is_fast, "demo tokenizer did not load as a fast tokenizer"
    assert (hf.bos_token_id, hf.eos_token_id) == (BOS_ID, END_ID), (hf.bos_token_id, hf.eos_token_id)
    for text in samples:
        ids = hf(text)["input_ids"]
        assert ids[0] == BOS_ID, ids[:3]
        back = hf.decode(ids, skip_special_tokens=True)
        assert back == text, f"tokenizer round trip changed {text!r} into {back!r}"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello."}]
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = BOS + render_turn("system", "Be brief.") + render_turn("user", "Hello.") + f"{ASSISTANT}\n"
    assert rendered == expected, f"chat template renders {rendered!r}, expected {expected!r}"
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == BOS_ID and ids[1] != BOS_ID, f"chat template should start with exactly one BOS: {ids[:3]}"
    return {"rendered_chat_example": rendered, "chat_example_ids": list(ids)}
