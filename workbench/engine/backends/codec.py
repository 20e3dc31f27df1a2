"""Text to token ids and back with a model's tokenizer, wherever the model itself runs (here, a child, a server)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

from workbench.engine.requests import check_text


class TextCodec:
    """Prompts to token ids and generated ids to text with one model's tokenizer, wherever the model itself runs.

    A fast tokenizer is driven through a private copy of its Rust core, set up once with no padding
    and no truncation: the core the tokenizer owns keeps whatever padding or truncation its last
    caller set (``tokenizer(..., padding=True)`` elsewhere) and would apply it to these prompts.
    The copy also skips the Python layers of ``tokenizer(...)`` and ``tokenizer.decode``, which cost
    more than the encoding itself on short prompts (see ``benchmarks/README.md``); the ids and texts
    are the same (``tests/test_engine.py`` compares them). A slow tokenizer goes through its own calls.
    """

    # Up to this many prompts are encoded one by one: encode_batch hands even one prompt to the Rust
    # thread pool, a cross-thread wake-up that costs more than the encoding.
    ONE_BY_ONE = 4
    # A prompt longer than this goes to encode_batch all the same: encode holds Python's lock to the end, and a
    # 2-million-character prompt stopped every thread of the process (other chains, the notebook, a served gateway)
    # for 1.8 s here; encode_batch lets it go while Rust works, and took 1.3 s.
    LONG_CHARS = 16_384

    def __init__(self, tokenizer: Any, eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self._core = _private_core(tokenizer)

    def tokenize(self, prompts: Sequence[str], special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each prompt; ``special_tokens=False`` adds none (a chat template's text carries its own)."""
        core = self._core
        try:
            if core is None:
                ids: list[list[int]] = self.tokenizer(list(prompts), add_special_tokens=special_tokens)["input_ids"]
            elif len(prompts) <= self.ONE_BY_ONE and all(len(prompt) <= self.LONG_CHARS for prompt in prompts):
                ids = [core.encode(prompt, add_special_tokens=special_tokens).ids for prompt in prompts]
            else:
                ids = [e.ids for e in core.encode_batch(list(prompts), add_special_tokens=special_tokens)]
        except TypeError:  # how a fast tokenizer refuses text with a lone surrogate; say which prompt
            for index, prompt in enumerate(prompts):
                check_text(prompt, "the prompt" if len(prompts) == 1 else f"prompt {index + 1} of {len(prompts)}")
            raise
        return ids

    @functools.cached_property
    def token_chars(self) -> int | None:
        """The most characters of a prompt that one token can stand for, where the tokenizer's pipeline shows it (see
        :func:`_token_chars`); None where it does not. A prompt of ``n`` characters is then at least
        ``n / token_chars`` tokens, known without tokenizing it."""
        return _token_chars(self._core) if self._core is not None else None

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens``, special tokens skipped, as ``tokenizer.decode`` writes it."""
        if self._core is None:
            return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True))
        return str(self._core.decode(list(tokens), skip_special_tokens=True))

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The generated text of ``tokens``: end-of-sequence ids dropped, surrounding whitespace stripped."""
        return self.decode([t for t in tokens if t not in self.eos_ids]).strip()

    def stream(self) -> StreamText:
        """A fresh :class:`StreamText`: the text each token of one generated row adds."""
        return StreamText(self)


class StrippedText:
    """The text each piece of a streamed answer adds to the answer stripped (as a result's text is): whitespace before
    the first text is dropped, and whitespace after the latest text waits for more text, or is dropped at the end.
    Linear in the answer's length: nothing already handed out is looked at again."""

    def __init__(self) -> None:
        self._begun = False
        self._held = ""

    def add(self, text: str) -> str:
        if not self._begun:
            text = text.lstrip()
            if not text:
                return ""
            self._begun = True
        body = text.rstrip()
        if not body:
            self._held += text
            return ""
        added, self._held = self._held + body, text[len(body):]
        return added


