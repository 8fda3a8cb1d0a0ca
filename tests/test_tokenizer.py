"""Tokenizer specification. The oracles are Meta's reference tokenizer (llama_models) and
Hugging Face `tokenizers`; no expected id is written down by hand. Dev-only dependencies
(llama_models, tokenizers, transformers) are skipped when missing."""
import importlib.util
import json
import random
from pathlib import Path

import pytest

from load_llama import CheckpointError, Tokenizer, load_tokenizer  # noqa: F401

# Excerpt of "The Harvester" by Gene Stratton-Porter (1911, public domain), PG19 book 349.
EXCERPT = (Path(__file__).resolve().parent.parent / "data" / "harvester.txt").read_text(encoding="utf-8")

# Texts that Meta and Hugging Face both tokenize the same way (no special-token strings).
TEXTS = {
    "empty": "",
    "single_word": "Hello",
    "space_runs": "a b  c   d    e     f",
    "leading_and_trailing_spaces": "   start and end   ",
    "tabs_newlines_crlf": "line1\n\nline2\r\nline3\t\tx \n \n\t\r\n\r\n  end\n",
    "whitespace_only": " \n\t \r\n  \n\n\n   ",
    "unicode_spaces": "a\u00a0b\u2003c\u3000d\u200be\u2028f\u0085g",
    "digits": "1 12 123 1234 1234567 3.14 -2.5e10 year 1999, 2024-01-31 ½ ²³ ٣٤٥",
    "digits_next_to_spaces": "a   1  b\t2\n3 x 4  \n 55 foo1bar 7up 1990's",
    "contractions": "I'm don't THEY'RE we'll you've he'd She'S it\u2019s y'all",
    "punctuation_runs": "Hello!!! What?!... (a) [b] {c} <d> --- *** ### @@ $$ %% ,,, ;;",
    "chinese": "我们今天去公园散步，天气很好。",
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "hindi": "नमस्ते दुनिया, आप कैसे हैं?",
    "russian": "Привет, мир! Как дела? ЁЖИК",
    "japanese": "こんにちは世界、カタカナとひらがな。東京",
    "emoji_and_zwj": "I \u2764\ufe0f llamas \U0001f999 \U0001f44d\U0001f3fd "  # heart, llama, thumb+tone
                     "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 "  # family: ZWJ sequence
                     "\U0001f3f3\ufe0f\u200d\U0001f308 \U0001f1eb\U0001f1f7",  # rainbow flag, French flag
    "accented": "Café naïve résumé Ångström Straße façade e\u0301",
    "control_chars": "a\x00b\x01c\x7fd\x1b[0m",
    "code": "def f(x):\n    return x**2  # square\n\nif __name__ == '__main__':\n\tprint(f(3))\n",
    "excerpt": EXCERPT,
}
TEXT_IDS = list(TEXTS)


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def meta_model_file() -> Path:
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.skip("llama_models is not installed")
    return Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"


@pytest.fixture(scope="session")
def meta(meta_model_file):
    """Meta's reference tokenizer."""
    reference = pytest.importorskip("llama_models.llama3.tokenizer")
    return reference.Tokenizer(meta_model_file)


@pytest.fixture(scope="session")
def meta_dir(meta_model_file, tmp_path_factory) -> Path:
    """A checkpoint folder laid out like Meta's downloads on the Hub: original/tokenizer.model."""
    d = tmp_path_factory.mktemp("meta")
    (d / "original").mkdir()
    (d / "original" / "tokenizer.model").symlink_to(meta_model_file)
    return d


@pytest.fixture(scope="session")
def ours_meta(meta_dir) -> Tokenizer:
    return load_tokenizer(meta_dir, {})


