"""Routing parsed targets to heads by unit."""

from __future__ import annotations

import pytest
import torch

from tests.test_grammar_fixtures import offline_tokenizer
from trp.grammar import (
    DEFAULT_UNITS,
    TokenVocab,
    encode_text,
    parse,
    parse_ids,
    register_unit,
    route_targets,
    unregister_unit,
)


def _parsed(text: str):
    tok = offline_tokenizer("bpe")
    vocab = TokenVocab.from_tokenizer(tok)
    ids = encode_text(tok, text)
    return ids, parse_ids(ids, vocab=vocab), vocab


def test_each_head_gets_exactly_its_queries() -> None:
    a_ids, a, vocab = _parsed(
        "<Phrase>dog</Phrase>(<Unit>box</Unit>[0]<REF>[1]<REF>) and "
        "<Phrase>cat</Phrase>(<Unit>mask</Unit><|VRT_3|><|VRT_4|><|VRT_5|>, <|VRT_9|>)."
    )
    b_ids, b, _ = _parsed(
        "<Phrase>sky</Phrase>(<Unit>depth</Unit>[0]<REF>), "
        "<Phrase>car</Phrase>(<Unit>box</Unit><|VRT_1|>)."
    )
    routed = route_targets([a, b])
    assert set(routed) == set(DEFAULT_UNITS)
    box, mask, depth, kp = (routed[u] for u in ("box", "mask", "depth", "keypoint"))
    assert box.sample.tolist() == [0, 0, 1]
    assert box.triplet.tolist() == [0, 0, 1]
    assert box.instance.tolist() == [0, 1, 0]
    assert box.concepts == ("dog", "dog", "car")
    assert box.is_vrt.tolist() == [False, False, True]
    assert mask.sample.tolist() == [0, 0]
    assert mask.triplet.tolist() == [1, 1]
    assert mask.lengths.tolist() == [3, 1]
    assert mask.positions.shape == (2, 3)
    assert mask.positions[1, 1:].tolist() == [-1, -1]
    assert [a_ids[p] - vocab.vrt_base for p in mask.positions[0].tolist()] == [3, 4, 5]
    assert depth.sample.tolist() == [1]
    assert len(kp) == 0
    assert kp.positions.shape == (0, 1)

    hidden = torch.randn(2, max(len(a_ids), len(b_ids)), 8)
    feats, valid = mask.gather(hidden)
    assert feats.shape == (2, 3, 8)
    assert valid.tolist() == [[True] * 3, [True, False, False]]
    assert torch.equal(feats[0, 2], hidden[0, mask.positions[0, 2]])
    assert torch.equal(feats[1, 1], torch.zeros(8))
    with pytest.raises(ValueError, match="hidden"):
        mask.gather(hidden[0])
    with pytest.raises(ValueError, match="outside"):
        box.gather(hidden[:1])


def test_conversation_turns_count_triplets_across_answers() -> None:
    _, a, _ = _parsed("<Phrase>dog</Phrase>(<Unit>box</Unit>[0]<REF>).")
    _, b, _ = _parsed("<Phrase>cat</Phrase>(<Unit>box</Unit>[0]<REF>).")
    box = route_targets([[a, b]])["box"]
    assert box.sample.tolist() == [0, 0]
    assert box.triplet.tolist() == [0, 1]


def test_registered_unit_gets_a_route_and_bad_input_raises() -> None:
    _, a, _ = _parsed("<Phrase>man</Phrase>(<Unit>box</Unit>[0]<REF>).")
    register_unit("pose")
    try:
        assert len(route_targets([a])["pose"]) == 0
    finally:
        unregister_unit("pose")
    with pytest.raises(ValueError, match="no head"):
        route_targets([a], units=["mask"])
    with pytest.raises(ValueError, match="parse_ids"):
        route_targets([parse("<Phrase>a</Phrase>(<Unit>box</Unit>[0]<REF>)")])
    with pytest.raises(TypeError):
        route_targets([["not a result"]])
