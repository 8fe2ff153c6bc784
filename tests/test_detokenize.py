"""Incremental detokenization with a byte-level BPE (built here, no download) in which multi-byte
characters span several tokens: the streamed text is never broken and adds up to the whole text."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hsd_jax.io.detokenize import REPLACEMENT, TextStream

TEXT = "Café naïve — 世界 🙂 ok. Grüße, 日本語!"


@pytest.fixture(scope="module")
def tokenizer():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    bpe.train_from_iterator(["hello world, the cat sat on the mat. " * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def test_characters_span_tokens(tokenizer):
    ids = tokenizer.encode(TEXT)
    prefixes = [tokenizer.decode(ids[:i]) for i in range(1, len(ids) + 1)]
    assert sum(p.endswith(REPLACEMENT) for p in prefixes) >= 5  # the test means something
    assert prefixes[-1] == TEXT


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_streamed_text_is_never_broken(tokenizer, chunk):
    ids = tokenizer.encode(TEXT) + [tokenizer.eos_token_id]
    stream = TextStream(tokenizer)
    pieces = [stream.push(ids[i:i + chunk]) for i in range(0, len(ids), chunk)] + [stream.flush()]
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == TEXT  # the special EOS is skipped


def test_an_unfinished_character_is_flushed_as_is(tokenizer):
    ids = tokenizer.encode("ok 🙂")
    stream = TextStream(tokenizer)
    shown = stream.push(ids[:-1])
    assert REPLACEMENT not in shown and shown.startswith("ok")
    assert stream.flush().endswith(REPLACEMENT)