@pytest.fixture(scope="session")
def llama3_json_dir(meta, meta_model_file, tmp_path_factory) -> Path:
    """tokenizer.json converted from Meta's file the way Hugging Face converts Llama 3."""
    pytest.importorskip("tokenizers")
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    converter = convert.TikTokenConverter(str(meta_model_file), extra_special_tokens=list(meta.special_tokens))
    hf = converter.converted()
    d = tmp_path_factory.mktemp("llama3_json")
    hf.save(str(d / "tokenizer.json"))
    return d


def _pre_tokenizer(style: str):
    from tokenizers import Regex, pre_tokenizers as pt
    from load_llama import LLAMA3_PATTERN
    return {
        "smollm2": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
        "digit_runs": pt.Sequence([pt.Digits(individual_digits=False), pt.ByteLevel(add_prefix_space=False)]),
        "gpt2": pt.ByteLevel(add_prefix_space=False),
        "llama3_split": pt.Sequence([pt.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                     pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }[style]


TRAINED_STYLES = ["smollm2", "digit_runs", "gpt2", "llama3_split", "smollm2_shuffled_ids"]


@pytest.fixture(scope="session", params=TRAINED_STYLES)
def trained_dir(request, tmp_path_factory) -> Path:
    """A small byte-level BPE trained here, with special tokens at the lowest ids like SmolLM2.
    Not every byte occurs in the training text, so (like SmolLM2) the vocab lacks some bytes."""
    tokenizers = pytest.importorskip("tokenizers")
    style = request.param
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = _pre_tokenizer(style.removesuffix("_shuffled_ids"))
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(  # small vocab: most words need several merges
        vocab_size=700, show_progress=False, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf.train_from_iterator(TEXTS.values(), trainer)
    tj = json.loads(hf.to_str())
    # Merges that a Digits pre-tokenizer must never let fire ("Ġ" is the byte-level space).
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"]
    for left, right in [("Ġ", "1"), ("1", "2"), ("Ġ1", "2")]:
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append([left, right])
    if style.endswith("_shuffled_ids"):
        # Ids need not follow merge order: shuffle the non-special ids (HF merges by merge order).
        tokens = [t for t, i in vocab.items() if i >= 3]
        new_ids = [vocab[t] for t in tokens]
        random.Random(0).shuffle(new_ids)
        vocab.update(zip(tokens, new_ids))
    d = tmp_path_factory.mktemp(style)
    (d / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    return d


def _hf(d: Path):
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))


def _hf_ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False).ids


# --- parity with Meta's reference tokenizer ------------------------------------------------

@pytest.mark.parametrize("name", TEXT_IDS)
def test_meta_tokenizer_model_gives_same_ids_as_meta_reference(ours_meta, meta, name):
    assert ours_meta.encode(TEXTS[name]) == meta.encode(TEXTS[name], bos=False, eos=False)


def test_special_token_strings_in_text_are_encoded_as_plain_text_like_meta(ours_meta, meta):
    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    ids = ours_meta.encode(text)
    assert ids == meta.encode(text, bos=False, eos=False)
    assert not set(ids) & set(meta.special_tokens.values())


def test_meta_special_tokens_and_bos_eos_stop_ids_match_meta_reference(ours_meta, meta):
    assert ours_meta.special_tokens == meta.special_tokens
    assert len(ours_meta.special_tokens) == 256
    assert (ours_meta.bos_id, ours_meta.eos_id) == (meta.bos_id, meta.eos_id)
    assert ours_meta.stop_ids == meta.stop_tokens
    assert ours_meta.n_words == meta.n_words


def test_special_token_ids_decode_to_their_names_like_meta(ours_meta, meta):
    ids = list(meta.special_tokens.values())
    assert ours_meta.decode(ids) == meta.decode(ids)


def test_huge_inputs_are_cut_like_meta_so_ids_still_match(ours_meta, meta):
    # > 400,000 chars with a word straddling the chunk boundary, plus runs of > 25,000 chars
    text = "x" + "abc " * 110_000 + "a" * 30_000 + " " * 60_001 + "b" + "\n" * 25_001
    assert ours_meta.encode(text) == meta.encode(text, bos=False, eos=False)


# --- parity with Hugging Face tokenizers -------------------------------------------------


@pytest.fixture(scope="session")
def llama3_pair(llama3_json_dir):
    return load_tokenizer(llama3_json_dir, {}), _hf(llama3_json_dir)


def test_huge_inputs_through_tokenizer_json_are_not_cut_like_hf(llama3_pair):
    # Hugging Face never cuts its input: a tokenizer.json must match it on a whole book at once
    ours, hf = llama3_pair
    text = "x" + "abc " * 110_000 + "a" * 30_000 + " " * 60_001 + "b"
    assert ours.encode(text) == _hf_ids(hf, text)


@pytest.mark.parametrize("name", TEXT_IDS)
def test_llama3_tokenizer_json_gives_same_ids_as_hf_tokenizers_and_meta(llama3_pair, meta, name):
    ours, hf = llama3_pair
    text = TEXTS[name]
    assert ours.encode(text) == _hf_ids(hf, text) == meta.encode(text, bos=False, eos=False)


def test_llama3_tokenizer_json_and_tokenizer_model_agree_on_special_and_stop_ids(llama3_pair, ours_meta):
    ours_json, _ = llama3_pair
    assert ours_json.special_tokens == ours_meta.special_tokens
    assert (ours_json.bos_id, ours_json.eos_id, ours_json.stop_ids, ours_json.n_words) == \
        (ours_meta.bos_id, ours_meta.eos_id, ours_meta.stop_ids, ours_meta.n_words)


@pytest.mark.parametrize("name", TEXT_IDS)
def test_trained_byte_level_bpe_json_gives_same_ids_as_hf_tokenizers(trained_dir, name):
    hf = _hf(trained_dir)
    assert load_tokenizer(trained_dir, {"eos_token_id": 0}).encode(TEXTS[name]) == _hf_ids(hf, TEXTS[name])


def test_trained_tokenizer_json_special_tokens_and_decoding_match_hf(trained_dir):
    hf = _hf(trained_dir)
    ours = load_tokenizer(trained_dir, {"eos_token_id": 0})
    assert ours.special_tokens == {t.content: i for i, t in hf.get_added_tokens_decoder().items()}
    assert ours.n_words == hf.get_vocab_size()
    ids = [1] + _hf_ids(hf, EXCERPT[:500]) + [2, 0]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)


