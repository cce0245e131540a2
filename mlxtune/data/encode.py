"""Records → examples: render with a template, tokenize once with character offsets, derive the loss mask.

Loss mask. For each assistant turn i the template renders the conversation before it with the generation prompt
(P_i: ends right after the assistant header) and up to and including it (Q_i); the trained characters are
[len(P_i), len(Q_i.rstrip())): the turn's content and its end-of-turn token (`<|eot_id|>`, `<|im_end|>`, EOS) but
not the header, not system or user text, and not the newline a template writes after the end-of-turn token. Every
assistant turn is trained, not only the last. A token is trained when its characters overlap a trained span. P_i and
Q_i must be prefixes of the full rendering (true of Llama 3, ChatML/Qwen2.5 and Alpaca); for a template that
rewrites earlier turns the turn's content is located in the rendering instead. `train_on: all` trains every token.

Huge records. Before a record is rendered its text is clipped to a character budget, `CLIP_FACTOR × max_length ×
the longest token of the vocabulary (in characters)`: a 50 MB line costs its budget, not gigabytes, in the
tokenizer. The kept text alone holds more than max_length tokens, so the first max_length tokens are the ones the
whole record would give; the record counts as truncated. Fields are kept in order (system, user, assistant, …)
until the budget is spent (each turn also costs `TURN_CHARS`), and at most max_length turns (each renders to at
least one token); later turns are dropped.

BOS. A chat template writes its own BOS (Llama 3's does); the text is tokenized without special tokens, so there is
no second one (a doubled BOS is collapsed anyway). The alpaca template, raw completions and plain text get the
tokenizer's BOS when the model uses one (its tokenizer adds it, or its chat template writes it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional, Sequence

from ..config import DataConfig
from ..errors import DataError
from ..tokenizer import END_OF_TURN_TOKENS, unwrap
from .formats import normalize
from .records import BadRecord, Example, Record
from .templates import resolve_template, wants_bos

CLIP_FACTOR = 2
"The character budget is CLIP_FACTOR × max_length × the longest token (in characters)."
TURN_CHARS = 16
"What each turn costs of the budget beyond its content (its header), so that a record of many tiny turns is bounded."


@dataclass
class Rendered:
    """A record rendered to text with its trained character spans."""

    text: str
    spans: list[tuple[int, int]]
    bos: bool = False
    "Prepend the tokenizer's BOS (untrained)."
    eos: bool = False
    "Append the tokenizer's EOS (trained unless train_on says otherwise)."
    all_trained: bool = False
    clipped: bool = False
    "The record was cut to the character budget: it counts as truncated."


class Encoder:
    """Renders records with a template and tokenizes them into Examples (one tokenizer, one set of settings)."""

    def __init__(self, tokenizer: Any, template: str = "auto", *, system_prompt: Optional[str] = None,
                 train_on: str = "responses", max_length: int = 2048, on_too_long: str = "truncate"):
        self.tok = unwrap(tokenizer)
        self.template = template
        self.system_prompt = system_prompt
        self.train_on = train_on
        self.max_length = max_length
        self.on_too_long = on_too_long
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        self._wants_bos: Optional[bool] = None
        self._budget: Optional[int] = None
        self._templates: dict[str, tuple[str, Optional[str]]] = {}

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any) -> "Encoder":
        return cls(tokenizer, cfg.template, system_prompt=cfg.system_prompt, train_on=cfg.train_on,
                   max_length=cfg.max_length, on_too_long=cfg.on_too_long)

    def template_for(self, fmt: str) -> tuple[str, Optional[str]]:
        """(name, jinja source or None for the tokenizer's own) for records of `fmt`; `raw` = no template."""
        if fmt not in self._templates:
            self._templates[fmt] = resolve_template(self.tok, self.template, fmt)
        return self._templates[fmt]

    def wants_bos(self) -> bool:
        """Whether the model expects BOS first: its tokenizer adds one, or its chat template writes one."""
        if self._wants_bos is None:
            self._wants_bos = wants_bos(self.tok)
        return self._wants_bos

    # -- clipping ----------------------------------------------------------------------------------------

    def char_budget(self) -> int:
        """How many characters of a record are kept before tokenizing (see the module doc)."""
        if self._budget is None:
            try:
                longest = max(map(len, self.tok.get_vocab()), default=1)
            except Exception:  # a tokenizer without a vocabulary dict: assume long tokens
                longest = 64
            self._budget = CLIP_FACTOR * self.max_length * max(4, longest)
        return self._budget

    def clip(self, record: Record) -> Record:
        """The record with its text cut to `char_budget()` characters (in field order), `clipped` set when cut."""
        left = budget = self.char_budget()
        if record.text is not None:
            return record if len(record.text) <= budget else Record(text=record.text[:budget], clipped=True)
        size = sum(len(m["content"]) + TURN_CHARS for m in record.messages)
        if size <= budget and len(record.messages) <= self.max_length:
            return record
        messages: list[dict] = []
        for m in record.messages:
            if left <= 0 or len(messages) == self.max_length:  # every turn renders to at least one token
                break
            messages.append({**m, "content": m["content"][:left]})
            left -= len(m["content"]) + TURN_CHARS

        def cut(fields: Optional[tuple]) -> Optional[tuple]:
            if fields is None:
                return None
            out, rest = [], budget
            for f in fields:
                out.append(f[: max(0, rest)])
                rest -= len(f) + TURN_CHARS
            return tuple(out)

        return replace(record, messages=messages, alpaca=cut(record.alpaca), completion=cut(record.completion), clipped=True)

    # -- rendering -------------------------------------------------------------------------------------

    def _apply(self, messages: list[dict], source: Optional[str], gen: bool) -> str:
        try:
            return self.tok.apply_chat_template(messages, chat_template=source, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja errors and a template's raise_exception
            raise BadRecord("template error", f"the chat template rejected this conversation ({type(e).__name__}: {e})",
                            "check the turn order the model's template expects (e.g. user/assistant alternating)")

    def conversation(self, record: Record, template_name: str) -> list[dict]:
        """The messages the template sees: system prompt added, Alpaca's input kept apart for its template."""
        if template_name == "alpaca" and record.alpaca is not None:
            ins, inp, out = record.alpaca
            msgs = [{"role": "user", "content": ins, "input": inp}, {"role": "assistant", "content": out}]
        else:
            msgs = [dict(m) for m in record.messages]
        if self.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def render(self, record: Record, fmt: str) -> Rendered:
        """The record's text and trained character spans (see the module doc)."""
        name, source = self.template_for(fmt)
        record = self.clip(record)
        if record.text is not None:
            return Rendered(record.text, [(0, len(record.text))], bos=self.wants_bos(), eos=True, all_trained=True,
                            clipped=record.clipped)
        if name == "raw":  # completions without a chat template: prompt + completion + EOS
            prompt, completion = record.completion
            text = prompt + completion
            return Rendered(text, [(len(prompt), len(text))], bos=self.wants_bos(), eos=True,
                            all_trained=self.train_on == "all", clipped=record.clipped)
        msgs = self.conversation(record, name)
        clean = [{k: v for k, v in m.items() if k != "train"} for m in msgs]
        full = self._apply(clean, source, gen=False)
        spans: list[tuple[int, int]] = []
        prev_end = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start, end = self._turn_span(full, clean, source, i, prev_end)
            if m.get("train", True):
                spans.append((start, end))
            prev_end = max(prev_end, end)
        bos = name == "alpaca" and self.wants_bos()
        return Rendered(full, spans, bos=bos, all_trained=self.train_on == "all", clipped=record.clipped)

    def _turn_span(self, full: str, clean: list[dict], source: Optional[str], i: int, prev_end: int) -> tuple[int, int]:
        """[start, end) of assistant turn i in the full rendering: from the prefix renderings P_i and Q_i."""
        start = end = None
        try:
            before = self._apply(clean[:i], source, gen=True) if i else None
        except BadRecord:
            before = None
        if before is not None and full.startswith(before) and len(before) >= prev_end:
            start = len(before)
        upto = self._apply(clean[: i + 1], source, gen=False)
        if full.startswith(upto):
            end = len(upto.rstrip())
        if start is None or end is None or end < start:
            start, end = self._locate(full, clean[i]["content"], prev_end, start, i)
        return start, end

    def _locate(self, full: str, content: str, after: int, start: Optional[int], turn: int) -> tuple[int, int]:
        """Fallback for templates that re-render earlier turns: find the content, extend over end-of-turn."""
        for c in (content, content.strip()):
            at = full.find(c, after) if c else -1
            if at >= 0:
                end = at + len(c)
                for eot in (self.tok.eos_token, *END_OF_TURN_TOKENS):
                    if eot and full.startswith(eot, end):
                        end += len(eot)
                        break
                return (at if start is None else start), end
        raise BadRecord("template error", f"cannot find assistant turn {turn} in the rendered conversation "
                        "(the template rewrites it)", "use data.template: chatml or llama3, or a template that "
                        "renders earlier turns unchanged")

    # -- tokenization ----------------------------------------------------------------------------------

    def encode(self, record: Record, fmt: str) -> tuple[Example, bool]:
        """(example, truncated) for one record; raises BadRecord."""
        (result,) = self.encode_many([record], fmt)
        if isinstance(result, BadRecord):
            raise result
        return result

    def encode_many(self, records: Sequence[Record], fmt: str) -> list[tuple[Example, bool] | BadRecord]:
        """Render and tokenize records (one batched tokenizer call); per record (example, truncated) or BadRecord."""
        rendered: list[Rendered | BadRecord] = []
        for r in records:
            try:
                rendered.append(self.render(r, fmt))
            except BadRecord as e:
                rendered.append(e)
        toks = iter(self._tokenize([r for r in rendered if isinstance(r, Rendered)]))
        out: list[tuple[Example, bool] | BadRecord] = []
        for r in rendered:
            if isinstance(r, BadRecord):
                out.append(r)
                continue
            ids, offsets = next(toks)
            try:
                out.append(self._example(r, ids, offsets))
            except BadRecord as e:
                out.append(e)
        return out

    def _tokenize(self, rendered: list[Rendered], chunk: int = 512) -> Iterator[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets) per rendering: one batched call with offsets (fast tokenizers)."""
        for s in range(0, len(rendered), chunk):
            part = rendered[s : s + chunk]
            try:
                enc = self.tok([r.text for r in part], add_special_tokens=False, return_offsets_mapping=True)
            except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
                yield from (self._tokenize_pieces(r) for r in part)
                continue
            yield from zip(enc["input_ids"], [[tuple(o) for o in offs] for offs in enc["offset_mapping"]])

    def _tokenize_pieces(self, r: Rendered) -> tuple[list[int], list[tuple[int, int]]]:
        """Without offsets: tokenize the pieces between span boundaries separately; each token gets its
        piece's [start, end) (exact when the boundaries fall on token boundaries, as with special tokens)."""
        cuts = sorted({0, len(r.text), *(c for span in r.spans for c in span)})
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for a, b in zip(cuts, cuts[1:]):
            piece = self.tok(r.text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            offsets += [(a, b)] * len(piece)
        return ids, offsets

    def _example(self, r: Rendered, ids: list[int], offsets: list[tuple[int, int]]) -> tuple[Example, bool]:
        mask = [1] * len(ids) if r.all_trained else mask_from_spans(offsets, r.spans)
        if r.bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids, mask = [self.bos_id] + ids, [0] + mask
        if len(ids) >= 2 and self.bos_id is not None and ids[0] == ids[1] == self.bos_id:
            ids, mask = ids[1:], mask[1:]  # a template that writes BOS, plus a tokenizer that adds one
        if r.eos and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids, mask = ids + [self.eos_id], mask + [1]
        if ids:
            mask[0] = 0  # the first token is never predicted
        if not any(mask) and not r.clipped:
            raise BadRecord("no target tokens", "no token to train on (every assistant turn is empty or weight 0)",
                            "give the record an assistant reply")
        truncated = len(ids) > self.max_length or r.clipped
        if truncated:
            if self.on_too_long == "error":
                n = f"at least {len(ids)}" if r.clipped else f"{len(ids)}"
                raise BadRecord("too long", f"{n} tokens, more than data.max_length={self.max_length}",
                                "raise data.max_length, shorten the record, or set data.on_too_long: truncate")
            ids, mask = ids[: self.max_length], mask[: self.max_length]
            if not any(mask):
                raise BadRecord("prompt longer than max_length", f"no trained token within the first "
                                f"data.max_length={self.max_length} tokens (the prompt fills them)",
                                "raise data.max_length or shorten the prompt", fatal=False)
        return Example(ids, mask), truncated

    def prompt(self, record: Record, fmt: str) -> Optional[tuple[list[int], str]]:
        """(prompt ids, reference text) for generating the record's last assistant turn; None for text."""
        name, source = self.template_for(fmt)
        if record.text is not None:
            return None
        if name == "raw":
            prompt, completion = record.completion
            ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
            return ([self.bos_id] if self.wants_bos() else []) + ids, completion
        msgs = self.conversation(record, name)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        clean = [{k: v for k, v in m.items() if k != "train"} for m in msgs[:last]]
        text = self._apply(clean, source, gen=True)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if name == "alpaca" and self.wants_bos() and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids, msgs[last]["content"]


def mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for every token whose characters [s, e) overlap a span (spans sorted, disjoint)."""
    mask = [0] * len(offsets)
    j = 0
    for t, (s, e) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= s and not (s == e == spans[j][1]):
            j += 1
        if j == len(spans):
            break
        a, b = spans[j]
        if (s < b and e > a) or (s == e and a <= s < b):
            mask[t] = 1
    return mask


def encode_conversation(messages: list[dict], tokenizer: Any, template: str = "auto", *, system_prompt: Optional[str] = None,
                        train_on: str = "responses", max_length: int = 1 << 30) -> Example:
    """Tokenize one conversation ([{role, content}]) with its loss mask: the API behind load_splits, for one record."""
    try:
        record = normalize({"messages": messages}, "messages")
        enc = Encoder(tokenizer, template, system_prompt=system_prompt, train_on=train_on, max_length=max_length)
        return enc.encode(record, "messages")[0]
    except BadRecord as e:
        raise DataError(f"conversation: {e.detail}{'; ' + e.fix if e.fix else ''}") from None
