"""Read a long document once, ask it many questions: the library side of `kvtier chat`.

The document is prefilled once into a KVCache (or loaded from a cache file). Each question is answered from a
fork of that cache, so every answer sees the document and its own question only, and the document is never
fed again: kvtier.generate gets document + question and feeds just the question.

The prompt is the model's chat template around one user message, "document\n\nquestion", as `kvtier generate`
builds it from a file holding that text. It is tokenized in two parts: everything up to the end of the
document, then the blank line, the question and the rest of the template. The document's tokens are then the
same whatever the question, and the same as in the whole prompt tokenized at once: the cut falls between the
document's last character and a newline, where byte-level BPE tokenizers never merge (the document's trailing
whitespace is dropped so that this holds). A fresh prefill of the same ids gives the same answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .generate import generate, prefill

SEPARATOR = "\n\n"
_MARK = "\ue000kvtier-message\ue000"  # private-use characters: where the message goes in the rendered template
QUESTION_ROOM = 256  # tokens reserved for a question beside the answer, so forks append in the shared buffers


def template_parts(tokenizer, raw: bool = False) -> tuple[str, str]:
    """The text before and after a user message in the model's chat template (with the assistant's turn
    opened); empty strings for `raw` or a tokenizer without a chat template."""
    if raw or getattr(tokenizer, "chat_template", None) is None:
        return "", ""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(_MARK)
    return before, after


def _ids(tokenizer, text: str, special: bool) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=special)["input_ids"]], dtype=torch.long)


def document_ids(tokenizer, document: str, raw: bool = False) -> torch.Tensor:
    """[1, n] ids of the prompt up to the end of the document."""
    before, _ = template_parts(tokenizer, raw)
    # without a template the tokenizer adds its own special tokens (BOS); the template holds what it needs
    return _ids(tokenizer, before + document.rstrip(), special=not before)


def question_ids(tokenizer, question: str, raw: bool = False) -> torch.Tensor:
    """[1, m] ids of the blank line, the question and the rest of the prompt (the end of the user turn, the
    assistant's turn)."""
    _, after = template_parts(tokenizer, raw)
    return _ids(tokenizer, SEPARATOR + question.strip() + after, special=False)


@dataclass
class Answer:
    question: str
    text: str
    question_tokens: int
    new_tokens: int
    context_tokens: int  # document + question + answer
    reused_tokens: int  # tokens of the document's cache that were not fed again
    seconds: float
    stats: dict = field(repr=False)  # the fork's stats after the answer
    ids: torch.Tensor = field(repr=False, default=None)  # the answer's token ids [new_tokens]
    moved: dict = field(default_factory=dict)  # bytes this answer moved: h2d_bytes, d2h_bytes

    def as_dict(self) -> dict:
        return {"question": self.question, "answer": self.text, "question_tokens": self.question_tokens,
                "new_tokens": self.new_tokens, "context_tokens": self.context_tokens,
                "reused_tokens": self.reused_tokens, "seconds": self.seconds, **self.moved,
                "device_kv_bytes": self.stats["device_kv_bytes"], "host_kv_bytes": self.stats["host_kv_bytes"]}


class DocumentChat:
    """A prefilled document and the questions asked of it: `DocumentChat.prefill(...)` or `.load(...)`, then
    `ask(question)` as often as needed. `prefills` counts the document's prefills (1, or 0 when loaded)."""

    def __init__(self, model, tokenizer, cache: KVCache, raw: bool = False, seconds: float = 0.0,
                 prefills: int = 0):
        self.model, self.tokenizer, self.cache, self.raw = model, tokenizer, cache, raw
        self.seconds = seconds  # the prefill's, or the load's
        self.prefills = prefills
        self.ids = cache.token_ids
        if self.ids is None:
            raise ValueError("the document's cache does not know its token ids (it was fed embeddings)")

    @classmethod
    def prefill(cls, model, tokenizer, document: str, method: str = "full", raw: bool = False,
                progress: bool = False, max_new_tokens: int = 256, device_memory=None,
                **options) -> "DocumentChat":
        """Prefill the document once. The cache is sized for the document, a question of up to QUESTION_ROOM
        tokens and `max_new_tokens` (method "auto" plans for that length within `device_memory`); a document that
        leaves the model's positions no room for a question and `max_new_tokens` is refused before the prefill."""
        ids = document_ids(tokenizer, document, raw).to(model.device)
        limit = model.config.max_position_embeddings
        if ids.shape[1] + 1 + max_new_tokens > limit:  # found now, not by every question after the prefill
            raise ValueError(f"the document is {ids.shape[1]} tokens; with a question and max_new_tokens="
                             f"{max_new_tokens} it exceeds the model's maximum of {limit} positions: shorten the "
                             "document or ask for fewer new tokens")
        room = min(ids.shape[1] + QUESTION_ROOM + max_new_tokens, model.config.max_position_embeddings)
        cache = KVCache(model, method=method, max_length=max(room, ids.shape[1]), device_memory=device_memory,
                        **options)
        start = time.perf_counter()
        prefill(model, cache, ids, progress=progress)
        return cls(model, tokenizer, cache, raw, time.perf_counter() - start, prefills=1)

    @classmethod
    def load(cls, path, model, tokenizer, method: str | None = None, document: str | None = None,
             raw: bool = False) -> "DocumentChat":
        """The document cache saved at `path`; with `document`, checked to hold that very document."""
        start = time.perf_counter()
        cache = KVCache.load(path, model, method=method)
        chat = cls(model, tokenizer, cache, raw, time.perf_counter() - start, prefills=0)
        if document is not None and not torch.equal(document_ids(tokenizer, document, raw), chat.ids):
            raise ValueError(f"{path} holds another document than the one given (or one read with"
                             f"{'out' if raw else ''} --raw); leave out the document to ask the cached one")
        return chat

    def save(self, path):
        return self.cache.save(path)

    def ask(self, question: str, max_new_tokens: int = 256, streamer=None, **sampling) -> Answer:
        """Answer `question` from a fork of the document's cache (the document is not fed again)."""
        if not question.strip():
            raise ValueError("the question is empty")
        q = question_ids(self.tokenizer, question, self.raw).to(self.ids.device)
        ids = torch.cat((self.ids, q), dim=1).to(self.model.device)
        planned = self.cache.max_length if self.cache.device_memory is not None else None
        if planned is not None and ids.shape[1] + max_new_tokens > planned:
            # the fork's own error would say to make the cache with a larger max_length, which `prefill` chose
            raise ValueError(f"the question ({q.shape[1]} tokens) and {max_new_tokens} new tokens after the document's "
                             f"{self.ids.shape[1]} need {ids.shape[1] + max_new_tokens} positions, more than the "
                             f"{planned} the cache planned its device memory for (the document, {QUESTION_ROOM} "
                             "question tokens and the max_new_tokens given at prefill): ask a shorter question or "
                             "for fewer new tokens, or prefill with a larger max_new_tokens")
        before = self.cache.stats()
        fork = self.cache.fork()
        start = time.perf_counter()
        out = generate(self.model, ids, cache=fork, max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1]:]
        stats = fork.stats()
        return Answer(question=question, text=self.tokenizer.decode(new, skip_special_tokens=True),
                      question_tokens=q.shape[1], new_tokens=len(new), context_tokens=out.shape[1],
                      reused_tokens=self.ids.shape[1], seconds=seconds, stats=stats, ids=new.cpu(),
                      moved={k: stats[k] - before[k] for k in ("h2d_bytes", "d2h_bytes")})


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def stats_line(chat: DocumentChat, answer: Answer) -> str:
    """One line after each answer: tokens, device KV, bytes moved, time."""
    rate = answer.new_tokens / answer.seconds if answer.seconds else 0.0
    return (f"[{chat.cache.method.name}] {answer.new_tokens} new tokens | context {answer.context_tokens:,} "
            f"({answer.reused_tokens:,} cached document tokens reused, {answer.question_tokens} question tokens fed) "
            f"| device KV {mib(answer.stats['device_kv_bytes'])} | host KV {mib(answer.stats['host_kv_bytes'])} "
            f"| moved h2d {mib(answer.moved['h2d_bytes'])} d2h {mib(answer.moved['d2h_bytes'])} "
            f"| {answer.seconds:.2f} s ({rate:.1f} tok/s) | document prefills: {chat.prefills}")