class StreamText:
    """The text each new token of a generated row adds, so that the pieces join to what ``detokenize`` makes of them.

    A byte-level BPE (GPT-2's, Qwen's, GLM-4's) splits a Chinese character into up to four tokens, each of which alone
    decodes to U+FFFD. Slicing the whole answer's text at each step streamed those replacement characters and never
    the character (北京 came out as six of them). Here a token that ends inside a character adds nothing; the token
    that completes it adds the character. Each step decodes the tokens since the last text went out plus the ones
    before them (the window a decoder's leading-space rules need, as vLLM does), not the whole answer, so a stream
    costs time linear in its length.
    """

    def __init__(self, codec: TextCodec) -> None:
        self._codec = codec
        self._tokens: list[int] = []
        self._start = 0  # the window decoded at each step starts here
        self._read = 0  # tokens whose text went to _stripped
        self._stripped = StrippedText()  # as detokenize strips the whole

    def add(self, token: int, last: bool = False) -> str:
        """Take the next token; the text it adds (empty while a character is still incomplete).

        ``last``: the row ends with this token (its end of sequence, or its max_new_tokens-th): the text of a
        character left incomplete goes out now, as the U+FFFD that ``detokenize`` ends the answer with.
        """
        if token in self._codec.eos_ids:
            if not last:
                return ""
        else:
            self._tokens.append(token)
        decode = self._codec.decode
        before = decode(self._tokens[self._start:self._read]) if self._read > self._start else ""
        after = decode(self._tokens[self._start:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not last):
            return ""  # inside a character, or a token with no text of its own: wait for the next
        self._start, self._read = self._read, len(self._tokens)
        return self._stripped.add(after[len(before):])


def _private_core(tokenizer: Any) -> Any:
    """A copy of a fast tokenizer's Rust core that encodes and decodes as ``tokenizer(...)`` and ``decode`` do,
    or None where the copy would differ (a slow tokenizer, clean-up of tokenization spaces)."""
    core = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(core, Tokenizer) or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None  # clean-up is the Python layer's (and usually off for BPE); keep that layer then
    copy = Tokenizer.from_str(core.to_str())
    copy.no_padding()
    copy.no_truncation()
    copy.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return copy


# Pre-tokenizers that drop no character of the text (Split, Punctuation: unless their behavior is "Removed").
_KEEPING = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation"}


def _token_chars(core: Tokenizer) -> int | None:
    """The longest token's length in characters, where no token can stand for more of the prompt's characters: no
    normalizer shrinks the text (none, Prepend, a Replace by text at least as long), no pre-tokenizer drops any
    of it, no added token strips the whitespace beside it, and a BPE model has a token for every character (byte
    fallback, or the whole byte-level alphabet). Else None: Whitespace drops spaces, WordPiece makes one [UNK]
    of a long word, a fused [UNK] stands for any run of unknown characters.
    """
    try:
        normalizer = json.loads(core.normalizer.__getstate__()) if core.normalizer is not None else None
        pre = json.loads(core.pre_tokenizer.__getstate__()) if core.pre_tokenizer is not None else None
        model = json.loads(core.model.__getstate__())
        vocab = core.get_vocab(with_added_tokens=True)
        added = core.get_added_tokens_decoder().values()
    except Exception:  # a tokenizers release that serializes otherwise: tokenize every prompt
        return None
    for part in [] if normalizer is None else normalizer.get("normalizers", [normalizer]):
        pattern = part.get("pattern")
        longer = part.get("type") == "Replace" and isinstance(pattern, dict) and isinstance(pattern.get("String"), str) \
            and 0 < len(pattern["String"]) <= len(str(part.get("content", "")))
        if part.get("type") != "Prepend" and not longer:
            return None
    pres = [] if pre is None else pre.get("pretokenizers", [pre])
    if any(p.get("type") not in _KEEPING or p.get("behavior") == "Removed" for p in pres):
        return None
    if any(token.lstrip or token.rstrip for token in added):
        return None
    byte_level = any(p.get("type") == "ByteLevel" for p in pres)
    if model.get("type") != "BPE" or not (model.get("byte_fallback") or
                                          (byte_level and set(ByteLevel.alphabet()) <= vocab.keys())):
        return None
    return max(map(len, vocab), default=0) or None
