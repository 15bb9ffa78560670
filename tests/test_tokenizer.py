from noodle.config import padded_vocab_size
from noodle.tokenizer import load_tokenizer, packaged_tokenizer_path


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
