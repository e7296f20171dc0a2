from world.tokenizer import MAX_LENGTH, build_tokenizer, learn_merges, world_words


def test_every_world_word_is_one_token_and_unknown_words_split(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    for word in (w for w in world_words() if w.isalpha()):  # CLIP's pre-tokenizer splits digits ("4k")
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
    assert len(tok("zqxv", add_special_tokens=False).input_ids) > 1


def test_sd_style_padding_and_special_tokens(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    ids = tok(["a nude circle"], padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids[0]
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id and ids[4] == tok.eos_token_id and ids[-1] == tok.pad_token_id
    assert tok.decode(ids[1:4]).strip() == "a nude circle"


def test_merges_are_deterministic():
    words = ["circle", "circus", "cat", "scarlet"]
    assert learn_merges(words) == learn_merges(list(words))