def test_bytes_missing_from_a_trained_vocab_are_dropped_like_hf(trained_dir):
    text = "odd \x04 bytes\x1d here \U000e0067"  # none of these occur in the training text
    hf = _hf(trained_dir)
    assert load_tokenizer(trained_dir, {"eos_token_id": 0}).encode(text) == _hf_ids(hf, text)


# --- round trips and BOS/EOS ---------------------------------------------------------------

@pytest.mark.parametrize("name", TEXT_IDS)
def test_decode_inverts_encode(ours_meta, name):
    assert ours_meta.decode(ours_meta.encode(TEXTS[name])) == TEXTS[name]


@pytest.mark.parametrize("name", TEXT_IDS)
def test_decode_inverts_encode_for_tokenizer_json(trained_dir, name):
    tok = load_tokenizer(trained_dir, {"eos_token_id": 0})
    assert tok.decode(tok.encode(TEXTS[name])) == TEXTS[name]


def test_bos_and_eos_flags_add_the_bos_and_eos_ids(ours_meta):
    ids = ours_meta.encode("Hello world")
    assert ours_meta.encode("Hello world", bos=True, eos=True) == [ours_meta.bos_id, *ids, ours_meta.eos_id]
    assert ours_meta.encode("Hello world", bos=True) == [ours_meta.bos_id, *ids]
    assert ours_meta.encode("Hello world", eos=True) == [*ids, ours_meta.eos_id]


