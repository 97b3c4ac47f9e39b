"""Byte and Hugging Face tokenizers behind one interface; saving and loading them."""

import pytest

from maskedattn.data.tokenizer import ByteTokenizer, HFTokenizer, load

TEXTS = ["hello world", "Grüße, 世界! 🙂", "", "a\nb\tc"]


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.vocab_size == 257
    assert tok.decode(ids) == text


def test_bytes_decode_broken_sequences_and_bad_ids():
    tok = ByteTokenizer()
    half = tok.encode("é")[:1]  # a broken sequence keeps its byte: no U+FFFD in its place
    assert tok.decode(half) == "\udcc3" and tok.encode(tok.decode(half)) == half
    with pytest.raises(ValueError, match=r"\[0, 257\)"):
        tok.decode([300])


def test_bytes_save_and_load(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert isinstance(load(tmp_path), ByteTokenizer)


def hf_bpe():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "the dog sat on the log"] * 20,
                            trainer)
    return HFTokenizer(tok)


def test_hf_tokenizer_json_round_trip(tmp_path):
    tok = hf_bpe()
    tok.save(tmp_path)
    back = load(tmp_path)
    assert isinstance(back, HFTokenizer) and back.vocab_size == tok.vocab_size
    for text in ("the cat sat", "Grüße 🙂"):
        ids = back.encode(text)
        assert ids == tok.encode(text)
        assert back.decode(ids) == text


def test_missing_or_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load(tmp_path)
    (tmp_path / "maskedattn_tokenizer.json").write_text('{"type": "sentencepiece"}')
    with pytest.raises(ValueError, match=r"unknown tokenizer type 'sentencepiece'.*'chars'"):
        load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    pytest.importorskip("tokenizers")
    with pytest.raises(ValueError, match="not a readable tokenizers file"):
        load(tmp_path)


def test_random_bytes_round_trip_invalid_utf8_included():
    tok = ByteTokenizer()
    rng = __import__("random").Random(0)
    for _ in range(50):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
        assert tok.decode_bytes(tok.encode_bytes(data)) == data
    assert tok.decode([104, 105, tok.eot_id, 33]) == "hi<|endoftext|>!"


def test_chars_round_trip_unknown_and_save(tmp_path):
    from maskedattn.data.tokenizer import CharTokenizer

    rng = __import__("random").Random(1)
    alphabet = "abcdefgh ijklmnopé世🙂\n"
    texts = ["".join(rng.choice(alphabet) for _ in range(100)) for _ in range(5)]
    tok = CharTokenizer.train(iter(texts))
    assert tok.vocab_size == len(set("".join(texts))) + 2
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("Z") == [tok.unk_id] and tok.decode([tok.unk_id]) == "\ufffd"
    tok.save(tmp_path)
    back = load(tmp_path)
    assert isinstance(back, CharTokenizer) and back.chars == tok.chars
    assert back.encode(texts[0]) == tok.encode(texts[0])


def test_bpe_trains_saves_and_loads_identically(tmp_path):
    pytest.importorskip("tokenizers")
    from maskedattn.data.tokenizer import train_bpe

    corpus = ["def function(argument):\n    return argument + 1\n"] * 50 + ["the cat sat"] * 50
    tok = train_bpe(iter(corpus), vocab_size=300)
    assert 257 < tok.vocab_size <= 300 and tok.eot_id is not None
    text = "def cat(argument): return 'Grüße 🙂'"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned
    tok.save(tmp_path)
    back = load(tmp_path)
    assert back.encode(text) == ids and back.eot_id == tok.eot_id
    with pytest.raises(ValueError, match="--vocab-size must be >= 257"):
        train_bpe(iter(corpus), vocab_size=100)
