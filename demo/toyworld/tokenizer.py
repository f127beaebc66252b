"""A word-level tokenizer over both toy scripts plus the chat tokens, saved as a real Hugging Face
tokenizer (``tokenizer.json`` + chat template), so ``AutoTokenizer`` and every engine load it."""

from __future__ import annotations

from chatvec.demo.toyworld.language import EQUALS, PERIOD, ToyLanguage

PAD, UNK, USER, ASSISTANT, END = "<pad>", "<unk>", "<user>", "<assistant>", "<end>"
SPECIAL_TOKENS = (PAD, UNK, USER, ASSISTANT, END)

# A system message has no meaning in the toy languages; it is left out rather than shown to a
# model that never saw one.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<user> ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<assistant> ' + message['content'] + ' <end> ' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<assistant>' }}{%- endif -%}"
)


def vocab_list(language: ToyLanguage) -> list[str]:
    """Token strings in id order: specials, punctuation, L1 words, L2 words."""
    return list(SPECIAL_TOKENS) + [PERIOD, EQUALS] + language.vocabulary()


def build_tokenizer(language: ToyLanguage):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocab_list(language))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: the tokenizers library then joins word tokens with single spaces.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=END,
        additional_special_tokens=[USER, ASSISTANT],
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