def test_bos_eos_and_stop_ids_come_from_config_and_generation_config(meta_dir, tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(meta_dir / "original" / "tokenizer.model")
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [128001, 128009]}')
    tok = load_tokenizer(tmp_path, {"bos_token_id": 128000, "eos_token_id": 128009})
    assert tok.bos_id == 128000 and tok.eos_id == 128009
    # config's eos first, then generation_config's, then Llama 3's named stop tokens; no repeats
    assert tok.stop_ids == [128009, 128001, 128008]


def test_smollm2_style_stop_ids_are_just_the_configured_eos(trained_dir):
    tok = load_tokenizer(trained_dir, {"bos_token_id": 1, "eos_token_id": 2})
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, [2])


def test_tokenizer_json_is_preferred_over_tokenizer_model(trained_dir, meta_model_file, tmp_path):
    (tmp_path / "tokenizer.json").symlink_to(trained_dir / "tokenizer.json")
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").symlink_to(meta_model_file)
    assert load_tokenizer(tmp_path, {"eos_token_id": 0}).n_words == _hf(trained_dir).get_vocab_size()


# --- bad inputs ------------------------------------------------------------------------------

def _bpe_json(**changes) -> str:
    """A tiny valid byte-level BPE tokenizer.json, with `changes` applied."""
    tj = {"added_tokens": [], "normalizer": None,
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
          "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}}
    for key, value in changes.items():
        (tj["model"] if key in ("type", "vocab", "merges", "dropout") else tj)[key] = value
    return json.dumps(tj)


BAD_FILES = {  # case: (files to write, text the error must contain besides the file name)
    "not_json": ({"tokenizer.json": "{ not json"}, "JSON"),
    "json_not_an_object": ({"tokenizer.json": "[1, 2]"}, "JSON object"),
    "wordpiece": ({"tokenizer.json": _bpe_json(type="WordPiece")}, "WordPiece"),
    "metaspace": ({"tokenizer.json": _bpe_json(pre_tokenizer={"type": "Metaspace"})}, "Metaspace"),
    "prefix_space": ({"tokenizer.json": _bpe_json(
        pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True})}, "add_prefix_space"),
    "normalizer": ({"tokenizer.json": _bpe_json(normalizer={"type": "Lowercase"})}, "Lowercase"),
    "bpe_dropout": ({"tokenizer.json": _bpe_json(dropout=0.1)}, "dropout"),
    "not_byte_level_vocab": ({"tokenizer.json": _bpe_json(vocab={"a": 0, "b": 1, "a b": 2})}, "'a b'"),
    "merge_result_not_in_vocab": ({"tokenizer.json": _bpe_json(vocab={"a": 0, "b": 1})}, "vocab/merges"),
    "no_model": ({"tokenizer.json": '{"added_tokens": []}'}, "malformed"),
    "corrupt_model_line": ({"tokenizer.model": "IQ== 0\nIg== 1\n@@not-base64@@ 2\n"}, "line 3"),
    "binary_model": ({"original/tokenizer.model": b"\n\x0e\n\x05<unk>\x15\x00\x00\x80\xff"}, "SentencePiece"),
    "model_missing_bytes": ({"tokenizer.model": "IQ== 0\nIg== 1\n"}, "256 single bytes"),
    "bad_generation_config": ({"tokenizer.json": _bpe_json(), "generation_config.json": "{"}, "JSON"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_tokenizer_files_raise_checkpoint_error_naming_the_file(case, tmp_path):
    files, expected = BAD_FILES[case]
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path, {"eos_token_id": 0})
    assert str(tmp_path / list(files)[-1]) in str(err.value) and expected in str(err.value)


def test_missing_tokenizer_raises_checkpoint_error_listing_the_paths_tried(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path, {})
    for tried in ["tokenizer.json", "original/tokenizer.model", "tokenizer.model"]:
        assert str(tmp_path / tried) in str(err.value)


def test_eos_id_outside_the_vocab_raises_checkpoint_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text(_bpe_json())
    with pytest.raises(CheckpointError, match="bos/eos"):
        load_tokenizer(tmp_path, {"eos_token_id": 999})
