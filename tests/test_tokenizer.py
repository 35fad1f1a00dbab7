import pytest

from misotts_agents.errors import CheckpointError, InvalidRequest
from misotts_agents.model.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return TextTokenizer(tokenizer_path)


def test_reference_ids(tok):
    assert tok.encode("Hello from Miso.", 0) == [128000, 58, 15, 60, 22691, 505, 386, 15782, 13, 128001]


def test_speaker_and_unicode(tok):
    ids = tok.encode("It's 3:45 — résumé naïve café!", 1)
    assert ids == [
        128000,
        58,
        16,
        60,
        1102,
        596,
        220,
        18,
        25,
        1774,
        2001,
        9517,
        1264,
        978,
        95980,
        588,
        53050,
        0,
        128001,
    ]


def test_leading_space_is_stripped_like_the_reference(tok):
    assert tok.encode("   Hello from Miso.", 0) == tok.encode("Hello from Miso.", 0)


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_text_is_a_clear_error(tok, text):
    with pytest.raises(InvalidRequest, match="empty"):
        tok.encode(text, 0)


def test_negative_speaker(tok):
    with pytest.raises(InvalidRequest, match="speaker"):
        tok.encode("hi", -1)


def test_unreadable_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer"):
        TextTokenizer(bad)
