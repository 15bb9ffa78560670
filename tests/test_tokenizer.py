from noodle.config import padded_vocab_size
from noodle.tokenizer import (
    learn_tokenizer,
    learned_vocabulary,
    load_tokenizer,
    packaged_tokenizer_path,
)
from tests.conftest import story_corpus


def test_known_encodings():
    tokenizer = load_tokenizer()
    assert tokenizer.encode("Hello world") == [12092, 1533]
    assert tokenizer.encode("Once upon a time") == [10758, 2220, 247, 673]
    assert tokenizer.encode("<|endoftext|>") == [0]
    assert (tokenizer.eot_id, tokenizer.pad_id) == (0, 1)


def test_vocabulary_is_neox_and_pads_to_a_multiple_of_128():
    tokenizer = load_tokenizer()
    assert tokenizer.vocab_size == 50277
    assert padded_vocab_size(tokenizer.vocab_size) == 50304


def test_multibyte_text_round_trips():
    tokenizer = load_tokenizer()
    text = "naïve café — 東京 🍜 ünïcödé\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_the_tokenizer_ships_inside_the_package():
    path = packaged_tokenizer_path()
    assert path.is_file()
    assert path.parent.name == "assets" and path.parent.parent.name == "noodle"


def test_a_learned_tokenizer_is_small_reproducible_and_keeps_the_special_ids():
    lines = story_corpus(300).splitlines(keepends=True)
    first, again = learn_tokenizer(lines, 300), learn_tokenizer(iter(lines), 300)
    assert first.raw == again.raw and first.vocab_size == 300
    assert (first.eot_id, first.pad_id) == (0, 1)
    text = "once upon a time — naïve 東京\n"  # bytes it never saw still round-trip
    assert first.decode(first.encode(text)) == text
    assert learned_vocabulary("bpe:4096") == 4096
    assert learned_vocabulary(None) is None and learned_vocabulary("my/tokenizer.json") is None


def test_gpt_neox_names_the_bundled_tokenizer():
    assert load_tokenizer("gpt-neox").raw == packaged_tokenizer_path().read_bytes()
