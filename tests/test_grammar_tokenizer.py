"""Tokenizer integration: special tokens, embeddings, token-id parsing, conversations."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Tokenizer

from tests.test_grammar_fixtures import offline_tokenizer, train_tokenizer
from tests.test_grammar_parse import answers, outcome
from trp.grammar import (
    REF,
    TRP_SPECIAL_TOKENS,
    VPT,
    IncrementalParser,
    Target,
    TokenVocab,
    TRPParseError,
    add_trp_tokens,
    encode_conversation,
    encode_text,
    format_detection,
    num_new_embeddings,
    parse,
    parse_ids,
    resize_embeddings,
    trp_token_ids,
    vrt_base_of,
)

ANSWER = format_detection(
    [("person", 0), ("dog", 1), ("person", 2)], patches=[[4, 5], [9], [12]], task_block=True
).text


@pytest.fixture(scope="module", params=["bpe", "wordlevel", "qwen2"])
def tokenizer(request, tmp_path_factory):
    if request.param != "qwen2":
        return offline_tokenizer(request.param)
    # A real tokenizer class built from vocab/merges files written here.
    d = tmp_path_factory.mktemp("qwen2")
    train_tokenizer("bpe").model.save(str(d))
    assert json.loads((d / "vocab.json").read_text())
    tok = Qwen2Tokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    assert add_trp_tokens(tok) == len(TRP_SPECIAL_TOKENS)
    return tok


def test_add_tokens_is_idempotent_and_atomic(tokenizer) -> None:
    n = len(tokenizer)
    assert add_trp_tokens(tokenizer) == 0
    assert len(tokenizer) == n
    ids = trp_token_ids(tokenizer)
    assert sorted(ids.values()) == list(range(n - len(TRP_SPECIAL_TOKENS), n))
    for tok, i in ids.items():
        assert tokenizer.encode(f"x{tok}y", add_special_tokens=False).count(i) == 1
    assert vrt_base_of(tokenizer) == n
    assert tokenizer.decode([ids[REF]], skip_special_tokens=True) == REF


def test_missing_tokens_are_reported() -> None:
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer("bpe"))
    with pytest.raises(ValueError, match="add_trp_tokens"):
        TokenVocab.from_tokenizer(bare)
    with pytest.raises(TypeError):
        add_trp_tokens(object())


def test_token_ids_parse_like_the_string(tokenizer) -> None:
    vocab = TokenVocab.from_tokenizer(tokenizer)
    ids = encode_text(tokenizer, ANSWER)
    base = vocab.vrt_base
    assert [i - base for i in ids if i >= base] == [4, 5, 12, 9]
    r = parse_ids(ids, vocab=vocab)
    assert r.triplets == parse(ANSWER).triplets
    assert r.task == parse(ANSWER).task
    assert vocab.decode(ids) == ANSWER
    assert [[[ids[p] - base for p in t] for t in tr] for tr in r.positions] == [
        [[4, 5], [12]],
        [[9]],
    ]
    assert parse_ids(torch.tensor(ids), vocab=vocab) == r


def test_ref_positions_and_errors_name_tokens(tokenizer) -> None:
    vocab = TokenVocab.from_tokenizer(tokenizer)
    text = "<Phrase>dog</Phrase>(<Unit>box</Unit>[0]<REF>[1]<REF>)."
    ids = encode_text(tokenizer, text)
    r = parse_ids(ids, vocab=vocab)
    ref = trp_token_ids(tokenizer)[REF]
    assert [ids[p] for (p,) in r.positions[0]] == [ref, ref]
    bad = encode_text(tokenizer, "<Phrase>dog</Phrase>(<Unit>box</Unit><REF>[0])")
    with pytest.raises(TRPParseError) as info:
        parse_ids(bad, vocab=vocab)
    assert bad[info.value.position] == ref
    lenient = parse_ids(bad, vocab=vocab, strict=False)
    assert lenient.triplets[0].targets == (Target(slot=0),)
    assert bad[lenient.positions[0][0][0]] == ref
    with pytest.raises(ValueError, match="outside the vocabulary"):
        parse_ids([-1], vocab=vocab)


@settings(max_examples=40, deadline=None)
@given(answers(), st.integers(0, 2))
def test_property_token_stream_agrees_with_batch(answer, which) -> None:
    tokenizer = offline_tokenizer(("bpe", "wordlevel", "bpe")[which])
    vocab = TokenVocab.from_tokenizer(tokenizer)
    text, triplets = answer[0], answer[1]
    ids = encode_text(tokenizer, text)
    if which == 1 and vocab.decode(ids) != text:
        return  # the word-level vocabulary cannot spell every random character
    full = parse_ids(ids, vocab=vocab)
    assert full.triplets == triplets
    inc = IncrementalParser(vocab=vocab)
    for k in range(len(ids) + 1):
        assert outcome(inc.snapshot) == outcome(parse_ids, ids[:k], vocab=vocab)
        if k < len(ids):
            inc.feed_token(ids[k])


def test_utf8_split_across_tokens_reads_back() -> None:
    tokenizer = offline_tokenizer("bpe")
    vocab = TokenVocab.from_tokenizer(tokenizer)
    text = "Das ist ein <Phrase>Hündchen ☃</Phrase>(<Unit>box</Unit>[0]<REF>)."
    ids = encode_text(tokenizer, text)
    assert len(ids) > len(text.encode()) // 4  # byte-level pieces, some mid-character
    r = parse_ids(ids, vocab=vocab)
    assert r.triplets[0].concept == "Hündchen ☃"
    assert r.texts[0] == "Das ist ein "


def test_embeddings_resize_counts_text_rows_only() -> None:
    tokenizer = offline_tokenizer("bpe")
    n_text = len(tokenizer) - len(TRP_SPECIAL_TOKENS)
    cfg = LlamaConfig(
        vocab_size=n_text,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = LlamaForCausalLM(cfg)
    old = model.get_input_embeddings().weight.detach().clone()
    assert num_new_embeddings(model, tokenizer) == len(TRP_SPECIAL_TOKENS)
    assert resize_embeddings(model, tokenizer) == len(TRP_SPECIAL_TOKENS)
    new = model.get_input_embeddings().weight
    assert new.shape[0] == len(tokenizer)
    assert torch.equal(new[:n_text], old)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert num_new_embeddings(model, tokenizer) == 0
    assert resize_embeddings(model, tokenizer) == 0
    with pytest.raises(TypeError):
        num_new_embeddings(object(), tokenizer)


def test_encode_conversation_masks_labels_and_maps_targets(tokenizer) -> None:
    vocab = TokenVocab.from_tokenizer(tokenizer)
    messages = [
        {"role": "system", "content": "You answer with triplets."},
        {"role": "user", "content": "Find people and dogs near [VPT]."},
        {"role": "assistant", "content": ANSWER},
    ]
    enc = encode_conversation(tokenizer, messages, vocab=vocab)
    ids, labels = enc.input_ids, enc.labels
    assert ids.shape == labels.shape == enc.attention_mask.shape
    supervised = (labels != -100).nonzero().flatten()
    start, end = int(supervised[0]), int(supervised[-1]) + 1
    assert torch.equal(labels[start:end], ids[start:end])
    assert (labels[:start] == -100).all()
    assert end == len(ids)
    answer_ids = encode_text(tokenizer, ANSWER, vrt_base=vocab.vrt_base)
    assert ids[start : start + len(answer_ids)].tolist() == answer_ids
    (answer,) = enc.answers
    base = vocab.vrt_base
    assert [[[int(ids[p]) - base for p in t] for t in tr] for tr in answer.positions] == [
        [[4, 5], [12]],
        [[9]],
    ]
    assert ids[enc.vpt_positions].tolist() == [trp_token_ids(tokenizer)[VPT]]
    with pytest.raises(ValueError, match="assistant"):
        encode_conversation(tokenizer, messages[:2], vocab=vocab)
    with pytest.raises(ValueError, match="role"):
        encode_conversation(tokenizer, [{"role": "robot", "content": "x"}], vocab=vocab)
    with pytest.raises(TRPParseError):
        encode_conversation(tokenizer, [{"role": "assistant", "content": "a <REF>"}], vocab=vocab)


def test_encode_text_memo_matches_encode_and_follows_added_tokens() -> None:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer("bpe"))
    add_trp_tokens(tok)
    text = "the red star <|VRT_3|> and the newtok"
    plain = tok.encode("the red star ", add_special_tokens=False)
    first = encode_text(tok, text)
    assert first == encode_text(tok, text)  # the memoised pieces give the same ids
    assert first[: len(plain)] == plain
    # A token added later changes how the text splits: the memo is keyed by the vocabulary size.
    tok.add_tokens(["newtok"])
    after = encode_text(tok, text)
    assert after[-1] == tok.convert_tokens_to_ids("newtok")
    assert after != first
