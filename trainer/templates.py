"""Conversation templates of OLA-VLM's PT stage, and turning a LLaVA record into token ids.

The prompt is LLaVA's `llava_llama_3` (or `llava_phi_3`) conversation with the image first in the user turn:

    [BOS] <system block> <user start> <image>\\n<question> <sep> <assistant start> | <caption> <sep>
    '------------- prefix -------------'                                           '-- labelled --'

The model puts the 576 image tokens and the 24 task tokens where `<image>` stands. The image offset is the
length of the tokenised prefix, derived here from the tokenizer (38 for Llama-3 in the original, where it is
hard-coded). Only the caption and its closing separator carry next-token labels, as in LLaVA's preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Template:
    name: str
    system: str  # the whole system block, role markers included
    user_start: str
    assistant_start: str
    sep: str  # closes every turn, the system block included


TEMPLATES = {
    "llama_3": Template(
        name="llama_3",
        system="<|start_header_id|>system<|end_header_id|>\n\nA chat between a curious user and an artificial "
               "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's "
               "questions.",
        user_start="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant_start="<|start_header_id|>assistant<|end_header_id|>\n\n",
        sep="<|eot_id|>",
    ),
    "vicuna_v1": Template(  # LLaVA-1.5 (llava-hf/llava-1.5-7b-hf): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>"
        name="vicuna_v1",
        system="A chat between a curious human and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the human's questions.",
        user_start="USER: ",
        assistant_start="ASSISTANT:",
        sep=" ",
    ),
    "phi_3": Template(
        name="phi_3",
        system="<|system|>\nYou are a helpful AI assistant.",
        user_start="\n<|user|>\n",
        assistant_start="\n<|assistant|>\n",
        sep="<|end|>",
    ),
}


PLAIN = "plain"  # VLoRA's PT conversation (conv_llava_plain): no system, no roles; PlainPromptBuilder
PLACEHOLDER_ID = 0  # their <image> (-200) becomes token 0 in the forward, its attention masked


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join([*TEMPLATES, PLAIN])}")
    return TEMPLATES[name]


def question_and_caption(record: dict) -> tuple[str, str]:
    """The first human turn (image token removed, as LLaVA moves it to the front) and the first gpt turn."""
    turns = [t for t in record.get("conversations") or [] if isinstance(t, dict)]
    human = next((t.get("value") for t in turns if t.get("from") == "human"), "")
    gpt = next((t.get("value") for t in turns if t.get("from") == "gpt"), "")
    human, gpt = (v if isinstance(v, str) else "" for v in (human, gpt))  # planning records such samples as bad
    return human.replace(IMAGE_TOKEN, "").strip(), gpt


@dataclass
class Tokenized:
    prefix_ids: list[int]  # everything before the image
    text_ids: list[int]  # everything after the image (and the task tokens)
    text_labels: list[int]  # IGNORE_INDEX except on the caption and its separator


MAX_CHARS_PER_TOKEN = 256  # a generous bound on one token's length: text past it cannot fit in the budget


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def prompt_prefix(tokenizer, template: Template) -> list[int]:
    """The token ids before the image: BOS, the system block, the user header. Its length is the image offset."""
    return _bos(tokenizer) + tokenizer(template.system + template.sep + template.user_start,
                                       add_special_tokens=False)["input_ids"]


class _Builder:
    """What both builders share: the tokenizer, the text budget, the prefix before the image, and the probes'
    protocol (`answer`: the text every record's answer is replaced with, None: each record's own;
    `with_answer=False`: no answer, as a generation prompt)."""

    def __init__(self, tokenizer, max_text_tokens: int, prefix_ids: list[int], answer: str | None,
                 with_answer: bool):
        self.tok, self.max_text_tokens, self.prefix_ids = tokenizer, max_text_tokens, prefix_ids
        self.answer, self.with_answer = answer, with_answer

    @property
    def image_offset(self) -> int:
        return len(self.prefix_ids)

    def question_and_answer(self, record: dict) -> tuple[str, str]:
        question, caption = question_and_caption(record)
        return question, caption if self.answer is None else self.answer


class PromptBuilder(_Builder):
    """`label_header_end`: also label the instruction's last token (the assistant header's trailing "\n\n"),
    as the original's preprocess_llama_3 does through `instruction_len = len(...) - 2`, one short of the BOS
    it means to skip (`ntp_labels: original`). `answer`: the text every record's answer is replaced with (None:
    each record's own); `with_answer=False` ends the text at the assistant header, as a generation prompt
    (the probes' evaluation)."""

    def __init__(self, tokenizer, template: Template, max_text_tokens: int, label_header_end: bool = False,
                 answer: str | None = None, with_answer: bool = True):
        super().__init__(tokenizer, max_text_tokens, prompt_prefix(tokenizer, template), answer, with_answer)
        self.t = template
        self.label_header_end = label_header_end

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def __call__(self, record: dict) -> Tokenized:
        question, caption = self.question_and_answer(record)
        # what cannot fit is cut before tokenising: a 50 MB caption must not become 50 MB of token tensors
        limit = MAX_CHARS_PER_TOKEN * self.max_text_tokens
        instruction = self._ids("\n" + question[:limit] + self.t.sep + self.t.assistant_start)
        answer = self._ids(caption[:limit] + self.t.sep) if self.with_answer else []
        ids = (instruction + answer)[: self.max_text_tokens]
        masked = [IGNORE_INDEX] * (len(instruction) - 1) + (instruction[-1:] if self.label_header_end else [IGNORE_INDEX])
        labels = (masked + answer)[: self.max_text_tokens]
        return Tokenized(self.prefix_ids, ids, labels)


class PlainPromptBuilder(_Builder):
    """VLoRA's PT text (`--version plain`): [BOS, <image> placeholder] + caption + "\n", the question dropped, no
    EOS; everything after the placeholder labelled. The placeholder is token 0 with its attention masked and the
    caption at position 2, as theirs (`placeholder=False`: no placeholder, the caption at position 1)."""

    def __init__(self, tokenizer, max_text_tokens: int, placeholder: bool = True, answer: str | None = None,
                 with_answer: bool = True):
        super().__init__(tokenizer, max_text_tokens, plain_prefix(tokenizer, placeholder), answer, with_answer)

    def __call__(self, record: dict) -> Tokenized:
        _, caption = self.question_and_answer(record)
        if not self.with_answer:  # plain has no question: the text is the answer, and there is none
            return Tokenized(self.prefix_ids, [], [])
        text = caption[: MAX_CHARS_PER_TOKEN * self.max_text_tokens] + "\n"
        ids = self.tok(text, add_special_tokens=False)["input_ids"][: self.max_text_tokens]
        return Tokenized(self.prefix_ids, ids, list(ids))


def plain_prefix(tokenizer, placeholder: bool = True) -> list[int]:
    return _bos(tokenizer) + ([PLACEHOLDER_ID] if placeholder else [])


def prefix_shape(tokenizer, template: str, placeholder: bool = True) -> tuple[int, tuple[int, ...]]:
    """(the prefix's length, its positions no token attends to) for a template name: a chat template's image
    offset, or VLoRA's plain [BOS, placeholder] with the placeholder masked."""
    if template == PLAIN:
        n = len(plain_prefix(tokenizer, placeholder))
        return n, (n - 1,) if placeholder else ()
    return len(prompt_prefix(tokenizer, get_template(template))), ()


def prompt_builder(tokenizer, template: str, max_text_tokens: int, placeholder: bool = True, **options):
    """The builder of a template name: PromptBuilder for a chat template, PlainPromptBuilder for plain.
    `options`: answer / with_answer (both), label_header_end (chat templates)."""
    if template == PLAIN:
        return PlainPromptBuilder(tokenizer, max_text_tokens, placeholder, **options)
    return PromptBuilder(tokenizer, get_template(template), max_text_tokens, **options)
